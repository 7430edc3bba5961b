import BlockDevice
import SystemIO

/// The power-loss order of metadata writes (qemu orders its caches the same way):
/// - a refcount increase is synced before any L1 or L2 entry names the
///   cluster: clusters come from a reserve whose refcounts were raised and
///   synced beforehand (`RefcountManager.claimFree`), one sync per batch;
///   sequential writers claim the next batch ahead and sync it outside the
///   lock (`claimAhead`), adding it to the reserve only once synced;
/// - a new L2 table's contents are synced before the L1 entry naming it
///   (`QCOW2Device.newL2Table`; as qemu's l2_allocate, one sync per table);
/// - a refcount decrease waits until the L2 or L1 entry that dropped the
///   reference is synced, and the cluster is not reused before: releases
///   are deferred to the next sync point (`commit`).
/// A power cut then leaves at worst leaked clusters, and a killed process
/// loses no completed write.
struct DeferredMetadata {
    /// Entries (L2 entries, or L2 tables as plain entries) whose references were dropped.
    var releases: [UInt64] = []
}

extension QCOW2Device {
    /// Releases deferred beyond this many trigger a sync point, bounding
    /// the memory and the space held back when a client never flushes.
    static let maximumDeferredReleases = 4096

    /// Up to `count` host-contiguous new clusters with refcount 1 on disk
    /// (synced, unless lazy refcounts), and whether they read as zeros.
    func allocateClusters(_ state: inout MetadataState,
                          upTo count: Int) throws(DeviceError) -> (host: UInt64, count: Int, fresh: Bool) {
        let refcounts = state.refcounts!
        if let run = refcounts.take(upTo: count) { return run }
        try commit(&state, refill: count)
        guard let run = refcounts.take(upTo: count) else { throw DeviceError(.noSpace, "qcow2: no cluster to allocate") }
        return run
    }

    /// When the reserve runs low, claims the next refill (refcounts raised,
    /// not yet synced) for `syncClaimed` to sync outside the lock: a refill's
    /// sync writes back every dirty page of the file, and under the lock it
    /// stalls every writer. Nil when not needed, already under way, or with
    /// lazy refcounts (nothing to sync). A failed claim is left to the next
    /// `allocateClusters` to report.
    func claimAhead(_ state: inout MetadataState) -> [RefcountManager.Run]? {
        guard !header.lazyRefcounts, !state.refillInFlight, let refcounts = state.refcounts,
              refcounts.reserveIsLow, let runs = try? refcounts.claimFree(minimum: 1) else { return nil }
        state.refillInFlight = true
        return runs
    }

    /// Syncs a refill from `claimAhead` and only then adds it to the reserve,
    /// so no L2 entry can name a cluster before its refcount is durable.
    func syncClaimed(_ runs: [RefcountManager.Run]) {
        let synced = (try? syncImage()) != nil
        _ = try? withMetadataLock { state throws(DeviceError) in
            state.refillInFlight = false
            if synced { state.refcounts?.addToReserve(runs) } else { state.refcounts?.unclaim(runs) }
        }
    }

    /// Gives clusters from `allocateClusters` back when their data write failed.
    func unallocate(_ state: inout MetadataState, host: UInt64, count: Int) {
        state.refcounts?.giveBack(host: host, count: count)
    }

    /// Drops this image's reference to what an L2 entry pointed to: at the
    /// next sync point, once the entry's new value is durable. Data file
    /// clusters are not refcounted (see `discardInDataFile`).
    func release(_ state: inout MetadataState, _ entry: UInt64) throws(DeviceError) {
        guard state.refcounts != nil, dataFile == nil else { return }
        guard entry & EntryBits.offsetMask != 0 || entry & EntryBits.compressed != 0 else { return }
        state.deferred.releases.append(entry)
        if state.deferred.releases.count >= QCOW2Device.maximumDeferredReleases { try commit(&state) }
    }

    /// Gives a deallocated data file range back to the host file system, at
    /// once: a power cut before the L2 entry is durable leaves it naming
    /// zeros, which a trimmed or zeroed range may read as. Under the
    /// metadata lock (`state` is only the proof), so no new write to the range can come first.
    func discardInDataFile(_ state: borrowing MetadataState, at guest: UInt64, length: UInt64) {
        guard let dataFile, !header.dataFileIsRaw else { return }
        try? dataFile.punchHole(at: guest, length: length)
    }

    /// A sync point: syncs what was written, applies
    /// the refcount decreases that waited for it, punches the freed clusters
    /// out of the file, and refills the allocator's reserve with at least
    /// `refill` clusters (synced before use). With `durable`, everything is
    /// on disk when it returns (a flush).
    func commit(_ state: inout MetadataState, refill: Int = 0, durable: Bool = false) throws(DeviceError) {
        guard let refcounts = state.refcounts else { return }
        let lazy = header.lazyRefcounts
        if durable || !state.deferred.releases.isEmpty { try syncImage() }
        var unsynced = false
        var freed: [UInt64] = []
        while let entry = state.deferred.releases.last {
            if entry & EntryBits.compressed != 0 {
                if case .compressed(let host, let length) = Mapping.decode(entry: entry, bitmap: 0, unit: 0,
                                                                           geometry: geometry) {
                    var cluster = host & ~(geometry.clusterSize - 1)
                    while cluster < host + UInt64(length) {
                        if try refcounts.adjustRefcount(of: cluster, by: -1) == 0 { freed.append(cluster) }
                        cluster += geometry.clusterSize
                    }
                }
            } else if try refcounts.adjustRefcount(of: entry & EntryBits.offsetMask, by: -1) == 0 {
                freed.append(entry & EntryBits.offsetMask)
            }
            state.deferred.releases.removeLast()
            unsynced = true
        }
        punch(freed, refcounts: refcounts)
        if refill > 0 {
            if lazy && !dirtyBitSet.load(ordering: .relaxed) { try setDirty(&state, true) }
            let runs = try refcounts.claimFree(minimum: refill)
            if !lazy {
                do {
                    try syncImage()  // the new refcounts before any L2 entry naming them
                } catch {
                    refcounts.unclaim(runs)
                    throw error
                }
            }
            refcounts.addToReserve(runs)
            unsynced = true
        } else if durable && unsynced {
            try syncImage()
        }
    }

