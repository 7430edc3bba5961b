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

/// The refcount table and blocks of a writable image, and the cluster
/// allocator built on them. Not thread-safe: every use is under the
/// device's metadata lock.
///
/// Writes go straight to the file in an order that keeps the image
/// consistent if the process dies at any point: a refcount block is
/// written before the table points to it, a new table before the header
/// points to it, and a cluster's refcount before anything points to the
/// cluster. The worst a crash leaves is a leaked cluster.
/// XXX: the order is program order; only flush() (fdatasync) orders it
/// against power loss, as there is no barrier between dependent writes.
final class RefcountManager: @unchecked Sendable {
    let file: FileHandle
    let clusterBits: Int
    let clusterSize: UInt64
    let order: Int
    /// Entries per refcount block.
    let entriesPerBlock: UInt64
    private(set) var tableOffset: UInt64
    private(set) var table: [UInt64]
    private var blocks: [UInt64: [UInt8]] = [:]
    /// First cluster-aligned offset past the end of the file's allocations.
    private(set) var fileEnd: UInt64
    /// No free cluster lies below this cluster index.
    private var freeCursor: UInt64 = 0
    /// Clusters with I/O in flight outside the lock; never handed out again until it ends.
    var isBusy: (UInt64) -> Bool = { _ in false }
    var crashSimulator: CrashSimulator?
    /// Set when a refcount table move failed half-way; refcounts are then left alone.
    private var broken = false
    /// Clusters `allocate` handed out and clusters whose refcount reached zero, for metrics.
    let allocatedClusters = Atomic<UInt64>(0)
    let freedClusters = Atomic<UInt64>(0)

    init(file: FileHandle, header: QCOW2Header, fileSize: UInt64) throws(QCOW2Error) {
        self.file = file
        clusterBits = Int(header.clusterBits)
        clusterSize = header.clusterSize
        order = Int(header.refcountOrder)
        entriesPerBlock = (clusterSize * 8) >> UInt64(order)
        tableOffset = header.refcountTableOffset
        table = try QCOW2Device.readTable(file, at: header.refcountTableOffset,
                                          entries: Int(UInt64(header.refcountTableClusters) * clusterSize / 8))
        fileEnd = (fileSize + clusterSize - 1) & ~(clusterSize - 1)
    }

    // MARK: - Reading

    private func block(at offset: UInt64) throws(DeviceError) -> [UInt8] {
        if let cached = blocks[offset] { return cached }
        guard offset & (clusterSize - 1) == 0, offset + clusterSize <= fileEnd else {
            throw DeviceError(.io, "qcow2 metadata: refcount block at \(offset) is misaligned or past the end")
        }
        let bytes: [UInt8]
        do throws(Errno) {
            bytes = try file.read(count: Int(clusterSize), at: offset, zeroFillPastEOF: true)
        } catch {
            throw .system(error, "reading qcow2 refcount block at \(offset)")
        }
        blocks[offset] = bytes
        return bytes
    }

    /// The refcount of the cluster holding host offset `host`.
    func refcount(of host: UInt64) throws(DeviceError) -> UInt64 {
        let cluster = host >> UInt64(clusterBits)
        let tableIndex = cluster / entriesPerBlock
        guard tableIndex < UInt64(table.count) else { return 0 }
        let blockOffset = table[Int(tableIndex)] & EntryBits.offsetMask
        guard blockOffset != 0 else { return 0 }
        return RefcountEntry.get(try block(at: blockOffset), index: Int(cluster % entriesPerBlock), order: order)
    }

    // MARK: - Writing

    /// Sets the refcount of the cluster at `host`, creating its refcount
    /// block (and growing the table) when needed.
    func setRefcount(of host: UInt64, to value: UInt64) throws(DeviceError) {
        guard !broken else {
            throw DeviceError(.io, "qcow2: the refcount table could not be moved; writes are refused until reopened")
        }
        guard value <= RefcountEntry.maximum(order: order) else {
            throw DeviceError(.io, "qcow2: refcount \(value) overflows \(1 << order) bits")
        }
        let cluster = host >> UInt64(clusterBits)
        let blockOffset = try ensureBlock(forCluster: cluster)
        _ = try block(at: blockOffset)  // loaded into `blocks`, then changed in place (no copy)
        let index = Int(cluster % entriesPerBlock)
        let previous = RefcountEntry.get(blocks[blockOffset]!, index: index, order: order)
        let changed = RefcountEntry.set(&blocks[blockOffset]!, index: index, order: order, value: value)
        do {
            try write(Array(blocks[blockOffset]![changed]), at: blockOffset + UInt64(changed.lowerBound),
                      what: "refcount")
        } catch {
            // Keep memory equal to the disk, so a failed write (ENOSPC, EIO) leaves nothing inconsistent.
            _ = RefcountEntry.set(&blocks[blockOffset]!, index: index, order: order, value: previous)
            throw error
        }
        if value == 0 { freeCursor = min(freeCursor, cluster) }
    }

