import BlockDevice
import Synchronization
import SystemIO

/// Reading and writing one refcount block entry of any width (spec, "Host
/// cluster management"). Pure, so it can be tested for every order.
enum RefcountEntry {
    /// The refcount at `index` of a block with 2^`order`-bit entries.
    static func get(_ block: [UInt8], index: Int, order: Int) -> UInt64 {
        let bits = 1 << order
        switch order {
        case 0...2:
            let bit = index * bits
            return UInt64(block[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(bits)) - 1)
        default:
            let bytes = bits / 8
            var value: UInt64 = 0
            for i in 0..<bytes { value = value << 8 | UInt64(block[index * bytes + i]) }
            return value
        }
    }

    /// Stores `value` at `index`; returns the byte range that changed.
    static func set(_ block: inout [UInt8], index: Int, order: Int, value: UInt64) -> Range<Int> {
        let bits = 1 << order
        switch order {
        case 0...2:
            let bit = index * bits
            let mask = UInt8(truncatingIfNeeded: (1 << bits) - 1) << UInt8(bit % 8)
            block[bit / 8] = (block[bit / 8] & ~mask) | (UInt8(truncatingIfNeeded: value) << UInt8(bit % 8) & mask)
            return bit / 8..<bit / 8 + 1
        default:
            let bytes = bits / 8
            for i in 0..<bytes {
                block[index * bytes + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (bytes - 1 - i)))
            }
            return index * bytes..<(index + 1) * bytes
        }
    }

    static func maximum(order: Int) -> UInt64 { order == 6 ? .max : (1 << UInt64(1 << order)) - 1 }
}

/// Clusters the allocator handed out and clusters whose refcount reached zero.
final class AllocationCounters: Sendable {
    let allocated = Atomic<UInt64>(0)
    let freed = Atomic<UInt64>(0)
}

/// The refcount table and blocks of a writable image, and the cluster
/// allocator built on them. Not thread-safe: a device reaches it only
/// through its `MetadataState`, inside the metadata lock. (`@unchecked`
/// so that the state can live in a `Locked`.)
///
/// Power-loss order (spec, "Host cluster management"; qemu orders its
/// caches the same way): a refcount block is on disk (synced) before the
/// table points to it, a new table before the header points to it, and the
/// header before the old table is freed. Clusters are handed out from a
/// reserve whose refcounts were raised and synced beforehand
/// (`claimFree`), so an L2 entry never reaches the disk before the
/// refcount of the cluster it names, and one fdatasync covers a whole batch
/// of allocations. A power cut leaks at most the unused reserve.
final class RefcountManager: @unchecked Sendable {
    let file: any PositionalFile
    let clusterBits: Int
    let clusterSize: UInt64
    let order: Int
    /// Entries per refcount block.
    let entriesPerBlock: UInt64
    private(set) var tableOffset: UInt64
    private(set) var table: [UInt64]
    /// Refcount blocks live in the chain's shared cache, under this owner tag.
    private let cache: MetadataCache
    private let cacheOwner: UInt64
    /// First cluster-aligned offset past the end of the file's allocations.
    private(set) var fileEnd: UInt64
    /// No free cluster lies below this cluster index.
    private var freeCursor: UInt64 = 0
    /// Clusters the allocator must skip whatever their refcount: I/O in
    /// flight outside the lock, or metadata (overlap protection).
    var isUnavailable: (UInt64) -> Bool = { _ in false }
    /// Metadata clusters this manager creates or frees (refcount blocks and tables).
    let metadata: MetadataMap?
    /// Set when a refcount table move failed after the header may name the
    /// new table; refcounts are then left alone.
    private var broken = false
    /// While a table move runs: what it changed, so that a failure before the
    /// header names the new table can be undone.
    private var moveLog: MoveLog?

