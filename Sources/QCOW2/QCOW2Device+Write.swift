import BlockDevice
import Synchronization
import SystemIO

// MARK: - Requests

/// Writes. Data going to clusters this image owns alone (COPIED) is written
/// in place without holding the metadata lock, so such writes run in
/// parallel. Anything that changes metadata (allocation, copy-on-write from
/// a backing file, compressed or snapshot-shared cluster, zero flags, trim)
/// runs under `metadataLock`, in the order that makes a crash harmless:
/// the new cluster's refcount, then its data, then the L2 entry, then
/// freeing what the entry pointed to before. A crash leaves at worst
/// leaked clusters (see CrashTests).
///
/// Refcounts are updated eagerly, so the dirty bit is never set (lazy
/// refcounts are allowed, not required, by the spec); a dirty image from
/// qemu is repaired at open (`RefcountRepair`). Writes in place and reads
/// pin their host ranges in `inFlight` so a cluster freed under them is not
/// reused until they finish.
///
/// An allocating write holds `metadataLock` only to decide and allocate and
/// then to update the L2 entry; its copy-on-write read and data write run
/// unlocked under the cluster's stripe of `clusterLocks`, so different
/// clusters are allocated in parallel (`writeCluster`). Whole-cluster runs
/// (`writeWholeClusters`) and extended-L2 subcluster writes still do their
/// data write under `metadataLock`.
extension QCOW2Device {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        try requireWritable(offset: offset, length: UInt64(data.count))
        var position = 0
        while position < data.count {
            let guest = offset + UInt64(position)
            let rest = UnsafeRawBufferPointer(rebasing: data[position...])
            if let written = try writeInPlace(rest, at: guest) {
                position += written
                continue
            }
            let cluster = geometry.clusterSize
            if guest & (cluster - 1) == 0 && UInt64(rest.count) >= cluster {
                // Whole clusters: nothing to copy, so a run of them gets one allocation and one pwrite.
                let whole = Int(UInt64(rest.count) & ~(cluster - 1))
                let written = try withMetadataLock { () throws(DeviceError) in
                    try writeWholeClusters(UnsafeRawBufferPointer(rebasing: rest[..<whole]), at: guest)
                }
                if written > 0 {
                    position += written
                    continue
                }
            }
            let n = Int(min(UInt64(rest.count), cluster - (guest & (cluster - 1))))
            // False: the cluster became ours alone meanwhile; loop to write it in place.
            if try writeCluster(UnsafeRawBufferPointer(rebasing: rest[..<n]), at: guest) { position += n }
        }
        if fua { try flush() }
    }

    public func flush() throws(DeviceError) {
        guard writable else { return }
        do throws(Errno) {
            try dataFile?.sync()
            try file.sync()
        } catch {
            throw .system(error, "fdatasync")
        }
    }

    /// Makes a range read as zeros: v3 images set the zero flag on whole
    /// clusters (keeping the allocation unless `mayDeallocate`), partial
    /// clusters and v2 images get real zeros, and parts that already read
    /// as zeros are left alone. `fast` is refused (`.notSupported`) unless
    /// no data has to be written.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool,
                            fua: Bool) throws(DeviceError) {
        try requireWritable(offset: offset, length: length)
        let end = offset + length
        let flags = canUseZeroFlag
        let cluster = geometry.clusterSize
        if fast {
            let head = min(end, (offset + cluster - 1) & ~(cluster - 1)) - offset
            let tailStart = max(offset + head, end == size ? end : end & ~(cluster - 1))
            // Partial clusters at the edges, and everything without zero flags, must already be zeros.
            var cheap = try readsAsZeros(at: offset, length: head)
            if cheap { cheap = try readsAsZeros(at: tailStart, length: end - tailStart) }
            if cheap && !flags { cheap = try readsAsZeros(at: offset, length: length) }
            guard cheap else { throw DeviceError(.notSupported, "qcow2: zeroing this range needs data writes") }
        }
        var position = offset
        while position < end {
            let clusterStart = position & ~(cluster - 1)
            let clusterEnd = min(clusterStart + cluster, size)
            let n = min(clusterEnd, end) - position
            let whole = position == clusterStart && position + n == clusterEnd
            if try readsAsZeros(at: position, length: n, unallocatedOnly: whole && mayDeallocate) {
                // Already zeros (a zero cluster, or unallocated with nothing below), and
                // nothing to deallocate: leave the metadata alone.
            } else if whole && flags {
                try clusterLock(for: clusterStart).mutex.withLock { _ throws(DeviceError) in
                    try withMetadataLock { () throws(DeviceError) in
                        try zeroCluster(at: clusterStart, deallocate: mayDeallocate)
                    }
                }
            } else if whole && mayDeallocate && backing == nil && dataFile == nil {
                // v2 without a backing file: an unallocated cluster reads as zeros.
                try clusterLock(for: clusterStart).mutex.withLock { _ throws(DeviceError) in
                    try withMetadataLock { () throws(DeviceError) in try deallocateCluster(at: clusterStart) }
                }
            } else if flags && geometry.extendedL2, try zeroSubclusters(at: position, length: n) {
                // Whole subclusters got their zero bits; the partial ones at the edges got zeros.
            } else {
                try writeZeroBytes(at: position, length: n)
            }
            position += n
        }
        if fua { try flush() }
    }

    /// Frees whole clusters in the range; partial clusters are left alone,
    /// as trim is advisory. Where a backing file would show through, v3
    /// images get the zero flag and v2 images keep their data.
    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {
        try requireWritable(offset: offset, length: length)
        guard !header.dataFileIsRaw else { return }  // the raw data file must keep matching the disk
        let cluster = geometry.clusterSize
        var position = (offset + cluster - 1) & ~(cluster - 1)
        let end = offset + length == size ? size : (offset + length) & ~(cluster - 1)
        while position < end {
            let clusterStart = position
            if backing == nil {
                try clusterLock(for: clusterStart).mutex.withLock { _ throws(DeviceError) in
                    try withMetadataLock { () throws(DeviceError) in try deallocateCluster(at: clusterStart) }
                }
            } else if canUseZeroFlag {
                try clusterLock(for: clusterStart).mutex.withLock { _ throws(DeviceError) in
                    try withMetadataLock { () throws(DeviceError) in try zeroCluster(at: clusterStart, deallocate: true) }
                }
            }
            position += cluster
        }
        if fua { try flush() }
    }

    private var canUseZeroFlag: Bool { header.version >= 3 && !header.dataFileIsRaw }

    /// Extended L2, part of one cluster: sets the zero bits of the subclusters
    /// wholly inside the range and writes zeros over the partial ones at its
    /// edges. Returns false, having done nothing, when no subcluster is whole
    /// or the cluster is compressed (no subclusters).
    private func zeroSubclusters(at offset: UInt64, length: UInt64) throws(DeviceError) -> Bool {
        let unit = geometry.unitSize
        let first = (offset + unit - 1) & ~(unit - 1), last = (offset + length) & ~(unit - 1)
        guard first < last else { return false }
        let clusterStart = offset & ~(geometry.clusterSize - 1)
        let done = try clusterLock(for: clusterStart).mutex.withLock { _ throws(DeviceError) -> Bool in
            try withMetadataLock { () throws(DeviceError) -> Bool in
                try zeroSubclusterBits(in: clusterStart, from: first - clusterStart, to: last - clusterStart)
            }
        }
        guard done else { return false }
        if first > offset { try writeZeroBytes(at: offset, length: first - offset) }
        if offset + length > last { try writeZeroBytes(at: last, length: offset + length - last) }
        return true
    }

    /// Whether the range reads as zeros from metadata alone: zero clusters,
    /// or unallocated ones with no backing data below (data is not scanned).
    /// With `unallocatedOnly`, zero clusters (which may hold an allocation) don't count.
    private func readsAsZeros(at offset: UInt64, length: UInt64,
                              unallocatedOnly: Bool = false) throws(DeviceError) -> Bool {
        // A raw data file must hold the zeros itself, whatever the metadata says.
        guard !header.dataFileIsRaw || length == 0 else { return false }
        var position = offset
        while position < offset + length {
            let (mapping, n) = try run(at: position, limit: offset + length - position)
            switch mapping {
            case .zero where !unallocatedOnly: break
            case .unallocated where backing == nil || position >= backing!.size: break
            default: return false
            }
            position += n
        }
        return true
    }

    private func requireWritable(offset: UInt64, length: UInt64) throws(DeviceError) {
        guard writable else { throw DeviceError(.readOnly, "qcow2 export is read-only") }
        guard !markedCorrupt.load(ordering: .relaxed) else {
            throw DeviceError(.io, "qcow2 image was marked corrupt; writes are refused")
        }
        guard offset <= size, length <= size - offset else {
            throw DeviceError(.noSpace, "write of \(length) bytes at \(offset) is past the end of the disk")
        }
    }

    private func writeZeroBytes(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(length), alignment: 8)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        try write(UnsafeRawBufferPointer(zeros), at: offset, fua: false)
    }

    /// Runs `body` under the metadata lock. Inconsistent metadata found on the
    /// way marks the image corrupt (spec, incompatible bit 1).
    func withMetadataLock<T>(_ body: () throws(DeviceError) -> T) throws(DeviceError) -> T {
        do {
            return try metadataLock.withLock { _ throws(DeviceError) in try body() }
        } catch {
            if error.kind == .io && error.reason.hasPrefix("qcow2 metadata") { markCorrupt() }
            throw error
        }
    }

    private func markCorrupt() {
        guard !markedCorrupt.exchange(true, ordering: .relaxed), header.version >= 3 else { return }
        let features = header.incompatibleFeatures.union(.corrupt).rawValue
        try? writeBytes(QCOW2Device.bigEndianBytes(features), at: 72, what: "header")
        try? file.sync()
    }
}