    /// Deallocates freed host clusters in the image file, as qemu does with
    /// discard=unmap, so trimmed space goes back to the host file system.
    /// Clusters with reads or in-place writes in flight are skipped.
    private func punch(_ clusters: [UInt64], refcounts: RefcountManager) {
        let size = geometry.clusterSize
        var start: UInt64 = 0, length: UInt64 = 0
        func flush() {
            if length > 0 { try? file.punchHole(at: start, length: length) }
            length = 0
        }
        // isUnavailable covers metadata too: a hostile image's metadata cluster with a
        // refcount dropping to 0 is left alone.
        for host in clusters.sorted() where !refcounts.isUnavailable(host) {
            if length > 0 && start + length == host { length += size } else {
                flush()
                start = host
                length = size
            }
        }
        flush()
    }

    /// Sets or clears the dirty bit (lazy refcounts), synced: set before any
    /// refcount may lag behind the L2 tables, cleared once they agree again.
    /// `state` is only the proof that the lock is held.
    func setDirty(_ state: inout MetadataState, _ on: Bool) throws(DeviceError) {
        dirtyBitSet.store(on, ordering: .relaxed)
        try writeFeatures()
        try syncImage()
    }

    /// Writes the incompatible feature bits: the header's, with dirty and corrupt as they stand now.
    func writeFeatures() throws(DeviceError) {
        var features = header.incompatibleFeatures.subtracting([.dirty, .corrupt])
        if dirtyBitSet.load(ordering: .relaxed) { features.insert(.dirty) }
        if markedCorrupt.load(ordering: .relaxed) { features.insert(.corrupt) }
        try writeMetadata(QCOW2Device.bigEndianBytes(features.rawValue), at: 72, what: "header")
    }

    func syncImage() throws(DeviceError) {
        do throws(Errno) { try file.sync() } catch { throw .system(error, "fdatasync") }
    }

    /// At close: everything deferred is written, the unused reserve freed
    /// (and punched), and a lazy image's dirty bit cleared.
    func closeMetadata() {
        guard writable else { return }
        try? dataFile?.sync()
        try? withMetadataLock { state throws(DeviceError) in
            guard let refcounts = state.refcounts else { return }
            try commit(&state, durable: true)
            var released: [UInt64] = []
            for run in refcounts.reserve {
                for c in run.first..<run.first + run.count { released.append(c << UInt64(geometry.clusterBits)) }
            }
            try refcounts.releaseReserve()
            punch(released, refcounts: refcounts)
            try syncImage()
            if dirtyBitSet.load(ordering: .relaxed) && !markedCorrupt.load(ordering: .relaxed) {
                try setDirty(&state, false)
            }
        }
    }

    /// Marks the image corrupt (spec, incompatible bit 1), so that qemu
    /// refuses to write it until repaired; writes here are refused from now on.
    func markCorrupt() {
        guard !markedCorrupt.exchange(true, ordering: .relaxed), header.version >= 3 else { return }
        try? writeFeatures()
        try? syncImage()
    }

    /// Records the host clusters of an image's metadata for the overlap check.
    static func mapMetadata(_ map: MetadataMap, file: any PositionalFile, header: QCOW2Header, l1Table: [UInt64],
                            l1Offset: UInt64, snapshots: [QCOW2Snapshot], fileSize: UInt64) throws(QCOW2Error) {
        let clusterSize = header.clusterSize
        map.insert(0, length: clusterSize)
        map.insert(l1Offset, length: UInt64(l1Table.count) * 8)
        // Tables past the end of the file are broken metadata, found when used; not mapped.
        for entry in l1Table where entry & EntryBits.offsetMask != 0 && entry & EntryBits.offsetMask < fileSize {
            map.insert(entry & EntryBits.offsetMask, length: clusterSize)
        }
        for snapshot in snapshots where snapshot.l1TableOffset < fileSize {
            map.insert(snapshot.l1TableOffset, length: min(UInt64(snapshot.l1Size) * 8, fileSize - snapshot.l1TableOffset))
        }
        if header.snapshotCount > 0 {
            let length = try readSnapshotTable(file, header: header, fileSize: fileSize).length
            map.insert(header.snapshotsOffset, length: UInt64(length))
        }
        if header.hasBitmapsExtension && header.bitmapDirectoryOffset < fileSize {
            map.insert(header.bitmapDirectoryOffset,
                       length: min(header.bitmapDirectorySize, fileSize - header.bitmapDirectoryOffset))
        }
    }
}

extension DeviceError {
    /// Metadata found inconsistent: an I/O error that marks the image corrupt.
    static func corruption(_ what: String) -> DeviceError {
        var error = DeviceError(.io, "qcow2 metadata: \(what)")
        error.isCorruption = true
        return error
    }
}