    private struct MoveLog {
        /// Refcounts set, with the value before, in order.
        var changed: [(host: UInt64, previous: UInt64)] = []
        /// Refcount blocks created (named only by the new table).
        var createdBlocks: [UInt64] = []
        /// Where the new table goes, once chosen.
        var newTable: Range<UInt64>?
        /// The header write was attempted: the new table may be live.
        var headerWritten = false
    }
    /// Read for metrics without the lock.
    let counters = AllocationCounters()

    /// A run of clusters whose refcount is already 1. `fresh` runs lie past
    /// anything ever written, so they read as zeros.
    struct Run: Equatable {
        var first: UInt64
        var count: UInt64
        var fresh: Bool
    }
    private(set) var reserve: [Run] = []
    /// How many clusters the next refill asks for; doubles up to `maximumReserve`.
    private var reserveTarget: UInt64
    let maximumReserve: UInt64

    init(file: any PositionalFile, header: QCOW2Header, fileSize: UInt64, metadata: MetadataMap?,
         cache: MetadataCache, cacheOwner: UInt64) throws(QCOW2Error) {
        self.file = file
        self.metadata = metadata
        self.cache = cache
        self.cacheOwner = cacheOwner
        clusterBits = Int(header.clusterBits)
        clusterSize = header.clusterSize
        order = Int(header.refcountOrder)
        entriesPerBlock = (clusterSize * 8) >> UInt64(order)
        tableOffset = header.refcountTableOffset
        table = try QCOW2Device.readTable(file, at: header.refcountTableOffset,
                                          entries: Int(UInt64(header.refcountTableClusters) * clusterSize / 8))
        fileEnd = (fileSize + clusterSize - 1) & ~(clusterSize - 1)
        // 256 KiB first, growing to 256 MiB (or 64 clusters): each refill's sync also writes
        // back every dirty page of the file, so streaming writes want few of them; a power
        // cut leaks at most the unused part, counted but never written (sparse).
        reserveTarget = max(4, (256 << 10) >> UInt64(clusterBits))
        maximumReserve = max(64, (256 << 20) >> UInt64(clusterBits))
        metadata?.insert(tableOffset, length: UInt64(header.refcountTableClusters) * clusterSize)
        // Blocks past the end of the file are broken metadata, found when used; not mapped.
        for entry in table where entry & EntryBits.offsetMask != 0 && entry & EntryBits.offsetMask < fileSize {
            metadata?.insert(entry & EntryBits.offsetMask, length: clusterSize)
        }
    }

    // MARK: - Reading

    private func cacheKey(_ offset: UInt64) -> MetadataCache.Key { .init(owner: cacheOwner, offset: offset) }

    /// The refcount block at `offset`, from the cache or the file. Only
    /// called under the metadata lock, so no other thread loads it meanwhile.
    private func block(at offset: UInt64) throws(DeviceError) -> RefcountBlock {
        let (cached, generation) = cache.lookup(cacheKey(offset))
        if case .refcounts(let block)? = cached { return block }
        guard offset & (clusterSize - 1) == 0, offset + clusterSize <= fileEnd else {
            throw .corruption("refcount block at \(offset) is misaligned or past the end")
        }
        let bytes: [UInt8]
        do throws(Errno) {
            bytes = try file.read(count: Int(clusterSize), at: offset, zeroFillPastEOF: true)
        } catch {
            throw .system(error, "reading qcow2 refcount block at \(offset)")
        }
        let block = RefcountBlock(bytes)
        guard case .refcounts(let cachedBlock) = cache.storeLoaded(.refcounts(block), for: cacheKey(offset),
                                                                   generation: generation) else { return block }
        return cachedBlock
    }

    /// The refcount of the cluster holding host offset `host`.
    func refcount(of host: UInt64) throws(DeviceError) -> UInt64 {
        let cluster = host >> UInt64(clusterBits)
        let tableIndex = cluster / entriesPerBlock
        guard tableIndex < UInt64(table.count) else { return 0 }
        let blockOffset = table[Int(tableIndex)] & EntryBits.offsetMask
        guard blockOffset != 0 else { return 0 }
        return RefcountEntry.get(try block(at: blockOffset).bytes, index: Int(cluster % entriesPerBlock), order: order)
    }