    /// Adds `delta` to the refcount of the cluster at `host`; a result below
    /// zero means the metadata is inconsistent.
    func adjustRefcount(of host: UInt64, by delta: Int) throws(DeviceError) {
        let current = try refcount(of: host)
        if delta < 0 && current < UInt64(-delta) {
            throw DeviceError(.io, "qcow2 metadata: refcount of cluster at \(host) would drop below zero")
        }
        try setRefcount(of: host, to: delta < 0 ? current - UInt64(-delta) : current + UInt64(delta))
        if delta < 0 && current == UInt64(-delta) { freedClusters.add(1, ordering: .relaxed) }
    }

    /// Allocates `count` contiguous clusters with refcount 1: the first free
    /// run inside the file, else at its end. Returns the first host offset.
    func allocate(count: Int = 1) throws(DeviceError) -> UInt64 {
        let endCluster = fileEnd >> UInt64(clusterBits)
        var candidate = freeCursor, runStart: UInt64 = 0, run: UInt64 = 0
        var allUsedSoFar = true
        while candidate < endCluster && run < UInt64(count) {
            let host = candidate << UInt64(clusterBits)
            let busy = isBusy(host)
            if !busy, try refcount(of: host) == 0 {
                if run == 0 { runStart = candidate }
                run += 1
                allUsedSoFar = false
            } else {
                run = 0
                if allUsedSoFar && !busy { freeCursor = candidate + 1 }
            }
            candidate += 1
        }
        let first: UInt64
        if run == UInt64(count) {
            first = runStart << UInt64(clusterBits)
        } else {
            // A free run reaching the end of the file is extended; else start at the end.
            first = (run > 0 ? runStart : endCluster) << UInt64(clusterBits)
            fileEnd = first + UInt64(count) * clusterSize
        }
        for i in 0..<UInt64(count) { try setRefcount(of: first + i * clusterSize, to: 1) }
        allocatedClusters.add(UInt64(count), ordering: .relaxed)
        return first
    }

    /// Decrements the refcounts of every cluster overlapping `length` bytes at `host`.
    func free(host: UInt64, length: UInt64) throws(DeviceError) {
        var cluster = host & ~(clusterSize - 1)
        while cluster < host + length {
            try adjustRefcount(of: cluster, by: -1)
            cluster += clusterSize
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
        try write(bytes, at: blockOffset, what: "refcount block")
        blocks[blockOffset] = bytes
        do {
            try write(QCOW2Device.bigEndianBytes(blockOffset), at: tableOffset + tableIndex * 8, what: "refcount table")
        } catch {
            blocks[blockOffset] = nil  // memory stays equal to the disk: no block for this range
            throw error
        }
        table[Int(tableIndex)] = blockOffset
        return blockOffset
    }

    /// Moves the refcount table to a larger copy at the end of the file. If
    /// any write of the move fails, memory and disk may disagree on which
    /// table is live, so refcounts are not touched again this session.
    private func growTable(toCover tableIndex: UInt64) throws(DeviceError) {
        do {
            try moveTable(toCover: tableIndex)
        } catch {
            broken = true
            throw error
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
        // Count the new table's clusters; any blocks this creates land after it.
        for i in 0..<newClusters { try setRefcount(of: newOffset + i * clusterSize, to: 1) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(table.count * 8)
        for entry in table { bytes += QCOW2Device.bigEndianBytes(entry) }
        try write(bytes, at: newOffset, what: "refcount table")
        // The header switch is one 12-byte write: offset and cluster count together.
        try write(QCOW2Device.bigEndianBytes(newOffset) + QCOW2Device.bigEndianBytes(UInt32(newClusters)),
                  at: 48, what: "header")
        for i in 0..<oldClusters { try adjustRefcount(of: oldOffset + i * clusterSize, by: -1) }
    }

    private func write(_ bytes: [UInt8], at offset: UInt64, what: String) throws(DeviceError) {
        do throws(Errno) {
            try crashSimulator?.permitWrite()
            try file.write(bytes: bytes, at: offset)
        } catch {
            throw .system(error, "writing qcow2 \(what) at \(offset)")
        }
    }
}
