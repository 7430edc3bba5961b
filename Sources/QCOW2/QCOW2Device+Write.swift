import BlockDevice
import Synchronization
import SystemIO

// MARK: - Requests

/// Writes. Data going to clusters this image owns alone (COPIED) is written
/// in place without holding the metadata lock, so such writes run in
/// parallel. Anything that changes metadata (allocation, copy-on-write from
/// a backing file, compressed or snapshot-shared cluster, zero flags, trim)
/// runs under the metadata lock (`metadataState`), in the order that makes a crash or a power
/// cut harmless: the new cluster's refcount (synced, from the allocator's
/// reserve), then its data, then the L2 entry; the release of what the
/// entry pointed to before waits for the next sync point
/// (`QCOW2Device+Commit.swift`). A crash or power cut leaves at worst
/// leaked clusters (see CrashTests and PowerCutTests).
///
/// With lazy_refcounts the dirty bit is set before refcounts may lag, and
/// cleared at close; a dirty image is repaired at open (`RefcountRepair`).
/// Writes in place and reads pin their host ranges (`HostRangeGuard`) so a
/// cluster freed under them is not reused until they finish.
///
/// An allocating write holds the metadata lock only to decide and allocate and
/// then to update the L2 entry; its copy-on-write read and data write run
/// unlocked under the cluster's stripe of `clusterLocks`, so different
/// clusters are allocated in parallel (`writeCluster`). Whole-cluster runs
/// (`writeWholeClusters`) and extended-L2 subcluster writes still do their
/// data write under the metadata lock.
extension QCOW2Device {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws(DeviceError) {
        try requireWritable(offset: offset, length: UInt64(data.count))
        markBitmapsDirty(at: offset, length: UInt64(data.count))
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
                let (written, claimed) = try withMetadataLock { state throws(DeviceError) in
                    (try writeWholeClusters(&state, UnsafeRawBufferPointer(rebasing: rest[..<whole]), at: guest),
                     claimAhead(&state))
                }
                if let claimed { syncClaimed(claimed) }
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
        do throws(Errno) { try dataFile?.sync() } catch { throw .system(error, "fdatasync of the data file") }
        try withMetadataLock { state throws(DeviceError) in
            try writeBackBitmaps(&state)
            try commit(&state, durable: true)
        }
    }