    // MARK: - Writing

    /// Sets the refcount of the cluster at `host`, creating its refcount
    /// block (and growing the table) when needed.
    func setRefcount(of host: UInt64, to value: UInt64) throws(DeviceError) {
        _ = try setRefcounts(ofClusters: host >> UInt64(clusterBits), count: 1, to: value)
    }

    /// Sets the refcount of the clusters from index `first` to `value`: up to
    /// `count` of them, as many as its refcount block covers, in one write (a
    /// reserve refill is thousands of clusters, each a pwrite otherwise).
    /// Returns how many. All or none: a failed write leaves memory as before.
    func setRefcounts(ofClusters first: UInt64, count: UInt64, to value: UInt64) throws(DeviceError) -> UInt64 {
        guard !broken else {
            throw DeviceError(.io, "qcow2: the refcount table could not be moved; writes are refused until reopened")
        }
        guard value <= RefcountEntry.maximum(order: order) else {
            throw DeviceError(.io, "qcow2: refcount \(value) overflows \(1 << order) bits")
        }
        let blockOffset = try ensureBlock(forCluster: first)
        // Changed in place and written through at once: the cached block is
        // never dirty, so the cache may drop it at any time.
        let block = try block(at: blockOffset)
        let start = Int(first % entriesPerBlock)
        let n = Int(min(count, entriesPerBlock - UInt64(start)))
        let bits = 1 << order
        let changed = start * bits / 8..<((start + n) * bits + 7) / 8
        let before = Array(block.bytes[changed])
        if moveLog != nil {
            for i in 0..<n {
                let previous = RefcountEntry.get(block.bytes, index: start + i, order: order)
                moveLog!.changed.append(((first + UInt64(i)) << UInt64(clusterBits), previous))
            }
        }
        for i in start..<start + n { _ = RefcountEntry.set(&block.bytes, index: i, order: order, value: value) }
        do {
            try file.writeMetadata(Array(block.bytes[changed]), at: blockOffset + UInt64(changed.lowerBound),
                                   what: "refcount")
        } catch {
            // Keep memory equal to the disk, so a failed write (ENOSPC, EIO) leaves nothing inconsistent.
            block.bytes.replaceSubrange(changed, with: before)
            if moveLog != nil { moveLog!.changed.removeLast(n) }
            throw error
        }
        if value == 0 { freeCursor = min(freeCursor, first) }
        return UInt64(n)
    }

    /// Adds `delta` to the refcount of the cluster at `host`; a result below
    /// zero means the metadata is inconsistent. Returns the new refcount.
    @discardableResult
    func adjustRefcount(of host: UInt64, by delta: Int) throws(DeviceError) -> UInt64 {
        let current = try refcount(of: host)
        if delta < 0 && current < UInt64(-delta) {
            throw .corruption("refcount of cluster at \(host) would drop below zero")
        }
        let value = delta < 0 ? current - UInt64(-delta) : current + UInt64(delta)
        try setRefcount(of: host, to: value)
        if delta < 0 && value == 0 { counters.freed.add(1, ordering: .relaxed) }
        return value
    }

    // MARK: - Allocation

    /// Takes up to `count` contiguous clusters from the reserve: the first
    /// host offset, how many, and whether they read as zeros. Nil when the
    /// reserve is empty (refill it with `claimFree` and a sync).
    func take(upTo count: Int) -> (host: UInt64, count: Int, fresh: Bool)? {
        guard !reserve.isEmpty else { return nil }
        let n = min(UInt64(count), reserve[0].count)
        let run = reserve[0]
        if n == run.count { reserve.removeFirst() } else {
            reserve[0].first += n
            reserve[0].count -= n
        }
        counters.allocated.add(n, ordering: .relaxed)
        return (run.first << UInt64(clusterBits), Int(n), run.fresh)
    }

