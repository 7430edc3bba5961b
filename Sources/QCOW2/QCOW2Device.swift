import BlockDevice
import Synchronization
import SystemIO

/// A qcow2 image (versions 2 and 3) served as a block device, with its
/// backing chain, external data file and internal snapshots.
///
/// Every method may be called from many threads at once. Reads share one
/// L2 cache (`L2Cache`, lock-striped) and never hold a lock during data I/O.
public final class QCOW2Device: BlockDevice {
    public let size: UInt64
    public let capabilities: DeviceCapabilities
    /// The decoded header, as read at open.
    public let header: QCOW2Header
    /// The internal snapshots listed in the image.
    public let snapshots: [QCOW2Snapshot]

    let path: String
    let file: FileHandle
    /// Where guest clusters live: the external data file, or the image itself.
    let dataFile: FileHandle?
    let geometry: Geometry
    /// The active (or selected snapshot's) L1 table, entries in host order.
    /// Writers replace entries under `metadataLock` and then this lock.
    let l1Table: Mutex<[UInt64]>
    /// Whether writes are accepted (read-write open, no snapshot selected).
    let writable: Bool
    /// Serialises every metadata change: L1/L2 updates, refcounts, allocation.
    let metadataLock = Mutex(())
    /// Refcounts and the allocator; only touched under `metadataLock`. Nil when read-only.
    let refcounts: RefcountManager?
    /// Host ranges being written in place outside `metadataLock`; the
    /// allocator never hands them out, even if freed meanwhile.
    let inFlight = Mutex<[Range<UInt64>]>([])
    /// Set when metadata was found inconsistent while writing; writes are then refused.
    let markedCorrupt = Atomic(false)
    /// Stripes of per-guest-cluster locks: a cluster being allocated, zeroed or
    /// trimmed holds its stripe, taken before `metadataLock`.
    let clusterLocks: [ClusterLock] = (0..<64).map { _ in ClusterLock() }
    /// Guest clusters whose allocation is under way (see `writeCluster`); only
    /// touched under `metadataLock`.
    let pendingClusters = LockedState<Set<UInt64>>([])
    /// Test hook: fails every write after a given number, like a crash.
    let crashSimulator = CrashSimulator()
    /// Test hook: runs between a read's cluster lookup and its data read, to
    /// make a concurrent write land in that window. Set before any request.
    nonisolated(unsafe) var testHookBeforeDataRead: (@Sendable (UInt64) -> Void)?
    let backing: (any BlockDevice)?
    let l2Cache: L2Cache
    /// The image file's size, for bounds checks on metadata; refreshed on demand.
    let imageFileSize: Atomic<UInt64>

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
        let file: FileHandle
        do throws(Errno) {
            file = try FileHandle.open(path, mode: writable ? .readWrite : .readOnly)
        } catch {
            throw .cannotOpen(path: path, reason: error.description)
        }
        var opened: [FileHandle] = [file]
        var backingDevice: (any BlockDevice)?
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
            if writable {
                refcounts = try RefcountManager(file: file, header: header, fileSize: fileSize)
                // A dirty image (lazy refcounts, not closed cleanly) has stale refcounts:
                // rebuild them before the first write (spec, incompatible bit 0).
                if header.incompatibleFeatures.contains(.dirty) {
                    try RefcountRepair(file: file, header: header, geometry: geometry, fileSize: fileSize,
                                       refcounts: refcounts!).run()
                    header.incompatibleFeatures.remove(.dirty)
                    l1Table = try QCOW2Device.readTable(file, at: l1Offset, entries: Int(l1Size))
                }
                // Persistent bitmaps are not updated by our writes: flag each one in_use
                // (inconsistent), as qemu does while it has an image open, rather than
                // clearing the autoclear bit, which would leave their clusters leaked.
                if header.hasBitmapsExtension && header.autoclearFeatures & 1 != 0 {
                    try Bitmaps.markInUse(file: file, header: header, fileSize: fileSize)
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

            var dataFile: FileHandle?
            if header.incompatibleFeatures.contains(.externalDataFile) {
                guard let name = header.externalDataFile, !name.isEmpty else {
                    throw .externalDataFileUnavailable(reason: "the image names no external data file")
                }
                // Relative names are looked up next to the image first; qemu uses
                // its working directory, so that is tried second.
                let dataPath = BackingChain.resolve(name, relativeTo: path)
                let mode: FileHandle.Mode = writable ? .readWrite : .readOnly
                do throws(Errno) {
                    dataFile = try FileHandle.open(dataPath, mode: mode)
                } catch {
                    guard !name.hasPrefix("/"), let handle = try? FileHandle.open(name, mode: mode) else {
                        throw .externalDataFileUnavailable(reason: "cannot open '\(dataPath)': \(error)")
                    }
                    dataFile = handle
                }
                opened.append(dataFile!)
            }

            if let name = header.backingFile, !name.isEmpty {
                backingDevice = try BackingChain.open(name: name, format: header.backingFormat, imagePath: path,
                                                      chain: chain, options: options)
            }

            self.path = path
            self.file = file
            self.dataFile = dataFile
            self.header = header
            self.geometry = geometry
            self.snapshots = snapshots
            self.size = size
            self.l1Table = Mutex(l1Table)
            self.writable = writable
            self.refcounts = refcounts
            self.backing = backingDevice
            self.l2Cache = L2Cache(capacityBytes: options.l2CacheBytes, clusterBits: geometry.clusterBits)
            self.imageFileSize = Atomic(fileSize)
            // One device object serves every connection and flush() syncs the file
            // all of them write to, so multi-conn is safe.
            self.capabilities = DeviceCapabilities(canWrite: writable, canFlush: writable, canFUA: writable,
                                                   canTrim: writable, canZero: writable, canFastZero: writable,
                                                   canCache: true, canMultiConn: true,
                                                   preferredBlockSize: UInt32(min(geometry.clusterSize, 65536)))
            let clusterSize = geometry.clusterSize
            refcounts?.crashSimulator = crashSimulator
            refcounts?.isBusy = { [unowned self] host in
                self.inFlight.withLock { $0.contains { $0.overlaps(host..<host + clusterSize) } }
            }
        } catch {
            backingDevice?.close()
            for handle in opened { handle.close() }
            throw error
        }
    }

