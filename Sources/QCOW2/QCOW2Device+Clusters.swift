import BlockDevice
import Synchronization
import SystemIO

/// Cluster-level operations behind the write requests. All but the data
/// write of `writeInPlace` run under `metadataLock`.

extension QCOW2Device {
    var entryWords: Int { geometry.extendedL2 ? 2 : 1 }

    /// Writes in place if `data` starts in a cluster this image owns alone and
    /// whose touched units are allocated; returns the bytes written (over as
    /// many host-contiguous clusters of one L2 table as qualify), or nil.
    func writeInPlace(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Int? {
        let g = geometry
        let target: (host: UInt64, length: Int)? = try withMetadataLock { () throws(DeviceError) in
            let l1Index = guest / g.bytesPerL2
            let l1Entry = l1Table.withLock { l1Index < UInt64($0.count) ? $0[Int(l1Index)] : 0 }
            let l2Offset = l1Entry & EntryBits.offsetMask
            guard l2Offset != 0 else { return nil }
            let table = try l2Cache.table(at: l2Offset) { () throws(DeviceError) in
                try loadL2Table(at: l2Offset, l1Index: l1Index)
            }
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
            // Registered even for a data file: writeSubclusters waits on it (its
            // offsets then only make the allocator skip some clusters briefly).
            inFlight.withLock { $0.append(firstHost..<firstHost + length) }
            return (firstHost, Int(length))
        }
        guard let target else { return nil }
        defer {
            inFlight.withLock { ranges in
                if let i = ranges.firstIndex(of: target.host..<target.host + UInt64(target.length)) {
                    ranges.remove(at: i)
                }
            }
        }
        try writeBytes(UnsafeRawBufferPointer(rebasing: data[..<target.length]), to: dataFile ?? file,
                       at: target.host, what: "data")
        return target.length
    }

    /// The host cluster of entry `index` if it is plain data owned by this
    /// image alone with every unit in [from, from+length) allocated.
    func ownedHost(_ table: L2Table, index: Int, from: UInt64, length: UInt64) -> UInt64? {
        let g = geometry
        let entry = table.entries[index * entryWords]
        guard entry & EntryBits.compressed == 0, entry & EntryBits.copied != 0 else { return nil }
        let host = entry & EntryBits.offsetMask
        guard host & (g.clusterSize - 1) == 0, host != 0 || dataFile != nil else { return nil }
        if g.extendedL2 {
            let bitmap = table.entries[index * 2 + 1]
            let first = Int(from >> UInt64(g.unitBits)), last = Int((from + length - 1) >> UInt64(g.unitBits))
            for unit in first...last where bitmap & (1 << UInt64(unit)) == 0 { return nil }
            return host
        }
        return entry & EntryBits.zero == 0 ? host : nil
    }

    /// What the locked first step of `writeCluster` decided.
    private enum ClusterPlan {
        /// Done already (extended L2 subclusters are written under the lock).
        case done
        /// The cluster became this image's alone: write it in place instead.
        case inPlace
        /// Write the cluster's new contents at `newHost`, then point the entry there.
        /// `reused` when `newHost` is the cluster's own host; `fresh` when it lies
        /// past the old end of the file and so already reads as zeros.
        case copy(old: UInt64, newHost: UInt64, reused: Bool, fresh: Bool)
    }

    /// Writes `data` (within one cluster) at `guest`, allocating or copying
    /// the cluster as needed. Returns false if the cluster turned out to be
    /// owned by this image, to be written in place by the caller instead.
    ///
    /// Three steps, so that different clusters are allocated in parallel:
    /// under `metadataLock`, decide and allocate (the cluster is marked
    /// pending); unlocked, copy its old contents and write the new cluster;
    /// under the lock again, point the L2 entry at it and free the old one.
    /// The cluster's stripe of `clusterLocks`, held throughout, keeps other
    /// writes, zeroes and trims of the same cluster out.
    func writeCluster(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Bool {
        try clusterLock(for: guest).mutex.withLock { _ throws(DeviceError) -> Bool in
            try writeClusterLocked(data, at: guest)
        }
    }

    private func writeClusterLocked(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Bool {
        let g = geometry
        let clusterIndex = guest >> UInt64(g.clusterBits)
        let clusterStart = guest & ~(g.clusterSize - 1)
        let into = Int(guest - clusterStart)
        let plan = try withMetadataLock { () throws(DeviceError) -> ClusterPlan in
            let (l2Offset, index, table) = try writableL2(for: guest)
            let old = table.entries[index * entryWords]
            if !g.extendedL2, ownedHost(table, index: index, from: UInt64(into), length: UInt64(data.count)) != nil {
                return .inPlace  // in-place writers may be landing in it: no read-modify-write
            }
            let oldHost = old & EntryBits.offsetMask
            let compressed = old & EntryBits.compressed != 0
            // Reuse the host cluster when this image owns it alone.
            var host: UInt64?
            if dataFile != nil {
                host = clusterStart  // external data files map guest offsets one to one
            } else if !compressed && oldHost != 0 {
                if old & EntryBits.copied != 0 {
                    host = oldHost
                } else if try refcounts!.refcount(of: oldHost) == 1 {
                    host = oldHost
                }
            }
            // Extended L2: only the touched subclusters are written and marked
            // allocated; the others keep reading from the backing file or as zeros.
            if g.extendedL2 && !compressed && (host != nil || oldHost == 0) {
                try writeSubclusters(data, at: guest, l2Offset: l2Offset, index: index, old: old,
                                     bitmap: table.entries[index * 2 + 1], host: host)
                return .done
            }
            let endBefore = refcounts?.fileEnd ?? 0
            let newHost: UInt64
            if let host { newHost = host } else { newHost = try refcounts!.allocate() }
            pendingClusters.value.insert(clusterIndex)
            return .copy(old: old, newHost: newHost, reused: host != nil,
                         fresh: host == nil && dataFile == nil && newHost >= endBefore)
        }
        let old: UInt64, newHost: UInt64, reused: Bool, fresh: Bool
        switch plan {
        case .done: return true
        case .inPlace: return false
        case .copy(let o, let h, let r, let f): (old, newHost, reused, fresh) = (o, h, r, f)
        }

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
            // A cluster past the old end of the file was never written and reads as zeros,
            // so if the rest of the cluster is zeros only the new bytes need writing.
            if fresh, QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[..<into])),
               QCOW2Device.isZero(UnsafeRawBufferPointer(rebasing: buffer[(into + data.count)...])) {
                try writeBytes(data, to: file, at: newHost + UInt64(into), what: "data")
                // The cluster's last byte too, so the file covers the whole cluster: readers treat
                // a data cluster that ends past the end of the file as broken metadata.
                if into + data.count < Int(g.clusterSize) {
                    try writeBytes(UnsafeRawBufferPointer(rebasing: buffer[(Int(g.clusterSize) - 1)...]), to: file,
                                   at: newHost + g.clusterSize - 1, what: "data")
                }
            } else {
                try writeBytes(UnsafeRawBufferPointer(buffer), to: dataFile ?? file, at: newHost, what: "data")
            }
        } catch {
            _ = try? withMetadataLock { () throws(DeviceError) in
                pendingClusters.value.remove(clusterIndex)
                if !reused && dataFile == nil { try refcounts!.setRefcount(of: newHost, to: 0) }
            }
            throw error
        }

        try withMetadataLock { () throws(DeviceError) in
            defer { pendingClusters.value.remove(clusterIndex) }
            let (l2Offset, index, table) = try writableL2(for: guest)
            guard table.entries[index * entryWords] & ~EntryBits.copied == old & ~EntryBits.copied else {
                throw DeviceError(.io, "qcow2 metadata: the L2 entry of cluster \(clusterIndex) changed during a write")
            }
            try setL2Entry(l2Offset: l2Offset, index: index, entry: newHost | EntryBits.copied,
                           bitmap: g.extendedL2 ? 0xFFFF_FFFF : 0)
            if !reused { try release(old) }
        }
        return true
    }

