import BlockDevice
import Logging
import Synchronization
import SystemIO

/// A qcow2 image (versions 2 and 3) served as a block device, with its
/// backing chain, external data file and internal snapshots.
///
/// Every method may be called from many threads at once. Reads share one
/// cache of L2 tables and refcount blocks with the whole backing chain
/// (`MetadataCache`, lock-striped) and never hold a lock during data I/O.
public final class QCOW2Device: BlockDevice {
    public let size: UInt64
    public let capabilities: DeviceCapabilities
    /// The decoded header, as read at open.
    public let header: QCOW2Header
    /// The internal snapshots listed in the image.
    public let snapshots: [QCOW2Snapshot]

    let path: String
    /// The image file, for metadata. Guest data goes through `dataTarget`.
    let file: any PositionalFile
    /// The external data file, if the image has one.
    let dataFile: (any PositionalFile)?
    /// Where guest clusters are written: the external data file, or the image
    /// file behind the overlap check (`OverlapGuardedFile`).
    let dataTarget: any PositionalFile
    let geometry: Geometry
    /// The active (or selected snapshot's) L1 table; changed only through
    /// `MetadataState.l1Writer`.
    let l1Table: ActiveL1Table
    /// Whether writes are accepted (read-write open, no snapshot selected).
    let writable: Bool
    /// Refcounts, allocator, pending allocations, deferred releases and the
    /// L1 writer; every metadata change (L1/L2 updates, allocation) runs
    /// inside its lock (`withMetadataLock`).
    ///
    /// Lock order, outermost first: a `clusterLocks` stripe, `metadataState`,
    /// then any of `l1Table`, `hostRanges`, a `MetadataCache` stripe, the
    /// `MetadataMap` or a bitmap's state (leaf locks, never held while
    /// taking another).
    let metadataState: Locked<MetadataState>
    /// The allocator's counters, for statistics read without the lock. Nil when read-only.
    let allocationCounters: AllocationCounters?
    /// Host clusters holding metadata, which guest data writes must never touch. Nil when read-only.
    let metadataMap: MetadataMap?
    /// Host ranges read or written in place outside the metadata lock; the
    /// allocator never hands them out, even if freed meanwhile.
    let hostRanges: HostRangeGuard
    /// Set when metadata was found inconsistent while writing; writes are then refused.
    let markedCorrupt = Atomic(false)
    /// Whether the header's dirty bit is set (lazy refcounts). Changed only
    /// under the metadata lock, but outside `MetadataState`: `markCorrupt`
    /// rewrites the feature bits from the overlap check, which runs with or
    /// without the lock held.
    let dirtyBitSet = Atomic(false)
    /// Stripes of per-guest-cluster locks: a cluster being allocated, zeroed or
    /// trimmed holds its stripe, taken before the metadata lock.
    let clusterLocks: [Lock] = (0..<64).map { _ in Lock() }
    let backing: (any BlockDevice)?
    /// Paths of the backing chain below this image, nearest first.
    public let backingChain: [String]
    let l2Cache: L2Cache
    /// Persistent dirty bitmaps (`QCOW2Device+Bitmaps.swift`); nil without a consistent bitmaps extension.
    let bitmaps: PersistentBitmaps?
    /// The image file's size, for bounds checks on metadata; refreshed on demand.
    let imageFileSize: Atomic<UInt64>
    let logger: Logger

    /// Opens the qcow2 image at `path`.
    /// - Parameters:
    ///   - path: the image file.
    ///   - readOnly: open without write access. (This engine only reads for now.)
    ///   - options: cache size, snapshot selection, backing depth limit.
    /// - Throws: `QCOW2Error` naming why the image is refused.
    public convenience init(path: String, readOnly: Bool, options: QCOW2Options = .init()) throws(QCOW2Error) {
        try self.init(path: path, readOnly: readOnly, options: options,
                      chain: [BackingChain.canonical(path)])
    }