    /// Puts clusters taken but not used (their data write failed) back in
    /// the reserve; their refcount is still 1 and nothing points at them.
    func giveBack(host: UInt64, count: Int) {
        reserve.insert(Run(first: host >> UInt64(clusterBits), count: UInt64(count), fresh: false), at: 0)
        counters.allocated.subtract(UInt64(count), ordering: .relaxed)
    }

    var reserveIsEmpty: Bool { reserve.isEmpty }

    /// Clusters the last refill asked for.
    private var lastClaim: UInt64 = 0

    /// Under half of the last refill is left: time to claim the next one
    /// ahead of need, so that its sync overlaps the writes using this one.
    var reserveIsLow: Bool {
        var left: UInt64 = 0
        for run in reserve { left += run.count }
        return left < lastClaim / 2
    }

    /// Raises the refcount of at least `minimum` free clusters to 1 and
    /// returns them, for the reserve once synced (`addToReserve`). On failure
    /// (ENOSPC) the refcounts raised so far are put back to 0.
    func claimFree(minimum: Int) throws(DeviceError) -> [Run] {
        let want = max(UInt64(minimum), reserveTarget)
        lastClaim = want
        reserveTarget = min(maximumReserve, reserveTarget * 2)
        var runs: [Run] = []
        var found: UInt64 = 0
        let endCluster = fileEnd >> UInt64(clusterBits)
        var candidate = freeCursor
        var allUsedSoFar = true
        // Free clusters inside the file first, in runs; the rest from its end.
        while candidate < endCluster && found < want {
            let host = candidate << UInt64(clusterBits)
            // Metadata counts as used for the cursor; only pinned clusters (transient) hold it back.
            let unavailable = isUnavailable(host) && metadata?.contains(cluster: host) != true
            if !unavailable, metadata?.contains(cluster: host) != true, try refcount(of: host) == 0 {
                if let last = runs.last, last.first + last.count == candidate {
                    runs[runs.count - 1].count += 1
                } else {
                    runs.append(Run(first: candidate, count: 1, fresh: false))
                }
                found += 1
                allUsedSoFar = false
            } else if allUsedSoFar && !unavailable {
                freeCursor = candidate + 1
            }
            candidate += 1
        }
        if found < want {
            let extra = want - found
            if let last = runs.last, last.first + last.count == endCluster {
                runs[runs.count - 1].count += extra  // a free run reaching the end is extended
            } else {
                runs.append(Run(first: endCluster, count: extra, fresh: true))
            }
            fileEnd = (endCluster + extra) << UInt64(clusterBits)
            // The file covers the reserve (sparsely) before any L2 entry can name it: a power
            // cut must not leave an entry pointing past the end of the file.
            do throws(Errno) {
                if try file.size() < fileEnd { try file.truncate(to: fileEnd) }
            } catch {
                throw .system(error, "extending the qcow2 image file to \(fileEnd)")
            }
        }
        // Counted, not listed: a refill can claim half a million clusters.
        var raised: UInt64 = 0
        do {
            for run in runs {
                var done: UInt64 = 0
                while done < run.count {
                    let n = try setRefcounts(ofClusters: run.first + done, count: run.count - done, to: 1)
                    done += n
                    raised += n
                }
            }
        } catch {
            for run in runs where raised > 0 {
                unclaim(Run(first: run.first, count: min(run.count, raised), fresh: run.fresh))
                raised -= min(run.count, raised)
            }
            throw error
        }
        return runs
    }

    /// Extends the file to `end` (sparsely), for clusters named past its end (`RefcountRepair`).
    func extendFile(to end: UInt64) throws(DeviceError) {
        do throws(Errno) {
            if try file.size() < end { try file.truncate(to: end) }
        } catch {
            throw .system(error, "extending the qcow2 image file to \(end)")
        }
        fileEnd = max(fileEnd, (end + clusterSize - 1) & ~(clusterSize - 1))
    }

