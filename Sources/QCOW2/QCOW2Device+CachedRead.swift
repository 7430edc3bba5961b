import BlockDevice
import SystemIO

/// Reads answered on the connection's reader thread (`BlockDevice.readIfCached`):
/// only from L2 tables already cached and file pages already in memory, with no
/// lock held for long, so a cached 4 KiB read costs one lookup and one preadv2
/// instead of a hand-over to a device thread. Anything else returns false and
/// the ordinary `read` runs on a device thread.
///
/// No `fileRange` for qcow2: sendfile runs on the writer thread after this
/// returns, when the host range is no longer pinned, so a concurrent trim or
/// rewrite could free the cluster and reuse it for metadata or another guest
/// range, whose bytes would then go out as this one's.
extension QCOW2Device {
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard offset <= size, UInt64(buffer.count) <= size - offset else { return false }
        var position = 0
        while position < buffer.count {
            let guest = offset + UInt64(position)
            guard let (mapping, length64) = cachedRun(at: guest, limit: UInt64(buffer.count - position)) else {
                return false
            }
            let length = Int(length64)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[position..<position + length])
            switch mapping {
            case .data(let host):
                guard readDataIfCached(into: target, host: host, guest: guest) else { return false }
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                guard readBackingIfCached(into: target, at: guest) else { return false }
            case .compressed, .invalid:
                // Decompression is CPU work for a device thread; errors are reported there.
                return false
            }
            position += length
        }
        return true
    }

    /// `run(at:limit:)` from cached tables only: nil when the L2 table is not
    /// in memory (loading it would wait for storage) or its L1 entry is bad.
    private func cachedRun(at offset: UInt64, limit: UInt64) -> (Mapping, UInt64)? {
        let g = geometry
        let within = offset % g.bytesPerL2
        let length = min(limit, g.bytesPerL2 - within)
        let l1Index = Int(offset / g.bytesPerL2)
        let tableOffset = l1Table.entry(at: l1Index) & EntryBits.offsetMask
        guard tableOffset != 0 else { return (.unallocated, length) }
        guard tableOffset & (g.clusterSize - 1) == 0, let table = l2Cache.cachedTable(at: tableOffset) else {
            return nil
        }
        return table.run(at: within, limit: length, geometry: g)
    }

    /// One host-contiguous run, pinned as `read` pins it, but with `tryPin`:
    /// a writer waiting on the range means the read would wait too.
    private func readDataIfCached(into target: UnsafeMutableRawBufferPointer, host: UInt64, guest: UInt64) -> Bool {
        guard writable, dataFile == nil else { return (dataFile ?? file).readIfCached(into: target, at: host) }
        let range = host..<host + UInt64(target.count)
        guard hostRanges.tryPin(range) else { return false }
        defer { hostRanges.unpin(range) }
        // As in `pin`: only a mapping seen after pinning is safe from reuse.
        var position: UInt64 = 0
        while position < UInt64(target.count) {
            guard let (mapping, n) = cachedRun(at: guest + position, limit: UInt64(target.count) - position),
                  case .data(let now) = mapping, now == host + position else { return false }
            position += n
        }
        return file.readIfCached(into: target, at: host)
    }

    /// Unallocated here: the backing file's cached bytes, zeros past its end or without one.
    private func readBackingIfCached(into target: UnsafeMutableRawBufferPointer, at guest: UInt64) -> Bool {
        guard let backing, guest < backing.size else {
            target.initializeMemory(as: UInt8.self, repeating: 0)
            return true
        }
        let available = Int(min(UInt64(target.count), backing.size - guest))
        guard backing.readIfCached(into: UnsafeMutableRawBufferPointer(rebasing: target[..<available]), at: guest)
        else { return false }
        if available < target.count {
            UnsafeMutableRawBufferPointer(rebasing: target[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        return true
    }
}