    /// - Parameter chain: canonical paths of this image and those above it, top first.
    init(path: String, readOnly: Bool, options: QCOW2Options, chain: [String]) throws(QCOW2Error) {
        let writable = !readOnly && options.snapshot == nil
        let file: any PositionalFile
        do throws(Errno) {
            file = try options.opener(path, writable ? .readWrite : .readOnly)
        } catch {
            throw .cannotOpen(path: path, reason: error.description)
        }
        var opened: [any PositionalFile] = [file]
        var backingDevice: (any BlockDevice)?
        // One budget for the whole chain: backing images get the top image's cache.
        var options = options
        let cache = options.sharedCache ?? MetadataCache(budget: options.cacheBytes)
        options.sharedCache = cache
        let cacheOwner = cache.newImage()
        do throws(QCOW2Error) {
            let fileSize = try QCOW2Device.fileSize(file)
            let headerBytes = try QCOW2Device.readBytes(file, at: 0,
                                                        count: Int(min(fileSize, UInt64(QCOW2Header.maximumHeaderBytes))))
            var header = try QCOW2Header.parse(headerBytes)
            try header.validate(fileSize: fileSize, writable: writable)
            let geometry = Geometry(header: header)

            let snapshots = try QCOW2Device.readSnapshots(file, header: header, fileSize: fileSize)
            var l1Offset = header.l1TableOffset, l1Size = header.l1Size, size = header.size
            if let key = options.snapshot {
                guard let snapshot = QCOW2Snapshot.find(key, in: snapshots) else { throw .snapshotNotFound(key) }
                try QCOW2Header.validateTable(offset: snapshot.l1TableOffset, entries: UInt64(snapshot.l1Size),
                                              fileSize: fileSize, clusterSize: header.clusterSize,
                                              maximumEntries: QCOW2Header.maximumL1Entries)
                    .orThrow { QCOW2Error.invalidSnapshotTable(reason: "snapshot '\(key)' L1 table: \($0)") }
                l1Offset = snapshot.l1TableOffset
                l1Size = snapshot.l1Size
                size = snapshot.diskSize ?? header.size
                guard size <= UInt64(Int64.max) else { throw .invalidSize(size) }
            }
            var l1Table = try QCOW2Device.readTable(file, at: l1Offset, entries: Int(l1Size))
            var refcounts: RefcountManager?
            var metadataMap: MetadataMap?
            if writable {
                metadataMap = MetadataMap(clusterBits: Int(header.clusterBits))
                refcounts = try RefcountManager(file: file, header: header, fileSize: fileSize, metadata: metadataMap,
                                                cache: cache, cacheOwner: cacheOwner | 1)
                // A dirty image (lazy refcounts, not closed cleanly) has stale refcounts:
                // rebuild them before the first write (spec, incompatible bit 0).
                if header.incompatibleFeatures.contains(.dirty) {
                    try RefcountRepair(file: file, header: header, geometry: geometry, fileSize: fileSize,
                                       refcounts: refcounts!).run()
                    header.incompatibleFeatures.remove(.dirty)
                    l1Table = try QCOW2Device.readTable(file, at: l1Offset, entries: Int(l1Size))
                }
                // Other autoclear features we don't maintain must be cleared before writing.
                if header.version >= 3 && header.autoclearFeatures & ~QCOW2Device.maintainedAutoclear != 0 {
                    let cleared = header.autoclearFeatures & QCOW2Device.maintainedAutoclear
                    do throws(Errno) {
                        try file.write(bytes: QCOW2Device.bigEndianBytes(cleared), at: 88)
                    } catch {
                        throw .io(reason: "clearing autoclear features: \(error)")
                    }
                }
            }

            var dataFile: (any PositionalFile)?
            if header.incompatibleFeatures.contains(.externalDataFile) {
                guard let name = header.externalDataFile, !name.isEmpty else {
                    throw .externalDataFileUnavailable(reason: "the image names no external data file")
                }
                // Relative names are looked up next to the image first; qemu uses
                // its working directory, so that is tried second.
                var dataPath = BackingChain.resolve(name, relativeTo: path)
                if !name.hasPrefix("/") && !BackingChain.exists(dataPath) && BackingChain.exists(name) {
                    dataPath = name
                }
                try BackingChain.requireAllowed(dataPath, options: options) { reason in
                    QCOW2Error.externalDataFileUnavailable(reason: "'\(dataPath)' \(reason)")
                }
                do throws(Errno) {
                    dataFile = try options.opener(dataPath, writable ? .readWrite : .readOnly)
                } catch {
                    throw .externalDataFileUnavailable(reason: "cannot open '\(dataPath)': \(error)")
                }
                opened.append(dataFile!)
            }

            var backingChain: [String] = []
            if let name = header.backingFile, !name.isEmpty {
                let (device, backingPath) = try BackingChain.open(name: name, format: header.backingFormat,
                                                                  imagePath: path, chain: chain, options: options)
                backingDevice = device
                backingChain = [backingPath] + ((device as? QCOW2Device)?.backingChain ?? [])
            }
            if let metadataMap {
                try QCOW2Device.mapMetadata(metadataMap, file: file, header: header, l1Table: l1Table,
                                            l1Offset: l1Offset, snapshots: snapshots, fileSize: fileSize)
            }
            // Last, so that an image refused for another reason keeps its bitmaps as they were:
            // a read-write load marks the enabled ones in_use. The active layer's bitmaps say
            // nothing of a snapshot. On a read-only open a broken bitmap directory fails only -B.
            var bitmaps: PersistentBitmaps?
            if options.snapshot == nil {
                do throws(QCOW2Error) {
                    bitmaps = try PersistentBitmaps.load(file: file, header: header, size: size, fileSize: fileSize,
                                                         metadata: metadataMap)
                } catch where !writable {
                    bitmaps = PersistentBitmaps(directoryOffset: 0, usable: [], unusable: [:], markedInUse: [],
                                                unreadable: error.description)
                }
            }

            self.path = path
            self.file = file
            self.dataFile = dataFile
            self.metadataMap = metadataMap
            self.backingChain = backingChain
            self.logger = options.logger
            self.header = header
            self.geometry = geometry
            self.snapshots = snapshots
            self.size = size
            let activeL1 = ActiveL1Table(l1Table)
            self.l1Table = activeL1
            self.writable = writable
            // The allocator skips metadata and ranges with I/O in flight outside the lock.
            let hostRanges = HostRangeGuard(), clusterSize = geometry.clusterSize
            self.hostRanges = hostRanges
            refcounts?.isUnavailable = { host in
                metadataMap?.contains(cluster: host) == true || hostRanges.isPinned(host..<host + clusterSize)
            }
            self.allocationCounters = refcounts?.counters
            self.metadataState = Locked(MetadataState(refcounts: refcounts, l1Writer: L1Writer(table: activeL1)))
            self.backing = backingDevice
            self.bitmaps = bitmaps
            self.l2Cache = L2Cache(shared: cache, owner: cacheOwner)
            self.imageFileSize = Atomic(fileSize)
            // One device object serves every connection and flush() syncs the file
            // all of them write to, so multi-conn is safe.
            self.capabilities = DeviceCapabilities(canWrite: writable, canFlush: writable, canFUA: writable,
                                                   canTrim: writable, canZero: writable, canFastZero: writable,
                                                   canCache: true, canMultiConn: true,
                                                   preferredBlockSize: UInt32(min(geometry.clusterSize, 65536)))
            if let metadataMap {
                let logger = options.logger, marker = CorruptionMarker()
                self.dataTarget = dataFile ?? OverlapGuardedFile(base: file, map: metadataMap) { offset, length in
                    logger.error("qcow2: refused a data write over metadata; marking the image corrupt",
                                 metadata: ["qcow2.image": "\(path)", "qcow2.offset": "\(offset)",
                                            "qcow2.length": "\(length)"])
                    marker.device?.markCorrupt()
                }
                marker.device = self
            } else {
                self.dataTarget = dataFile ?? file
            }
            if chain.count == 1 {
                options.logger.info("qcow2 image opened", metadata: [
                    "qcow2.image": "\(path)", "qcow2.writable": "\(writable)",
                    "qcow2.backing-chain": "\(backingChain.isEmpty ? "none" : backingChain.joined(separator: " -> "))",
                ])
            }
        } catch {
            backingDevice?.close()
            for handle in opened { handle.close() }
            throw error
        }
    }

