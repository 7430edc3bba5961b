import BlockDevice
import SystemIO

/// Finding, allocating and updating L1 and L2 tables, and the two ways
/// bytes reach the files: metadata writes and (overlap-checked) data writes.
extension QCOW2Device {
    /// The L2 table of the active L1 entry `l1Index`, or nil when unallocated
    /// (or past the table). Every path goes through here, so every path
    /// checks the table's alignment and place.
    func activeL2(l1Index: Int) throws(DeviceError) -> (offset: UInt64, entry: UInt64, table: L2Table)? {
        let l1Entry = l1Table.entry(at: l1Index)
        let offset = l1Entry & EntryBits.offsetMask
        guard offset != 0 else { return nil }
        guard offset & (geometry.clusterSize - 1) == 0 else {
            throw .corruption("L1 entry \(l1Index) points to misaligned L2 table at \(offset)")
        }
        let table = try l2Cache.table(at: offset) { () throws(DeviceError) in
            try loadL2Table(at: offset, l1Index: UInt64(l1Index))
        }
        return (offset, l1Entry, table)
    }

    /// The L2 table mapping `guest`, made writable: allocated if missing,
    /// copied if shared with a snapshot. Returns its offset, the entry index
    /// and the current table.
    func writableL2(_ state: inout MetadataState, for guest: UInt64) throws(DeviceError) -> (UInt64, Int, L2Table) {
        let g = geometry
        guard let refcounts = state.refcounts else { throw DeviceError(.readOnly, "qcow2 export is read-only") }
        let l1Index = Int(guest / g.bytesPerL2)
        let index = Int((guest % g.bytesPerL2) >> UInt64(g.clusterBits))
        guard l1Index < l1Table.count else {
            throw .corruption("L1 table too small for offset \(guest)")
        }
        guard let (l2Offset, l1Entry, table) = try activeL2(l1Index: l1Index) else {
            let table = L2Table(entries: [UInt64](repeating: 0, count: g.l2Entries * entryWords))
            let l2Offset = try newL2Table(&state, table, empty: true, l1Index: l1Index)
            return (l2Offset, index, table)
        }
        if l1Entry & EntryBits.copied != 0 { return (l2Offset, index, table) }
        if try refcounts.refcount(of: l2Offset) == 1 {
            // Only the COPIED flag changes: no ordering to keep.
            try writeMetadata(QCOW2Device.bigEndianBytes(l2Offset | EntryBits.copied),
                              at: header.l1TableOffset + UInt64(l1Index) * 8, what: "L1 entry")
            state.l1Writer.store(l2Offset | EntryBits.copied, at: l1Index)
            return (l2Offset, index, table)
        }
        // Shared with a snapshot: copy it. Its clusters' refcounts already count
        // both tables (a snapshot adds one to every cluster it reaches), and none
        // is owned alone, so COPIED is cleared throughout.
        var entries = table.entries
        for i in stride(from: 0, to: entries.count, by: entryWords) { entries[i] &= ~EntryBits.copied }
        let copy = L2Table(entries: entries)
        let newOffset = try newL2Table(&state, copy, empty: false, l1Index: l1Index)
        // The old table is no longer active: out of the overlap check, and its
        // reference dropped once the L1 entry naming the copy is durable.
        metadataMap?.remove(l2Offset, length: g.clusterSize)
        state.deferred.releases.append(l2Offset)  // refcounted even with a data file, unlike guest clusters
        return (newOffset, index, copy)
    }

    /// Allocates a cluster for an L2 table, writes `table` there, syncs, and
    /// points L1 entry `l1Index` at it: a power cut must not leave an L1
    /// entry naming a table whose contents never reached the disk. An
    /// `empty` table in a fresh cluster skips the sync: the cluster reads as
    /// zeros, an empty table, even if the write is lost, because the file's
    /// extension over it was synced with its refcount (not so with lazy
    /// refcounts). The sync would write back every dirty page of the file
    /// under the lock (0.1 s per 512 MiB of sequential writes).
    private func newL2Table(_ state: inout MetadataState, _ table: L2Table, empty: Bool,
                            l1Index: Int) throws(DeviceError) -> UInt64 {
        let run = try allocateClusters(&state, upTo: 1)
        let offset = run.host
        metadataMap?.insert(offset, length: geometry.clusterSize)
        do {
            try writeMetadata(table.bytes, at: offset, what: "L2 table")
            if !(empty && run.fresh && !header.lazyRefcounts) { try syncImage() }
        } catch {
            metadataMap?.remove(offset, length: geometry.clusterSize)
            unallocate(&state, host: offset, count: 1)
            throw error
        }
        l2Cache.insert(table, at: offset)
        let entry = offset | EntryBits.copied
        try writeMetadata(QCOW2Device.bigEndianBytes(entry), at: header.l1TableOffset + UInt64(l1Index) * 8,
                          what: "L1 entry")
        state.l1Writer.store(entry, at: l1Index)
        return offset
    }

    /// Replaces consecutive L2 entries (entry, bitmap) from `index` with one
    /// write, on disk and, as a new table object, in the cache. `state` is
    /// only the proof that the lock is held: two writers of one table would lose an update.
    func setL2Entries(_ state: borrowing MetadataState, l2Offset: UInt64, index: Int, _ newEntries: [(UInt64, UInt64)]) throws(DeviceError) {
        let table = try l2Cache.table(at: l2Offset) { () throws(DeviceError) in
            try loadL2Table(at: l2Offset, l1Index: 0)
        }
        var entries = table.entries
        var bytes: [UInt8] = []
        bytes.reserveCapacity(newEntries.count * entryWords * 8)
        for (i, (entry, bitmap)) in newEntries.enumerated() {
            entries[(index + i) * entryWords] = entry
            bytes += QCOW2Device.bigEndianBytes(entry)
            if geometry.extendedL2 {
                entries[(index + i) * 2 + 1] = bitmap
                bytes += QCOW2Device.bigEndianBytes(bitmap)
            }
        }
        try writeMetadata(bytes, at: l2Offset + UInt64(index * entryWords * 8), what: "L2 entries")
        l2Cache.insert(L2Table(entries: entries), at: l2Offset)
    }

    /// Writes metadata to the image file (never overlap-checked: it is the metadata).
    func writeMetadata(_ bytes: [UInt8], at offset: UInt64, what: String) throws(DeviceError) {
        try file.writeMetadata(bytes, at: offset, what: what)
    }

    /// Makes the guest data written so far durable.
    func syncData() throws(DeviceError) {
        do throws(Errno) { try dataTarget.sync() } catch { throw .system(error, "fdatasync") }
    }

    /// Writes guest data to a host offset: the data file, or the image file
    /// through the overlap check.
    func writeData(_ raw: UnsafeRawBufferPointer, at offset: UInt64) throws(DeviceError) {
        do throws(Errno) {
            try dataTarget.write(raw, at: offset)
        } catch {
            throw .system(error, "writing qcow2 data at \(offset)")
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

extension PositionalFile {
    /// Writes qcow2 metadata, naming what it is in the error; shared by the
    /// device and the refcount manager, which own the same image file.
    func writeMetadata(_ bytes: [UInt8], at offset: UInt64, what: String) throws(DeviceError) {
        do throws(Errno) {
            try write(bytes: bytes, at: offset)
        } catch {
            throw .system(error, "writing qcow2 \(what) at \(offset)")
        }
    }
}