    /// Makes a range read as zeros: v3 images set the zero flag on whole
    /// clusters (keeping the allocation unless `mayDeallocate`), partial
    /// clusters and v2 images get real zeros, and parts that already read
    /// as zeros are left alone. Whole clusters go a run (up to one L2
    /// table) at a time. `fast` is refused (`.notSupported`) unless no data
    /// has to be written.
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
            if cheap && !flags && !(mayDeallocate && backing == nil && dataFile == nil) {
                cheap = try readsAsZeros(at: offset, length: length)
            }
            guard cheap else { throw DeviceError(.notSupported, "qcow2: zeroing this range needs data writes") }
        }
        // After the fast check: a refused fast zero changes nothing.
        markBitmapsDirty(at: offset, length: length)
        var position = offset
        while position < end {
            let clusterStart = position & ~(cluster - 1)
            let clusterEnd = min(clusterStart + cluster, size)
            if position == clusterStart && clusterEnd <= end {
                // Whole clusters, up to the end of the range or of this L2 table.
                let tableEnd = (position / geometry.bytesPerL2 + 1) * geometry.bytesPerL2
                let runEnd = min(tableEnd, end == size ? end : end & ~(cluster - 1))
                let count = Int((runEnd - position + cluster - 1) / cluster)
                let done: UInt64
                if flags {
                    done = try zeroWholeClusters(from: position, count: count, mode: .zeroFlag(deallocate: mayDeallocate))
                } else if mayDeallocate && backing == nil && dataFile == nil {
                    // v2 without a backing file: an unallocated cluster reads as zeros.
                    done = try zeroWholeClusters(from: position, count: count, mode: .deallocate)
                } else {
                    try writeZeroBytesWhereNeeded(at: position, length: runEnd - position)
                    done = runEnd - position
                }
                position = min(position + done, end)
                continue
            }
            let n = min(clusterEnd, end) - position
            if try readsAsZeros(at: position, length: n) {
                // Already zeros: leave the metadata alone.
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
    /// images get the zero flag and v2 images keep their data. A raw data
    /// file's clusters are punched and get the zero flag, as qemu does, so
    /// the file keeps matching the disk.
    public func trim(at offset: UInt64, length: UInt64, fua: Bool) throws(DeviceError) {
        try requireWritable(offset: offset, length: length)
        markBitmapsDirty(at: offset, length: length)
        let cluster = geometry.clusterSize
        var position = (offset + cluster - 1) & ~(cluster - 1)
        let end = offset + length == size ? size : (offset + length) & ~(cluster - 1)
        let mode: ZeroMode? = header.dataFileIsRaw ? .zeroFlag(deallocate: true)
            : backing == nil ? .deallocate : canUseZeroFlag ? .zeroFlag(deallocate: true) : nil
        if let mode {
            while position < end {
                let tableEnd = (position / geometry.bytesPerL2 + 1) * geometry.bytesPerL2
                let runEnd = min(tableEnd, end)
                let count = Int((runEnd - position + cluster - 1) / cluster)
                position = min(position + (try zeroWholeClusters(from: position, count: count, mode: mode)), end)
            }
        }
        if fua { try flush() }
    }

    /// `zeroClusterRun` over `count` clusters from `start`, taking the
    /// cluster lock of any cluster another write is allocating. Returns the
    /// bytes handled.
    private func zeroWholeClusters(from start: UInt64, count: Int, mode: ZeroMode) throws(DeviceError) -> UInt64 {
        var done = try zeroClusterRun(from: start, count: count, mode: mode)
        if done == 0 {
            // The first cluster is being allocated: wait for that write, then zero it.
            done = try clusterLock(for: start).withLock { () throws(DeviceError) -> Int in
                try zeroClusterRun(from: start, count: 1, mode: mode)
            }
        }
        return min(UInt64(done) << UInt64(geometry.clusterBits), size - start)
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
        let done = try clusterLock(for: clusterStart).withLock { () throws(DeviceError) -> Bool in
            try withMetadataLock { state throws(DeviceError) -> Bool in
                try zeroSubclusterBits(&state, in: clusterStart, from: first - clusterStart, to: last - clusterStart)
            }
        }
        guard done else { return false }
        if first > offset { try writeZeroBytes(at: offset, length: first - offset) }
        if offset + length > last { try writeZeroBytes(at: last, length: offset + length - last) }
        return true
    }

    /// Whether the range reads as zeros from metadata alone: zero clusters,
    /// or unallocated ones with no backing data below (data is not scanned).
    private func readsAsZeros(at offset: UInt64, length: UInt64) throws(DeviceError) -> Bool {
        // A raw data file must hold the zeros itself, whatever the metadata says.
        guard !header.dataFileIsRaw || length == 0 else { return false }
        var position = offset
        while position < offset + length {
            let (mapping, n) = try run(at: position, limit: offset + length - position)
            switch mapping {
            case .zero: break
            case .unallocated where backing == nil || position >= backing!.size: break
            default: return false
            }
            position += n
        }
        return true
    }

    /// Writes zeros over the parts of the range that don't already read as zeros.
    private func writeZeroBytesWhereNeeded(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let end = offset + length
        var position = offset
        var stretch: UInt64?  // start of the current run that needs zeros
        while position < end {
            let (mapping, n) = try run(at: position, limit: end - position)
            var zero = false
            switch mapping {
            case .zero: zero = !header.dataFileIsRaw
            case .unallocated: zero = !header.dataFileIsRaw && (backing == nil || position >= backing!.size)
            default: break
            }
            if zero, let start = stretch {
                try writeZeroBytes(at: start, length: position - start)
                stretch = nil
            } else if !zero && stretch == nil {
                stretch = position
            }
            position += n
        }
        if let start = stretch { try writeZeroBytes(at: start, length: end - start) }
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

    /// Writes zeros through `write`, at most 1 MiB of them at a time.
    private func writeZeroBytes(at offset: UInt64, length: UInt64) throws(DeviceError) {
        let chunk = Int(min(length, 1 << 20))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeros[..<n]), at: offset + done, fua: false)
            done += UInt64(n)
        }
    }

    /// Runs `body` under the metadata lock, with the state it guards. Inconsistent metadata found on the
    /// way (`DeviceError.isCorruption`) marks the image corrupt (spec,
    /// incompatible bit 1) and is logged once.
    func withMetadataLock<T>(_ body: (inout MetadataState) throws(DeviceError) -> T) throws(DeviceError) -> T {
        do {
            return try metadataState.withLock { state throws(DeviceError) in try body(&state) }
        } catch {
            if error.isCorruption && !markedCorrupt.load(ordering: .relaxed) {
                logger.error("qcow2: metadata is inconsistent; marking the image corrupt",
                             metadata: ["qcow2.image": "\(path)", "qcow2.reason": "\(error.reason)"])
                markCorrupt()
            }
            throw error
        }
    }
}
