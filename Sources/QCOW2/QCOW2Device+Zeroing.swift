import BlockDevice
import SystemIO

/// Zeroing and deallocating whole clusters, a run at a time: one metadata
/// update (one pwrite of consecutive L2 entries) per L2 table, not one
/// per cluster.
extension QCOW2Device {
    /// How to treat each whole cluster of a run.
    enum ZeroMode {
        /// Set the zero flag (v3), keeping an owned allocation unless `deallocate`.
        case zeroFlag(deallocate: Bool)
        /// Make the cluster unallocated (reads from the backing file, or zeros without one).
        case deallocate
    }

    /// Applies `mode` to up to `count` whole clusters from `start` (cluster
    /// aligned), within one L2 table, leaving alone clusters that already
    /// read as required. Returns how many clusters it handled: fewer than
    /// `count` when it reached a cluster another write is allocating, which
    /// the caller handles alone under that cluster's lock.
    func zeroClusterRun(from start: UInt64, count: Int, mode: ZeroMode) throws(DeviceError) -> Int {
        let g = geometry
        return try withMetadataLock { state throws(DeviceError) -> Int in
            let firstCluster = start >> UInt64(g.clusterBits)
            var handled = 0
            while handled < count && !state.pendingClusters.contains(firstCluster + UInt64(handled)) { handled += 1 }
            guard handled > 0 else { return 0 }
            // A first look at the current table: allocating or copying it is only worth it if something changes.
            let l1Index = Int(start / g.bytesPerL2)
            let index = Int((start % g.bytesPerL2) >> UInt64(g.clusterBits))
            let current = try activeL2(l1Index: l1Index)?.table
            var anyChange = false
            for i in 0..<handled where !anyChange {
                let (entry, bitmap) = current.map { entryAndBitmap($0, index + i) } ?? (0, 0)
                anyChange = try zeroedEntry(entry, bitmap, at: start + (UInt64(i) << UInt64(g.clusterBits)),
                                            mode: mode) != nil
            }
            guard anyChange else { return handled }
            let (l2Offset, first, table) = try writableL2(&state, for: start)
            var span: [(UInt64, UInt64)] = []
            var firstChanged = -1, lastChanged = -1
            var released: [(entry: UInt64, guest: UInt64)] = []
            for i in 0..<handled {
                let (entry, bitmap) = entryAndBitmap(table, first + i)
                let guest = start + (UInt64(i) << UInt64(g.clusterBits))
                span.append((entry, bitmap))
                guard let new = try zeroedEntry(entry, bitmap, at: guest, mode: mode) else { continue }
                span[i] = new
                if firstChanged < 0 { firstChanged = i }
                lastChanged = i
                if new.0 & EntryBits.offsetMask == 0 && !(g.hasDataFile && new.0 & EntryBits.copied != 0) {
                    released.append((entry, guest))
                }
            }
            guard firstChanged >= 0 else { return handled }
            if header.dataFileIsRaw, let dataFile {
                // Only trims get here. The raw data file must keep matching the disk: its clusters
                // read as zeros before the entries say so, and if they can't, nothing changes.
                let from = start + (UInt64(firstChanged) << UInt64(g.clusterBits))
                let length = UInt64(lastChanged - firstChanged + 1) << UInt64(g.clusterBits)
                do throws(Errno) {
                    try dataFile.punchHole(at: from, length: length)
                } catch {
                    return handled
                }
            }
            try setL2Entries(state, l2Offset: l2Offset, index: first + firstChanged, Array(span[firstChanged...lastChanged]))
            for (entry, guest) in released {
                try release(&state, entry)
                if entry & EntryBits.offsetMask != 0 || entry & EntryBits.copied != 0 {
                    discardInDataFile(state, at: guest, length: g.clusterSize)
                }
            }
            return handled
        }
    }

    private func entryAndBitmap(_ table: L2Table, _ index: Int) -> (UInt64, UInt64) {
        geometry.extendedL2 ? (table.entries[index * 2], table.entries[index * 2 + 1]) : (table.entries[index], 0)
    }

    /// The new (entry, bitmap) for a cluster at `guest` under `mode`, or nil
    /// when it already reads as zeros with nothing to deallocate.
    private func zeroedEntry(_ entry: UInt64, _ bitmap: UInt64, at guest: UInt64,
                             mode: ZeroMode) throws(DeviceError) -> (UInt64, UInt64)? {
        let g = geometry
        let noBackingBelow = backing == nil || guest >= backing!.size
        let deallocate: Bool
        switch mode {
        case .zeroFlag(let d): deallocate = d
        case .deallocate: deallocate = true
        }
        var alreadyZero = true
        for unit in 0..<g.unitsPerCluster where alreadyZero {
            switch Mapping.decode(entry: entry, bitmap: bitmap, unit: unit, geometry: g) {
            case .invalid(let reason): throw .corruption("cluster at virtual offset \(guest): \(reason)")
            case .zero: alreadyZero = !deallocate
            case .unallocated: alreadyZero = noBackingBelow
            case .data, .compressed: alreadyZero = false
            }
        }
        // A zero-flagged or unallocated entry may still hold a preallocated host cluster.
        if alreadyZero && deallocate && entry & EntryBits.offsetMask != 0 && !g.hasDataFile { alreadyZero = false }
        if alreadyZero { return nil }
        let new: (UInt64, UInt64)
        switch mode {
        case .deallocate:
            new = (0, 0)
        case .zeroFlag(let deallocate):
            let host = entry & EntryBits.offsetMask
            let keep = !deallocate && entry & EntryBits.compressed == 0 && entry & EntryBits.copied != 0
                && (host != 0 || g.hasDataFile)
            let hostBits = keep ? host | EntryBits.copied : 0
            new = g.extendedL2 ? (hostBits, 0xFFFF_FFFF << 32) : (hostBits | EntryBits.zero, 0)
        }
        return new == (entry, bitmap) ? nil : new
    }

    /// Sets the zero bits (and clears the allocation bits) of the subclusters
    /// covering bytes [from, to) of the extended-L2 cluster at `clusterStart`;
    /// the host cluster, if any, is kept. False for a compressed cluster.
    func zeroSubclusterBits(_ state: inout MetadataState, in clusterStart: UInt64, from: UInt64,
                            to: UInt64) throws(DeviceError) -> Bool {
        let (l2Offset, index, table) = try writableL2(&state, for: clusterStart)
        let entry = table.entries[index * 2], bitmap = table.entries[index * 2 + 1]
        guard entry & EntryBits.compressed == 0 else { return false }
        let firstUnit = from >> UInt64(geometry.unitBits), count = (to - from) >> UInt64(geometry.unitBits)
        let mask = (count == 32 ? 0xFFFF_FFFF : ((UInt64(1) << count) - 1)) << firstUnit
        try setL2Entries(state, l2Offset: l2Offset, index: index, [(entry, (bitmap & ~mask) | (mask << 32))])
        return true
    }
}