    public func close() {
        try? flush()
        backing?.close()
        dataFile?.close()
        file.close()
    }

    // MARK: - Reading metadata at open

    static func fileSize(_ file: FileHandle) throws(QCOW2Error) -> UInt64 {
        do throws(Errno) { return try file.size() } catch { throw .io(reason: "fstat: \(error)") }
    }

    static func readBytes(_ file: FileHandle, at offset: UInt64, count: Int) throws(QCOW2Error) -> [UInt8] {
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
    /// directory stays valid; the bitmaps are flagged in_use) and "raw external data".
    static let maintainedAutoclear: UInt64 = 1 << 0 | 1 << 1

    static func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    static func readTable(_ file: FileHandle, at offset: UInt64, entries: Int) throws(QCOW2Error) -> [UInt64] {
        let bytes = try readBytes(file, at: offset, count: entries * 8)
        return (0..<entries).map { ByteCursor.peek(UInt64.self, in: bytes, at: $0 * 8)! }
    }

    static func readSnapshots(_ file: FileHandle, header: QCOW2Header, fileSize: UInt64)
        throws(QCOW2Error) -> [QCOW2Snapshot] {
        try readSnapshotTable(file, header: header, fileSize: fileSize).snapshots
    }

    static func readSnapshotTable(_ file: FileHandle, header: QCOW2Header, fileSize: UInt64)
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

/// One stripe of `QCOW2Device.clusterLocks`.
final class ClusterLock: Sendable {
    let mutex = Mutex(())
}

/// State guarded by a lock its owner holds (here `metadataLock`), not by itself.
final class LockedState<Value>: @unchecked Sendable {
    var value: Value
    init(_ value: Value) { self.value = value }
}
