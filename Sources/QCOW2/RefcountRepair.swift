import BlockDevice
import SystemIO

/// Rebuilds the refcounts of a dirty image, as `qemu-img check -r all`
/// would: every cluster reachable from the header, the refcount structures,
/// the snapshot table, and each L1 table (active and snapshots) with its L2
/// tables and data is counted; stored refcounts that differ are rewritten;
/// COPIED flags of the active tables are set to match; then the dirty bit
/// is cleared. Runs once at a read-write open, before any request.
struct RefcountRepair {
    let file: any PositionalFile
    let header: QCOW2Header
    let geometry: Geometry
    let fileSize: UInt64
    let refcounts: RefcountManager

    func run() throws(QCOW2Error) {
        do throws(DeviceError) {
            try repair()
        } catch {
            throw .io(reason: "repairing the refcounts of a dirty image: \(error.reason)")
        }
    }

    private func repair() throws(DeviceError) {
        let cs = geometry.clusterSize
        var expected: [UInt64: UInt64] = [:]  // cluster index -> references
        func count(_ offset: UInt64, _ length: UInt64, times: UInt64 = 1) {
            guard length > 0 else { return }
            var c = offset / cs
            while c <= (offset + length - 1) / cs {
                expected[c, default: 0] += times
                c += 1
            }
        }
        count(0, cs)
        count(header.refcountTableOffset, UInt64(header.refcountTableClusters) * cs)
        for entry in refcounts.table where entry & EntryBits.offsetMask != 0 {
            count(entry & EntryBits.offsetMask, cs)
        }
        let (snapshots, tableLength) = try open { () throws(QCOW2Error) in
            try QCOW2Device.readSnapshotTable(file, header: header, fileSize: fileSize)
        }
        count(header.snapshotsOffset, UInt64(tableLength))
        try countBitmaps(count)
        // Each reference counts, but each distinct L1 and L2 table is read
        // once, with how many times it is referenced: thousands of snapshots
        // may share one table.
        let active = TableExtent(offset: header.l1TableOffset, entries: Int(header.l1Size))
        var l1Tables: [TableExtent: UInt64] = [active: 1]
        for snapshot in snapshots {
            l1Tables[TableExtent(offset: snapshot.l1TableOffset, entries: Int(snapshot.l1Size)), default: 0] += 1
        }
        var l2Tables: [UInt64: UInt64] = [:]
        for (l1, references) in l1Tables {
            if case .failure(let problem) = QCOW2Header.validateTable(
                offset: l1.offset, entries: UInt64(l1.entries), fileSize: fileSize, clusterSize: cs,
                maximumEntries: QCOW2Header.maximumL1Entries) {
                throw DeviceError(.io, "L1 table at \(l1.offset): \(problem.text)")
            }
            count(l1.offset, UInt64(l1.entries) * 8, times: references)
            let entries = try open { () throws(QCOW2Error) in
                try QCOW2Device.readTable(file, at: l1.offset, entries: l1.entries)
            }
            for l1Entry in entries where l1Entry & EntryBits.offsetMask != 0 {
                l2Tables[l1Entry & EntryBits.offsetMask, default: 0] += references
            }
        }
        for (l2, references) in l2Tables {
            count(l2, cs, times: references)
            for (entry, _) in try entries(ofL2At: l2) {
                if entry & EntryBits.compressed != 0 {
                    if case .compressed(let host, let length) = Mapping.decode(entry: entry, bitmap: 0, unit: 0,
                                                                               geometry: geometry) {
                        count(host & ~511, UInt64(length) + (host & 511), times: references)
                    }
                } else if !geometry.hasDataFile, entry & EntryBits.offsetMask != 0 {
                    count(entry & EntryBits.offsetMask, cs, times: references)
                }
            }
        }
        // Rewrite what differs. New refcount blocks land past the old end and count themselves.
        var end = (fileSize + cs - 1) / cs
        // With lazy refcounts nothing syncs the file's extension over a reserve before the L2
        // entries naming it, so a power cut can keep entries past the end (qemu-img check: an
        // error). The file is extended over them; they read as zeros, as unflushed data may.
        // Only as far as two refills reach: anything further is a hostile image, left alone.
        if let last = expected.keys.filter({ $0 < end + 2 * refcounts.maximumReserve }).max(), last >= end {
            try refcounts.extendFile(to: (last + 1) * cs)
            end = last + 1
        }
        for cluster in 0..<end {
            let want = expected[cluster] ?? 0
            if try refcounts.refcount(of: cluster * cs) != want { try refcounts.setRefcount(of: cluster * cs, to: want) }
        }
        try fixCopiedFlags()
        do throws(Errno) {
            try file.sync()
            let features = header.incompatibleFeatures.subtracting(.dirty).rawValue
            try file.write(bytes: QCOW2Device.bigEndianBytes(features), at: 72)
            try file.sync()
        } catch {
            throw .system(error, "clearing the dirty bit")
        }
    }