    public func close() {
        let bitmapsWrittenBack = writeBackBitmapsForClose()
        closeMetadata()
        closeBitmaps(writtenBack: bitmapsWrittenBack)
        backing?.close()
        dataFile?.close()
        file.close()
    }

    // MARK: - Reading metadata at open

    static func fileSize(_ file: any PositionalFile) throws(QCOW2Error) -> UInt64 {
        do throws(Errno) { return try file.size() } catch { throw .io(reason: "fstat: \(error)") }
    }

    static func readBytes(_ file: any PositionalFile, at offset: UInt64, count: Int) throws(QCOW2Error) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        do throws(Errno) {
            bytes = try file.read(count: count, at: offset)
        } catch {
            throw .io(reason: "reading \(count) bytes at \(offset): \(error)")
        }
        return bytes
    }

    /// Reads a table of big-endian 64-bit entries (L1 or refcount table).
    /// Autoclear bits this engine keeps true while writing: "bitmaps" (their
    /// directory stays valid; each enabled bitmap is kept true or flagged in_use) and "raw external data".
    static let maintainedAutoclear: UInt64 = 1 << 0 | 1 << 1

    static func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    static func readTable(_ file: any PositionalFile, at offset: UInt64, entries: Int) throws(QCOW2Error) -> [UInt64] {
        // Read straight into the entries and swapped in place: an L1 table of a large image with
        // small clusters is tens of MiB, and a byte copy beside it would double the peak.
        var table = [UInt64](repeating: 0, count: entries)
        do {
            try table.withUnsafeMutableBytes { raw in try file.read(into: raw, at: offset, zeroFillPastEOF: false) }
        } catch {
            throw .io(reason: "reading \(entries * 8) bytes at \(offset): \(error)")
        }
        for i in table.indices { table[i] = UInt64(bigEndian: table[i]) }
        return table
    }

    static func readSnapshots(_ file: any PositionalFile, header: QCOW2Header, fileSize: UInt64)
        throws(QCOW2Error) -> [QCOW2Snapshot] {
        try readSnapshotTable(file, header: header, fileSize: fileSize).snapshots
    }

    static func readSnapshotTable(_ file: any PositionalFile, header: QCOW2Header, fileSize: UInt64)
        throws(QCOW2Error) -> (snapshots: [QCOW2Snapshot], length: Int) {
        guard header.snapshotCount > 0 else { return ([], 0) }
        let available = Int(min(fileSize - header.snapshotsOffset, UInt64(QCOW2Snapshot.maximumTableBytes)))
        var want = min(available, 64 << 10)
        while true {
            var bytes = try readBytes(file, at: header.snapshotsOffset, count: want)
            // When the table ends the file, qemu leaves out the last entry's padding to 8 bytes.
            if want == available { bytes += [UInt8](repeating: 0, count: 8) }
            if let table = try QCOW2Snapshot.parseTableAndLength(bytes, count: Int(header.snapshotCount)) {
                return table
            }
            guard want < available else {
                throw .invalidSnapshotTable(reason: "runs past the end of the file or its size limit")
            }
            want = min(available, want * 4)
        }
    }
}

/// Lets the overlap check reach the device it guards, which is created after it.
final class CorruptionMarker: @unchecked Sendable {
    /// Set once in init, before any request.
    weak var device: QCOW2Device?
}
