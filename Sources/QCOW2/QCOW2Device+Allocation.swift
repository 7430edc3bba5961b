import BlockDevice
import Synchronization
import SystemIO

/// Writing guest data: in place into clusters this image owns, or into
/// newly allocated clusters (copy-on-write from a backing file, a
/// compressed or snapshot-shared cluster). Metadata changes run under
/// the metadata lock; data I/O of in-place and single-cluster writes does not.
extension QCOW2Device {
    var entryWords: Int { geometry.extendedL2 ? 2 : 1 }

    /// Writes in place if `data` starts in a cluster this image owns alone and
    /// whose touched units are allocated; returns the bytes written (over as
    /// many host-contiguous clusters of one L2 table as qualify), or nil.
    func writeInPlace(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Int? {
        let g = geometry
        // Under the lock only so that the pin cannot race an allocation of the range.
        let target: (host: UInt64, length: Int)? = try withMetadataLock { _ throws(DeviceError) in
            let l1Index = Int(guest / g.bytesPerL2)
            guard let table = try activeL2(l1Index: l1Index)?.table else { return nil }
            var index = Int((guest % g.bytesPerL2) >> UInt64(g.clusterBits))
            var position = guest, remaining = UInt64(data.count)
            var firstHost: UInt64?, length: UInt64 = 0
            while remaining > 0 && index < g.l2Entries {
                let into = position & (g.clusterSize - 1)
                let n = min(remaining, g.clusterSize - into)
                guard let host = ownedHost(table, index: index, from: into, length: n) else { break }
                if let firstHost, firstHost + length != host + into { break }
                if firstHost == nil { firstHost = host + into }
                length += n
                remaining -= n
                position += n
                index += 1
            }
            guard let firstHost, length > 0 else { return nil }
            // Pinned even for a data file: writeSubclusters waits on it.
            hostRanges.pin(firstHost..<firstHost + length)
            return (firstHost, Int(length))
        }
        guard let target else { return nil }
        defer { hostRanges.unpin(target.host..<target.host + UInt64(target.length)) }
        try writeData(UnsafeRawBufferPointer(rebasing: data[..<target.length]), at: target.host)
        return target.length
    }

    /// The host cluster of entry `index` if the plan for writing [from,
    /// from+length) of it is to write in place.
    func ownedHost(_ table: L2Table, index: Int, from: UInt64, length: UInt64) -> UInt64? {
        let g = geometry
        let entry = table.entries[index * entryWords]
        let bitmap = g.extendedL2 ? table.entries[index * 2 + 1] : 0
        let guestCluster = UInt64(index) << UInt64(g.clusterBits)  // only compared for data files, within one table
        let plan = ClusterWritePlan.plan(entry: entry, bitmap: bitmap, from: from, length: length,
                                         guestCluster: g.hasDataFile ? entry & EntryBits.offsetMask : guestCluster,
                                         geometry: g, refcount: nil)
        if case .inPlace(let host) = plan, entry & EntryBits.copied != 0 { return host }
        return nil
    }

    /// Writes `data` (within one cluster) at `guest`, allocating or copying
    /// the cluster as needed. Returns false if the cluster turned out to be
    /// owned by this image, to be written in place by the caller instead.
    ///
    /// Three steps, so that different clusters are allocated in parallel:
    /// under the metadata lock, plan and allocate (the cluster is marked
    /// pending); unlocked, copy its old contents and write the new cluster;
    /// under the lock again, point the L2 entry at it and release the old one.
    /// The cluster's stripe of `clusterLocks`, held throughout, keeps other
    /// writes, zeroes and trims of the same cluster out.
    func writeCluster(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Bool {
        try clusterLock(for: guest).withLock { () throws(DeviceError) -> Bool in
            try writeClusterLocked(data, at: guest)
        }
    }

    /// A rewrite decided under the lock: the entry it replaces and where the cluster goes.
    private struct Rewrite {
        var old: UInt64
        var newHost: UInt64
        /// The host is the cluster's own (owned, or a data file's fixed place): nothing to allocate or release.
        var reused: Bool
        /// The new cluster reads as zeros already.
        var fresh: Bool
        /// Everything was done under the lock (subclusters): nothing left to write. Not
        /// `newHost == 0`: that is a data file's first cluster.
        var finished = false
    }

    private func writeClusterLocked(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Bool {
        let g = geometry
        let clusterIndex = guest >> UInt64(g.clusterBits)
        let clusterStart = guest & ~(g.clusterSize - 1)
        let into = Int(guest - clusterStart)
        let decided = try withMetadataLock { state throws(DeviceError) -> Rewrite? in
            let (l2Offset, index, table) = try writableL2(&state, for: guest)
            let old = table.entries[index * entryWords]
            let bitmap = g.extendedL2 ? table.entries[index * 2 + 1] : 0
            let host = old & EntryBits.offsetMask
            let plain = old & (EntryBits.compressed | EntryBits.copied) == 0 && host != 0 && !g.hasDataFile
            let plan = ClusterWritePlan.plan(entry: old, bitmap: bitmap, from: UInt64(into), length: UInt64(data.count),
                                             guestCluster: clusterStart, geometry: g,
                                             refcount: plain ? try state.refcounts!.refcount(of: host) : nil)
            switch plan {
            case .corrupt(let reason):
                throw .corruption("L2 entry \(index) of the table at \(l2Offset): \(reason)")
            case .inPlace:
                return nil  // in-place writers may be landing in it: no read-modify-write
            case .subclusters(let owned):
                try writeSubclusters(&state, data, at: guest, l2Offset: l2Offset, index: index, old: old, bitmap: bitmap,
                                     host: owned)
                return Rewrite(old: old, newHost: 0, reused: true, fresh: false, finished: true)
            case .rewrite(let owned):
                state.pendingClusters.insert(clusterIndex)
                if let owned { return Rewrite(old: old, newHost: owned, reused: true, fresh: false) }
                let run = try allocateClusters(&state, upTo: 1)
                return Rewrite(old: old, newHost: run.host, reused: false, fresh: run.fresh)
            }
        }
        guard let plan = decided else { return false }
        if plan.finished { return true }

        do {
            // The whole cluster: what it reads as now (backing, compressed, zeros), with `data` over it.
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(g.clusterSize), alignment: 4096)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            let valid = Int(min(g.clusterSize, size - clusterStart))
            if !(into == 0 && data.count == valid) {
                try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<valid]), at: clusterStart)
            }
            UnsafeMutableRawBufferPointer(rebasing: buffer[into..<into + data.count]).copyMemory(from: data)
            // A fresh cluster reads as zeros, so if the rest of the cluster is zeros only
            // the new bytes need writing.
            if plan.fresh, QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[..<into])),
               QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[(into + data.count)...])) {
                try writeData(data, at: plan.newHost + UInt64(into))
                // The cluster's last byte too, so the file covers the whole cluster: readers treat
                // a data cluster that ends past the end of the file as broken metadata.
                if into + data.count < Int(g.clusterSize) {
                    try writeData(UnsafeRawBufferPointer(rebasing: buffer[(Int(g.clusterSize) - 1)...]),
                                  at: plan.newHost + g.clusterSize - 1)
                }
            } else {
                try writeData(UnsafeRawBufferPointer(buffer), at: plan.newHost)
                // Copied bytes (from a backing file, a compressed or shared cluster) must be on
                // disk before the L2 entry: a power cut must not lose data the guest never
                // rewrote (qemu's "data is always flushed before the L2 update" after a COW).
                let mappedHere = plan.old & EntryBits.offsetMask == plan.newHost && plan.old & EntryBits.zero == 0
                    && plan.old & EntryBits.compressed == 0 && (plan.newHost != 0 || plan.old & EntryBits.copied != 0)
                let copied = !QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[..<into]))
                    || !QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[(into + data.count)...]))
                if copied && !mappedHere { try syncData() }
            }
        } catch {
            _ = try? withMetadataLock { state throws(DeviceError) in
                state.pendingClusters.remove(clusterIndex)
                if !plan.reused { unallocate(&state, host: plan.newHost, count: 1) }
            }
            throw error
        }

        try withMetadataLock { state throws(DeviceError) in
            defer { state.pendingClusters.remove(clusterIndex) }
            let (l2Offset, index, table) = try writableL2(&state, for: guest)
            guard table.entries[index * entryWords] & ~EntryBits.copied == plan.old & ~EntryBits.copied else {
                throw .corruption("the L2 entry of cluster \(clusterIndex) changed during a write")
            }
            try setL2Entries(state, l2Offset: l2Offset, index: index,
                             [(plan.newHost | EntryBits.copied, g.extendedL2 ? 0xFFFF_FFFF : 0)])
            if !plan.reused { try release(&state, plan.old) }
        }
        return true
    }

    /// The stripe of `clusterLocks` for the guest cluster holding `guest`.
    func clusterLock(for guest: UInt64) -> Lock {
        clusterLocks[Int((guest >> UInt64(geometry.clusterBits)) % UInt64(clusterLocks.count))]
    }

    /// Writes `data` into the subclusters it touches of an extended-L2
    /// cluster at `host` (owned), or at a newly allocated cluster when `host`
    /// is nil. Partly touched subclusters keep their other bytes.
    func writeSubclusters(_ state: inout MetadataState, _ data: UnsafeRawBufferPointer, at guest: UInt64, l2Offset: UInt64, index: Int,
                          old: UInt64, bitmap: UInt64, host: UInt64?) throws(DeviceError) {
        let g = geometry
        let clusterStart = guest & ~(g.clusterSize - 1)
        let into = guest - clusterStart
        let first = into >> UInt64(g.unitBits), last = (into + UInt64(data.count) - 1) >> UInt64(g.unitBits)
        let regionStart = clusterStart + (first << UInt64(g.unitBits))
        let regionLength = Int((last - first + 1) << UInt64(g.unitBits))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: regionLength, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let valid = Int(min(UInt64(regionLength), size - regionStart))
        let offsetInRegion = Int(guest - regionStart)
        if let host {
            // An in-place write to another part of these subclusters may still be
            // landing; the copy below must include it.
            let start = host + (regionStart - clusterStart)
            hostRanges.waitUntilUnpinned(start..<start + UInt64(regionLength))
        }
        if !(offsetInRegion == 0 && data.count == valid) {
            try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<valid]), at: regionStart)
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[offsetInRegion..<offsetInRegion + data.count]).copyMemory(from: data)
        let newHost: UInt64
        if let host { newHost = host } else { newHost = try allocateClusters(&state, upTo: 1).host }
        do {
            try writeData(UnsafeRawBufferPointer(buffer), at: newHost + (regionStart - clusterStart))
            // Copied bytes before the entry naming them, as in writeClusterLocked.
            if !QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[..<offsetInRegion]))
                || !QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[(offsetInRegion + data.count)...])) {
                try syncData()
            }
        } catch {
            if host == nil { unallocate(&state, host: newHost, count: 1) }
            throw error
        }
        let touched = ((UInt64(1) << (last - first + 1)) - 1) << first
        let newBitmap = (bitmap | touched) & ~(touched << 32)
        try setL2Entries(state, l2Offset: l2Offset, index: index, [(newHost | EntryBits.copied, newBitmap)])
        if host == nil { try release(&state, old) }
    }

    /// Writes whole clusters from `guest` (cluster-aligned) into newly
    /// allocated, host-contiguous clusters, as many as one L2 table maps, the
    /// allocator's reserve gives contiguously, and none of which this image
    /// owns alone or another write is allocating. Returns the bytes written:
    /// 0 if the first cluster is such a one.
    func writeWholeClusters(_ state: inout MetadataState, _ data: UnsafeRawBufferPointer,
                            at guest: UInt64) throws(DeviceError) -> Int {
        let g = geometry
        let (l2Offset, index, table) = try writableL2(&state, for: guest)
        let limit = min(data.count >> g.clusterBits, g.l2Entries - index)
        var count = 0
        var old: [UInt64] = []
        while count < limit {
            let entry = table.entries[(index + count) * entryWords]
            let owned = entry & EntryBits.compressed == 0 && entry & EntryBits.copied != 0
                && (entry & EntryBits.offsetMask != 0 || g.hasDataFile)
            // Owned clusters are written in place, and a cluster another write is
            // allocating must wait for it: both go through writeCluster.
            if owned || state.pendingClusters.contains((guest >> UInt64(g.clusterBits)) + UInt64(count)) { break }
            old.append(entry)
            count += 1
        }
        guard count > 0 else { return 0 }
        let host: UInt64
        if g.hasDataFile {
            host = guest
        } else {
            let run = try allocateClusters(&state, upTo: count)
            (host, count) = (run.host, run.count)
        }
        let length = count << g.clusterBits
        do {
            try writeData(UnsafeRawBufferPointer(rebasing: data[..<length]), at: host)
        } catch {
            if !g.hasDataFile { unallocate(&state, host: host, count: count) }
            throw error
        }
        let bitmap: UInt64 = g.extendedL2 ? 0xFFFF_FFFF : 0
        try setL2Entries(state, l2Offset: l2Offset, index: index,
                         (0..<count).map { ((host + (UInt64($0) << UInt64(g.clusterBits))) | EntryBits.copied, bitmap) })
        for entry in old.prefix(count) { try release(&state, entry) }
        return length
    }
}