    /// The bitmap directory, each bitmap's table and its data clusters, as
    /// `qemu-img check` counts them; in-use (inconsistent) bitmaps too, since
    /// their clusters stay allocated until someone removes them. A stale
    /// extension (autoclear bit clear: a program without bitmap support wrote
    /// the image and may have reused those clusters) names nothing, as for qemu.
    private func countBitmaps(_ count: (UInt64, UInt64, UInt64) -> Void) throws(DeviceError) {
        guard header.hasBitmapsExtension, header.autoclearFeatures & 1 != 0, header.bitmapCount > 0 else { return }
        let cs = geometry.clusterSize
        let offset = header.bitmapDirectoryOffset, size = header.bitmapDirectorySize
        func refuse(_ what: String) -> DeviceError {
            DeviceError(.io, "the image is dirty and \(what); run 'qemu-img check -r all'")
        }
        guard Bitmaps.directoryIsPlaced(offset: offset, size: size, fileSize: fileSize, clusterSize: cs) else {
            throw refuse("its bitmap directory is misplaced")
        }
        let directory = try open { () throws(QCOW2Error) in
            try QCOW2Device.readBytes(file, at: offset, count: Int(size))
        }
        guard let entries = Bitmaps.parseDirectory(directory, count: Int(header.bitmapCount)) else {
            throw refuse("its bitmap directory is malformed")
        }
        count(offset, size, 1)
        for entry in entries {
            guard Bitmaps.tableIsPlaced(entry, fileSize: fileSize, clusterSize: cs) else {
                throw refuse("the table of bitmap '\(entry.name)' is misplaced")
            }
            count(entry.tableOffset, UInt64(entry.tableSize) * 8, 1)
            let table = try open { () throws(QCOW2Error) in
                try QCOW2Device.readTable(file, at: entry.tableOffset, entries: Int(entry.tableSize))
            }
            for tableEntry in table {
                let host = tableEntry & Bitmaps.tableOffsetMask
                guard host != 0 else { continue }
                guard Bitmaps.dataClusterIsPlaced(host, fileSize: fileSize, clusterSize: cs) else {
                    throw refuse("bitmap '\(entry.name)' names a data cluster at \(host)")
                }
                count(host, cs, 1)
            }
        }
    }

    /// Sets COPIED in the active L1 and L2 tables exactly where the refcount is 1.
    private func fixCopiedFlags() throws(DeviceError) {
        let l1 = try open { () throws(QCOW2Error) in
            try QCOW2Device.readTable(file, at: header.l1TableOffset, entries: Int(header.l1Size))
        }
        let words = geometry.extendedL2 ? 2 : 1
        for (index, l1Entry) in l1.enumerated() {
            let l2 = l1Entry & EntryBits.offsetMask
            guard l2 != 0 else { continue }
            let l1Want = try refcounts.refcount(of: l2) == 1 ? l2 | EntryBits.copied : l2
            if l1Want != l1Entry {
                try write(QCOW2Device.bigEndianBytes(l1Want), at: header.l1TableOffset + UInt64(index) * 8)
            }
            for (i, (entry, _)) in try entries(ofL2At: l2).enumerated() where entry & EntryBits.compressed == 0 {
                let host = entry & EntryBits.offsetMask
                guard host != 0 || (geometry.hasDataFile && entry & EntryBits.copied != 0) else { continue }
                let owned = geometry.hasDataFile ? true : try refcounts.refcount(of: host) == 1
                let want = owned ? entry | EntryBits.copied : entry & ~EntryBits.copied
                if want != entry { try write(QCOW2Device.bigEndianBytes(want), at: l2 + UInt64(i * words * 8)) }
            }
        }
    }

    /// Where an L1 table lies, to read tables shared by snapshots once.
    private struct TableExtent: Hashable {
        var offset: UInt64
        var entries: Int
    }

    private func entries(ofL2At offset: UInt64) throws(DeviceError) -> [(UInt64, UInt64)] {
        guard offset & (geometry.clusterSize - 1) == 0, offset < fileSize else {
            throw DeviceError(.io, "L2 table at \(offset) is misaligned or past the end")
        }
        let words = geometry.extendedL2 ? 2 : 1
        let table = try open { () throws(QCOW2Error) in
            try QCOW2Device.readTable(file, at: offset, entries: Int(geometry.clusterSize / 8))
        }
        return stride(from: 0, to: table.count, by: words).map { (table[$0], words == 2 ? table[$0 + 1] : 0) }
    }

    private func write(_ bytes: [UInt8], at offset: UInt64) throws(DeviceError) {
        do throws(Errno) { try file.write(bytes: bytes, at: offset) } catch {
            throw .system(error, "writing repaired metadata at \(offset)")
        }
    }

    private func open<T>(_ body: () throws(QCOW2Error) -> T) throws(DeviceError) -> T {
        do { return try body() } catch { throw DeviceError(.io, error.description) }
    }
}