    func addToReserve(_ runs: [Run]) { reserve += runs }

    /// Frees clusters from `claimFree` that never made it to the reserve.
    func unclaim(_ runs: [Run]) {
        for run in runs { unclaim(run) }
    }

    /// Best effort: a block whose write fails is skipped (its clusters leak).
    private func unclaim(_ run: Run) {
        var done: UInt64 = 0
        while done < run.count {
            let c = run.first + done
            let chunk = min(run.count - done, entriesPerBlock - c % entriesPerBlock)
            _ = try? setRefcounts(ofClusters: c, count: chunk, to: 0)
            done += chunk
        }
    }

    /// Returns every reserved cluster to free (at close, so that qemu-img
    /// check finds no leaks).
    func releaseReserve() throws(DeviceError) {
        while let run = reserve.first {
            let n = try setRefcounts(ofClusters: run.first, count: run.count, to: 0)
            // The reserve keeps only what still has a refcount, should the next block fail.
            if n == run.count { reserve.removeFirst() } else {
                reserve[0].first += n
                reserve[0].count -= n
            }
        }
    }

    /// The refcount block covering `cluster`, allocated if missing.
    private func ensureBlock(forCluster cluster: UInt64) throws(DeviceError) -> UInt64 {
        let tableIndex = cluster / entriesPerBlock
        if tableIndex >= UInt64(table.count) { try growTable(toCover: tableIndex) }
        let existing = table[Int(tableIndex)] & EntryBits.offsetMask
        if existing != 0 { return existing }
        // A new block goes at the end of the file; if it falls in its own range it
        // counts itself, else its refcount goes in the block that covers it.
        let blockOffset = fileEnd
        fileEnd += clusterSize
        let blockCluster = blockOffset >> UInt64(clusterBits)
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        let selfCovering = blockCluster / entriesPerBlock == tableIndex
        if selfCovering {
            _ = RefcountEntry.set(&bytes, index: Int(blockCluster % entriesPerBlock), order: order, value: 1)
        } else {
            // Counted before anything points at it, so a crash can only leak it.
            try setRefcount(of: blockOffset, to: 1)
        }
        metadata?.insert(blockOffset, length: clusterSize)
        do {
            try file.writeMetadata(bytes, at: blockOffset, what: "refcount block")
        } catch {
            // Disk full: the block's cluster was counted but nothing names it; uncount it.
            metadata?.remove(blockOffset, length: clusterSize)
            if !selfCovering { try? setRefcount(of: blockOffset, to: 0) }
            throw error
        }
        cache.update(.refcounts(RefcountBlock(bytes)), for: cacheKey(blockOffset))
        do {
            try sync()  // the block (and its own refcount) before the table entry naming it
            try file.writeMetadata(QCOW2Device.bigEndianBytes(blockOffset), at: tableOffset + tableIndex * 8,
                                   what: "refcount table")
        } catch {
            cache.remove(cacheKey(blockOffset))  // memory stays equal to the disk: no block for this range
            metadata?.remove(blockOffset, length: clusterSize)
            if !selfCovering { try? setRefcount(of: blockOffset, to: 0) }
            throw error
        }
        table[Int(tableIndex)] = blockOffset
        moveLog?.createdBlocks.append(blockOffset)
        return blockOffset
    }