    /// The stripe of `clusterLocks` for the guest cluster holding `guest`.
    func clusterLock(for guest: UInt64) -> ClusterLock {
        clusterLocks[Int((guest >> UInt64(geometry.clusterBits)) % UInt64(clusterLocks.count))]
    }

    /// Writes `data` into the subclusters it touches of an extended-L2
    /// cluster at `host` (owned), or at a newly allocated cluster when `host`
    /// is nil. Partly touched subclusters keep their other bytes.
    func writeSubclusters(_ data: UnsafeRawBufferPointer, at guest: UInt64, l2Offset: UInt64, index: Int,
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
            waitForInFlight(host + (regionStart - clusterStart)..<host + (regionStart - clusterStart) + UInt64(regionLength))
        }
        if !(offsetInRegion == 0 && data.count == valid) {
            try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<valid]), at: regionStart)
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[offsetInRegion..<offsetInRegion + data.count]).copyMemory(from: data)
        let newHost: UInt64
        if let host { newHost = host } else { newHost = try refcounts!.allocate() }
        try writeBytes(UnsafeRawBufferPointer(buffer), to: dataFile ?? file,
                       at: newHost + (regionStart - clusterStart), what: "data")
        let touched = ((UInt64(1) << (last - first + 1)) - 1) << first
        let newBitmap = (bitmap | touched) & ~(touched << 32)
        try setL2Entry(l2Offset: l2Offset, index: index, entry: newHost | EntryBits.copied, bitmap: newBitmap)
        if host == nil { try release(old) }
    }

    /// Waits until no in-place write or pinned read overlaps `range`. New
    /// in-place writes cannot start meanwhile: they register under
    /// `metadataLock`, which the caller holds. The wait is one pwrite long.
    func waitForInFlight(_ range: Range<UInt64>) {
        while inFlight.withLock({ $0.contains { $0.overlaps(range) } }) {}
    }

    /// Writes whole clusters from `guest` (cluster-aligned) into newly
    /// allocated, host-contiguous clusters, as many as one L2 table maps and
    /// none of which this image owns alone or another write is allocating.
    /// Returns the bytes written: 0 if the first cluster is such a one.
    func writeWholeClusters(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws(DeviceError) -> Int {
        let g = geometry
        let (l2Offset, index, table) = try writableL2(for: guest)
        let limit = min(data.count >> g.clusterBits, g.l2Entries - index)
        var count = 0
        var old: [UInt64] = []
        while count < limit {
            let entry = table.entries[(index + count) * entryWords]
            let owned = entry & EntryBits.compressed == 0 && entry & EntryBits.copied != 0
                && (entry & EntryBits.offsetMask != 0 || dataFile != nil)
            // Owned clusters are written in place, and a cluster another write is
            // allocating must wait for it: both go through writeCluster.
            if owned || pendingClusters.value.contains((guest >> UInt64(g.clusterBits)) + UInt64(count)) { break }
            old.append(entry)
            count += 1
        }
        guard count > 0 else { return 0 }
        let length = count << g.clusterBits
        let host = try dataFile != nil ? guest : refcounts!.allocate(count: count)
        try writeBytes(UnsafeRawBufferPointer(rebasing: data[..<length]), to: dataFile ?? file, at: host, what: "data")
        let bitmap: UInt64 = g.extendedL2 ? 0xFFFF_FFFF : 0
        try setL2Entries(l2Offset: l2Offset, index: index,
                         (0..<count).map { (host + (UInt64($0) << UInt64(g.clusterBits))) | EntryBits.copied },
                         bitmap: bitmap)
        for entry in old { try release(entry) }
        return length
    }

    /// Sets the zero flag (or, with extended L2, every zero bit) on the
    /// cluster at `guest`, keeping an owned host cluster unless `deallocate`.
    func zeroCluster(at guest: UInt64, deallocate: Bool) throws(DeviceError) {
        let (l2Offset, index, table) = try writableL2(for: guest)
        let old = table.entries[index * entryWords]
        let oldHost = old & EntryBits.offsetMask
        var keep = false
        if !deallocate && old & EntryBits.compressed == 0 && (oldHost != 0 || dataFile != nil)
            && old & EntryBits.copied != 0 {
            keep = true
        }
        let hostBits = keep ? oldHost | EntryBits.copied : 0
        if geometry.extendedL2 {
            try setL2Entry(l2Offset: l2Offset, index: index, entry: hostBits, bitmap: 0xFFFF_FFFF << 32)
        } else {
            try setL2Entry(l2Offset: l2Offset, index: index, entry: hostBits | EntryBits.zero, bitmap: 0)
        }
        if !keep { try release(old) }
    }

    /// Sets the zero bits (and clears the allocation bits) of the subclusters
    /// covering bytes [from, to) of the extended-L2 cluster at `clusterStart`;
    /// the host cluster, if any, is kept. False for a compressed cluster.
    func zeroSubclusterBits(in clusterStart: UInt64, from: UInt64, to: UInt64) throws(DeviceError) -> Bool {
        let (l2Offset, index, table) = try writableL2(for: clusterStart)
        let entry = table.entries[index * 2], bitmap = table.entries[index * 2 + 1]
        guard entry & EntryBits.compressed == 0 else { return false }
        let firstUnit = from >> UInt64(geometry.unitBits), count = (to - from) >> UInt64(geometry.unitBits)
        let mask = (count == 32 ? 0xFFFF_FFFF : ((UInt64(1) << count) - 1)) << firstUnit
        try setL2Entry(l2Offset: l2Offset, index: index, entry: entry, bitmap: (bitmap & ~mask) | (mask << 32))
        return true
    }

    /// Makes the cluster at `guest` unallocated (reads from backing, or zeros).
    func deallocateCluster(at guest: UInt64) throws(DeviceError) {
        let g = geometry
        let l1Index = guest / g.bytesPerL2
        let l1Entry = l1Table.withLock { l1Index < UInt64($0.count) ? $0[Int(l1Index)] : 0 }
        guard l1Entry & EntryBits.offsetMask != 0 else { return }  // already unallocated
        let (l2Offset, index, table) = try writableL2(for: guest)
        let old = table.entries[index * entryWords]
        guard old != 0 || (g.extendedL2 && table.entries[index * 2 + 1] != 0) else { return }
        try setL2Entry(l2Offset: l2Offset, index: index, entry: 0, bitmap: 0)
        try release(old)
    }

    /// Drops this image's reference to what an L2 entry pointed to.
    func release(_ entry: UInt64) throws(DeviceError) {
        guard dataFile == nil, let refcounts else { return }  // data file clusters are not refcounted
        if entry & EntryBits.compressed != 0 {
            if case .compressed(let host, let length) = Mapping.decode(entry: entry, bitmap: 0, unit: 0,
                                                                       geometry: geometry) {
                try refcounts.free(host: host, length: UInt64(length))
            }
            return
        }
        let host = entry & EntryBits.offsetMask
        if host != 0 { try refcounts.adjustRefcount(of: host, by: -1) }
    }

    /// The L2 table mapping `guest`, made writable: allocated if missing,
    /// copied if shared with a snapshot. Returns its offset, the entry index
    /// and the current table.
    func writableL2(for guest: UInt64) throws(DeviceError) -> (UInt64, Int, L2Table) {
        let g = geometry
        guard let refcounts else { throw DeviceError(.readOnly, "qcow2 export is read-only") }
        let l1Index = Int(guest / g.bytesPerL2)
        let index = Int((guest % g.bytesPerL2) >> UInt64(g.clusterBits))
        let l1Entry = l1Table.withLock { l1Index < $0.count ? $0[l1Index] : 0 }
        guard l1Index < l1Table.withLock({ $0.count }) else {
            throw DeviceError(.io, "qcow2 metadata: L1 table too small for offset \(guest)")
        }
        var l2Offset = l1Entry & EntryBits.offsetMask
        if l2Offset == 0 {
            let table = L2Table(entries: [UInt64](repeating: 0, count: g.l2Entries * entryWords))
            l2Offset = try refcounts.allocate()
            try writeBytes([UInt8](repeating: 0, count: Int(g.clusterSize)), at: l2Offset, what: "L2 table")
            l2Cache.insert(table, at: l2Offset)
            try setL1Entry(l1Index, l2Offset | EntryBits.copied)
            return (l2Offset, index, table)
        }
        guard l2Offset & (g.clusterSize - 1) == 0 else {
            throw DeviceError(.io, "qcow2 metadata: L1 entry \(l1Index) points to misaligned L2 table at \(l2Offset)")
        }
        let table = try l2Cache.table(at: l2Offset) { () throws(DeviceError) in
            try loadL2Table(at: l2Offset, l1Index: UInt64(l1Index))
        }
        if l1Entry & EntryBits.copied != 0 { return (l2Offset, index, table) }
        if try refcounts.refcount(of: l2Offset) == 1 {
            try setL1Entry(l1Index, l2Offset | EntryBits.copied)
            return (l2Offset, index, table)
        }
        // Shared with a snapshot: copy it. Its clusters' refcounts already count
        // both tables (a snapshot adds one to every cluster it reaches), and none
        // is owned alone, so COPIED is cleared throughout.
        var entries = table.entries
        for i in stride(from: 0, to: entries.count, by: entryWords) { entries[i] &= ~EntryBits.copied }
        let copy = L2Table(entries: entries)
        let newOffset = try refcounts.allocate()
        try writeBytes(copy.bytes, at: newOffset, what: "L2 table")
        l2Cache.insert(copy, at: newOffset)
        try setL1Entry(l1Index, newOffset | EntryBits.copied)
        try refcounts.adjustRefcount(of: l2Offset, by: -1)
        return (newOffset, index, copy)
    }

    func setL1Entry(_ index: Int, _ value: UInt64) throws(DeviceError) {
        try writeBytes(QCOW2Device.bigEndianBytes(value), at: header.l1TableOffset + UInt64(index) * 8, what: "L1 entry")
        l1Table.withLock { $0[index] = value }
    }

    /// Replaces one L2 entry on disk and, as a new table object, in the cache.
    func setL2Entry(l2Offset: UInt64, index: Int, entry: UInt64, bitmap: UInt64) throws(DeviceError) {
        let table = try l2Cache.table(at: l2Offset) { () throws(DeviceError) in
            try loadL2Table(at: l2Offset, l1Index: 0)
        }
        var entries = table.entries
        entries[index * entryWords] = entry
        var bytes = QCOW2Device.bigEndianBytes(entry)
        if geometry.extendedL2 {
            entries[index * 2 + 1] = bitmap
            bytes += QCOW2Device.bigEndianBytes(bitmap)
        }
        try writeBytes(bytes, at: l2Offset + UInt64(index * entryWords * 8), what: "L2 entry")
        l2Cache.insert(L2Table(entries: entries), at: l2Offset)
    }

    /// Replaces consecutive L2 entries from `index` with one write.
    func setL2Entries(l2Offset: UInt64, index: Int, _ newEntries: [UInt64], bitmap: UInt64) throws(DeviceError) {
        let table = try l2Cache.table(at: l2Offset) { () throws(DeviceError) in
            try loadL2Table(at: l2Offset, l1Index: 0)
        }
        var entries = table.entries
        var bytes: [UInt8] = []
        bytes.reserveCapacity(newEntries.count * entryWords * 8)
        for (i, entry) in newEntries.enumerated() {
            entries[(index + i) * entryWords] = entry
            bytes += QCOW2Device.bigEndianBytes(entry)
            if geometry.extendedL2 {
                entries[(index + i) * 2 + 1] = bitmap
                bytes += QCOW2Device.bigEndianBytes(bitmap)
            }
        }
        try writeBytes(bytes, at: l2Offset + UInt64(index * entryWords * 8), what: "L2 entries")
        l2Cache.insert(L2Table(entries: entries), at: l2Offset)
    }

    func writeBytes(_ bytes: [UInt8], at offset: UInt64, what: String) throws(DeviceError) {
        do throws(Errno) {
            try crashSimulator.permitWrite()
            try file.write(bytes: bytes, at: offset)
        } catch {
            throw .system(error, "writing qcow2 \(what) at \(offset)")
        }
    }

    func writeBytes(_ raw: UnsafeRawBufferPointer, to handle: FileHandle, at offset: UInt64,
                    what: String) throws(DeviceError) {
        do throws(Errno) {
            try crashSimulator.permitWrite()
            try handle.write(raw, at: offset)
        } catch {
            throw .system(error, "writing qcow2 \(what) at \(offset)")
        }
    }
}

extension QCOW2Device {
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var words = bytes.count / 8, i = 0
        guard let base = bytes.baseAddress else { return true }
        while words > 0 {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
            words -= 1
        }
        while i < bytes.count {
            if bytes[i] != 0 { return false }
            i += 1
        }
        return true
    }
}

extension L2Table {
    /// The table's on-disk bytes.
    var bytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(entries.count * 8)
        for e in entries { out += QCOW2Device.bigEndianBytes(e) }
        return out
    }
}
