import SystemIO

/// The host clusters of the image file that hold metadata: the header, the
/// active and snapshot L1 tables, the active L2 tables, the refcount table
/// and blocks, the snapshot table and the bitmap directory (qemu's
/// overlap-check "cached" set: inactive L2 tables are not tracked).
///
/// One bit per host cluster, so its memory is 1/(8 x cluster size) of the
/// image file: 3 MiB for a 100 GiB file of 512-byte clusters.
final class MetadataMap: Sendable {
    private let bits = Locked<[UInt64]>([])
    let clusterBits: Int

    init(clusterBits: Int) { self.clusterBits = clusterBits }

    /// Marks the clusters overlapping `length` bytes at `offset` as metadata.
    func insert(_ offset: UInt64, length: UInt64) { update(offset, length, set: true) }

    /// Forgets clusters that no longer hold metadata (a freed refcount table).
    func remove(_ offset: UInt64, length: UInt64) { update(offset, length, set: false) }

    private func update(_ offset: UInt64, _ length: UInt64, set: Bool) {
        guard length > 0 else { return }
        let first = offset >> UInt64(clusterBits), last = (offset + length - 1) >> UInt64(clusterBits)
        bits.withLock { words in
            if set && Int(last / 64) >= words.count {
                words += [UInt64](repeating: 0, count: Int(last / 64) + 1 - words.count)
            }
            for c in first...last where Int(c / 64) < words.count {
                if set { words[Int(c / 64)] |= 1 << (c % 64) } else { words[Int(c / 64)] &= ~(1 << (c % 64)) }
            }
        }
    }

    /// Whether any byte of `length` bytes at `offset` lies in a metadata cluster.
    func overlaps(_ offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return false }
        let first = offset >> UInt64(clusterBits), last = (offset + length - 1) >> UInt64(clusterBits)
        return bits.withLock { words in
            var c = first
            while c <= last && Int(c / 64) < words.count {
                if words[Int(c / 64)] & (1 << (c % 64)) != 0 { return true }
                c += 1
            }
            return false
        }
    }

    func contains(cluster host: UInt64) -> Bool { overlaps(host, length: 1) }
}

/// The image file as guest data writes see it: a write that would land on
/// metadata is refused with EIO and reported through `violation`, which
/// marks the image corrupt (qemu's overlap-check). Metadata writes use the
/// unguarded file.
struct OverlapGuardedFile: PositionalFile {
    let base: any PositionalFile
    let map: MetadataMap
    let violation: @Sendable (_ offset: UInt64, _ length: UInt64) -> Void

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) {
        if map.overlaps(offset, length: UInt64(data.count)) {
            violation(offset, UInt64(data.count))
            throw Errno.io
        }
        try base.write(data, at: offset)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, zeroFillPastEOF: Bool) throws(Errno) {
        try base.read(into: buffer, at: offset, zeroFillPastEOF: zeroFillPastEOF)
    }
    func size() throws(Errno) -> UInt64 { try base.size() }
    func truncate(to size: UInt64) throws(Errno) { try base.truncate(to: size) }
    func sync() throws(Errno) { try base.sync() }
    func nextData(from offset: UInt64) throws(Errno) -> UInt64? { try base.nextData(from: offset) }
    func nextHole(from offset: UInt64) throws(Errno) -> UInt64 { try base.nextHole(from: offset) }
    func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        if map.overlaps(offset, length: length) {
            violation(offset, length)
            throw Errno.io
        }
        try base.punchHole(at: offset, length: length)
    }
    func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        if map.overlaps(offset, length: length) {
            violation(offset, length)
            throw Errno.io
        }
        try base.zeroRange(at: offset, length: length)
    }
    func prefetch(at offset: UInt64, length: UInt64) { base.prefetch(at: offset, length: length) }
    func close() {}
}