    /// Moves the refcount table to a larger copy at the end of the file. A
    /// failure before the header names the copy (the disk filling up) is
    /// undone, so the old table stays live and nothing leaks. After that,
    /// memory and disk may disagree on which table is live, so refcounts are
    /// not touched again this session.
    private func growTable(toCover tableIndex: UInt64) throws(DeviceError) {
        // A move within a move (unlikely: the copy leaves room) is not undone on its own.
        let outermost = moveLog == nil
        let before = (tableOffset: tableOffset, table: table, fileEnd: fileEnd)
        if outermost { moveLog = MoveLog() }
        defer { if outermost { moveLog = nil } }
        do {
            try moveTable(toCover: tableIndex)
        } catch {
            if outermost, !broken, let log = moveLog, !log.headerWritten,
               (try? undoMove(log, tableOffset: before.tableOffset, table: before.table,
                              fileEnd: before.fileEnd)) != nil {
                throw error
            }
            broken = true
            throw error
        }
    }

    /// Puts memory and disk back as before a table move that failed before
    /// the header named the new table. Refcounts in blocks the old table names
    /// get their old values; blocks the move created are dropped whole (only
    /// the new table names them), as is the new table.
    private func undoMove(_ log: MoveLog, tableOffset oldOffset: UInt64, table oldTable: [UInt64],
                          fileEnd oldFileEnd: UInt64) throws(DeviceError) {
        if let new = log.newTable { metadata?.remove(new.lowerBound, length: new.upperBound - new.lowerBound) }
        for block in log.createdBlocks {
            metadata?.remove(block, length: clusterSize)
            cache.remove(cacheKey(block))
        }
        (tableOffset, table, fileEnd) = (oldOffset, oldTable, oldFileEnd)
        for (host, previous) in log.changed.reversed() {
            let tableIndex = (host >> UInt64(clusterBits)) / entriesPerBlock
            guard tableIndex < UInt64(table.count), table[Int(tableIndex)] & EntryBits.offsetMask != 0 else { continue }
            try setRefcount(of: host, to: previous)
        }
    }

    private func moveTable(toCover tableIndex: UInt64) throws(DeviceError) {
        let oldOffset = tableOffset, oldClusters = (UInt64(table.count) * 8 + clusterSize - 1) / clusterSize
        // Room for the requested index, for the clusters the move itself adds, and to double.
        let endIndex = ((fileEnd >> UInt64(clusterBits)) + oldClusters * 2 + 4) / entriesPerBlock
        let entries = max(UInt64(table.count) * 2, max(tableIndex, endIndex) + 2)
        let newClusters = (entries * 8 + clusterSize - 1) / clusterSize
        guard newClusters * clusterSize <= UInt64(QCOW2Header.maximumRefcountEntries * 8) else {
            throw DeviceError(.noSpace, "qcow2 refcount table would exceed 8 MiB")
        }
        let newOffset = fileEnd
        fileEnd += newClusters * clusterSize
        table += [UInt64](repeating: 0, count: Int(newClusters * clusterSize / 8) - table.count)
        tableOffset = newOffset
        metadata?.insert(newOffset, length: newClusters * clusterSize)
        moveLog?.newTable = newOffset..<newOffset + newClusters * clusterSize
        // Count the new table's clusters; any blocks this creates land after it.
        for i in 0..<newClusters { try setRefcount(of: newOffset + i * clusterSize, to: 1) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(table.count * 8)
        for entry in table { bytes += QCOW2Device.bigEndianBytes(entry) }
        try file.writeMetadata(bytes, at: newOffset, what: "refcount table")
        try sync()  // the new table and its refcounts before the header names it
        moveLog?.headerWritten = true
        // The header switch is one 12-byte write: offset and cluster count together.
        try file.writeMetadata(QCOW2Device.bigEndianBytes(newOffset) + QCOW2Device.bigEndianBytes(UInt32(newClusters)),
                  at: 48, what: "header")
        try sync()  // the header before the old table is freed and maybe reused
        metadata?.remove(oldOffset, length: oldClusters * clusterSize)
        for i in 0..<oldClusters { try adjustRefcount(of: oldOffset + i * clusterSize, by: -1) }
    }

    func sync() throws(DeviceError) {
        do throws(Errno) { try file.sync() } catch { throw .system(error, "fdatasync") }
    }
}
