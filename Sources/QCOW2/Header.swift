/// The qcow2 file header and its extensions (spec, "Header" and "Header
/// extensions"), decoded from the first cluster's bytes. Parsing does no
/// I/O so it can be fuzzed; `validate(fileSize:)` checks the geometry
/// against the file.
public struct QCOW2Header: Sendable, Equatable {
    public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let dirty = IncompatibleFeatures(rawValue: 1 << 0)
        public static let corrupt = IncompatibleFeatures(rawValue: 1 << 1)
        public static let externalDataFile = IncompatibleFeatures(rawValue: 1 << 2)
        public static let compressionType = IncompatibleFeatures(rawValue: 1 << 3)
        public static let extendedL2 = IncompatibleFeatures(rawValue: 1 << 4)
        public static let known: IncompatibleFeatures = [.dirty, .corrupt, .externalDataFile, .compressionType,
                                                         .extendedL2]
    }

    /// One entry of the feature name table extension.
    public struct FeatureName: Sendable, Equatable {
        public enum Kind: UInt8, Sendable { case incompatible = 0, compatible = 1, autoclear = 2 }
        public var kind: Kind
        public var bit: UInt8
        public var name: String
    }

    public enum CompressionType: UInt8, Sendable { case zlib = 0, zstd = 1 }

    /// Header extension types (spec, "Header extensions").
    enum ExtensionType: UInt32 {
        case end = 0
        case backingFormat = 0xE279_2ACA
        case featureNameTable = 0x6803_F857
        case bitmaps = 0x2385_2875
        case fullDiskEncryption = 0x0537_BE77
        case externalDataFile = 0x4441_5441
    }

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: IncompatibleFeatures = []
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = 72
    public var compressionType: CompressionType = .zlib

    // Header extensions.
    public var backingFormat: String?
    public var featureNames: [FeatureName] = []
    public var externalDataFile: String?
    public var hasBitmapsExtension = false
    /// From the bitmaps extension: how many bitmaps, and where their directory is.
    public var bitmapCount: UInt32 = 0
    public var bitmapDirectorySize: UInt64 = 0
    public var bitmapDirectoryOffset: UInt64 = 0
    public var hasEncryptionExtension = false
    /// The backing file name, read from `backingFileOffset`.
    public var backingFile: String?

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var hasExtendedL2: Bool { incompatibleFeatures.contains(.extendedL2) }
    /// Autoclear bit 1: the external data file is a consistent raw image.
    public var dataFileIsRaw: Bool { autoclearFeatures & (1 << 1) != 0 }
    /// Compatible bit 0.
    public var lazyRefcounts: Bool { compatibleFeatures & 1 != 0 }

    /// Bytes to read from the start of the file to be sure of holding the
    /// header, its extensions and the backing file name: the largest cluster.
    public static let maximumHeaderBytes = 1 << 21

    // MARK: - Decoding

    /// Decodes a header from the first bytes of an image (at least the first
    /// cluster, or the whole file if shorter). Throws for anything that makes
    /// the header unreadable; geometry against the file is `validate`'s job.
    public static func parse(_ bytes: [UInt8]) throws(QCOW2Error) -> QCOW2Header {
        var r = ByteCursor(bytes)
        guard let magic = r.read(UInt32.self) else { throw .truncatedHeader }
        guard magic == QCOW2.magic else { throw .notQCOW2 }
        guard let version = r.read(UInt32.self) else { throw .truncatedHeader }
        guard version == 2 || version == 3 else { throw .unsupportedVersion(version) }
        guard bytes.count >= 72 else { throw .truncatedHeader }
        var h = QCOW2Header(
            version: version, backingFileOffset: r.read(UInt64.self)!, backingFileSize: r.read(UInt32.self)!,
            clusterBits: r.read(UInt32.self)!, size: r.read(UInt64.self)!, cryptMethod: r.read(UInt32.self)!,
            l1Size: r.read(UInt32.self)!, l1TableOffset: r.read(UInt64.self)!,
            refcountTableOffset: r.read(UInt64.self)!, refcountTableClusters: r.read(UInt32.self)!,
            snapshotCount: r.read(UInt32.self)!, snapshotsOffset: r.read(UInt64.self)!)
        guard (9...21).contains(h.clusterBits) else { throw .invalidClusterBits(h.clusterBits) }
        let clusterSize = Int(h.clusterSize)

        if version >= 3 {
            guard let incompatible = r.read(UInt64.self), let compatible = r.read(UInt64.self),
                  let autoclear = r.read(UInt64.self), let order = r.read(UInt32.self),
                  let length = r.read(UInt32.self) else { throw .truncatedHeader }
            h.incompatibleFeatures = IncompatibleFeatures(rawValue: incompatible)
            h.compatibleFeatures = compatible
            h.autoclearFeatures = autoclear
            h.refcountOrder = order
            h.headerLength = length
            guard length >= 104, length % 8 == 0, Int(length) <= clusterSize else {
                throw .invalidHeaderLength(length)
            }
            guard Int(length) <= bytes.count else { throw .truncatedHeader }
            // Additional fields are present only below header_length (spec, rule 3).
            if length > 104 {
                let type = bytes[104]
                guard let compression = CompressionType(rawValue: type) else {
                    throw .unsupportedCompressionType(type)
                }
                h.compressionType = compression
            }
            // The feature bit and the field must agree (spec, "compression_type").
            if h.incompatibleFeatures.contains(.compressionType) != (h.compressionType != .zlib) {
                throw .unsupportedCompressionType(h.compressionType.rawValue)
            }
        }
        guard h.refcountOrder <= 6 else { throw .invalidRefcountOrder(h.refcountOrder) }
        if h.hasExtendedL2 && h.clusterBits < 14 { throw .invalidClusterBits(h.clusterBits) }

        try h.parseExtensions(bytes, clusterSize: clusterSize)

        if h.backingFileOffset != 0 {
            let offset = h.backingFileOffset, length = UInt64(h.backingFileSize)
            // The name lives in the first cluster (spec, "Header extensions").
            guard length <= 1023, offset <= UInt64(clusterSize), offset + length <= UInt64(clusterSize),
                  offset + length <= UInt64(bytes.count) else { throw .invalidBackingFileName }
            h.backingFile = bytes[Int(offset)..<Int(offset + length)].qcow2String
        }
        return h
    }

    private mutating func parseExtensions(_ bytes: [UInt8], clusterSize: Int) throws(QCOW2Error) {
        // Extensions follow the header and end within the first cluster; if a
        // backing file name follows them, it bounds the area too.
        var end = min(clusterSize, bytes.count)
        if backingFileOffset != 0, backingFileOffset > UInt64(headerLength), backingFileOffset < UInt64(end) {
            end = Int(backingFileOffset)
        }
        var r = ByteCursor(Array(bytes[0..<end]), at: Int(headerLength))
        var seen: Set<UInt32> = []
        while r.remaining > 0 {
            guard let type = r.read(UInt32.self) else { throw .invalidHeaderExtension(type: 0, reason: "truncated") }
            if type == ExtensionType.end.rawValue { return }
            guard let length = r.read(UInt32.self), let data = r.read(bytes: Int(length)) else {
                throw .invalidHeaderExtension(type: type, reason: "overruns the header area")
            }
            let padding = (8 - Int(length) % 8) % 8
            _ = r.skip(min(padding, r.remaining))
            guard let known = ExtensionType(rawValue: type) else { continue }  // unknown: skip (spec)
            guard seen.insert(type).inserted else {
                throw .invalidHeaderExtension(type: type, reason: "appears twice")
            }
            switch known {
            case .end: return
            case .backingFormat: backingFormat = data.qcow2String
            case .externalDataFile: externalDataFile = data.qcow2String
            case .bitmaps:
                hasBitmapsExtension = true
                let fields = Array(data)
                guard fields.count >= 24 else {
                    throw .invalidHeaderExtension(type: type, reason: "bitmaps extension of \(fields.count) bytes")
                }
                bitmapCount = ByteCursor.peek(UInt32.self, in: fields, at: 0)!
                bitmapDirectorySize = ByteCursor.peek(UInt64.self, in: fields, at: 8)!
                bitmapDirectoryOffset = ByteCursor.peek(UInt64.self, in: fields, at: 16)!
            case .fullDiskEncryption: hasEncryptionExtension = true
            case .featureNameTable:
                guard data.count % 48 == 0 else {
                    throw .invalidHeaderExtension(type: type, reason: "feature name table length \(data.count)")
                }
                var i = data.startIndex
                while i < data.endIndex {
                    if let kind = FeatureName.Kind(rawValue: data[i]) {
                        featureNames.append(FeatureName(kind: kind, bit: data[i + 1],
                                                        name: data[(i + 2)..<(i + 48)].qcow2String))
                    }
                    i += 48
                }
            }
        }
        // Running into the end of the area without an end marker is tolerated, as qemu does.
    }

    // MARK: - Validation

    /// Checks everything that must be refused at open, given the image file's
    /// size: encryption, unknown incompatible features, table placement,
    /// size overflow. `writable` adds the checks for a read-write open.
    public func validate(fileSize: UInt64, writable: Bool) throws(QCOW2Error) {
        switch cryptMethod {
        case 0: break
        case 1: throw .encrypted(method: "AES")
        case 2: throw .encrypted(method: "LUKS")
        default: throw .encrypted(method: "method \(cryptMethod)")
        }
        let unknown = incompatibleFeatures.subtracting(.known)
        if !unknown.isEmpty {
            throw .unknownIncompatibleFeatures(names: featureNames(for: unknown.rawValue, kind: .incompatible))
        }
        if writable && incompatibleFeatures.contains(.corrupt) { throw .corrupt }

        let clusterSize = self.clusterSize
        // qemu refuses sizes above INT64_MAX and clusters past 2^56 (spec, "size").
        guard size <= UInt64(Int64.max) else { throw .invalidSize(size) }
        let clusters = size / clusterSize + (size % clusterSize == 0 ? 0 : 1)
        let l2Entries = clusterSize / (hasExtendedL2 ? 16 : 8)
        let l1Needed = clusters / l2Entries + (clusters % l2Entries == 0 ? 0 : 1)
        guard l1Needed <= UInt64(QCOW2Header.maximumL1Entries) else { throw .invalidSize(size) }

        try QCOW2Header.validateTable(offset: l1TableOffset, entries: UInt64(l1Size), fileSize: fileSize,
                                      clusterSize: clusterSize, maximumEntries: QCOW2Header.maximumL1Entries)
            .orThrow { QCOW2Error.invalidL1Table(reason: $0) }
        guard UInt64(l1Size) >= l1Needed else {
            throw .invalidL1Table(reason: "\(l1Size) entries cannot map \(size) bytes")
        }
        let refcountEntries = UInt64(refcountTableClusters) * clusterSize / 8
        try QCOW2Header.validateTable(offset: refcountTableOffset, entries: refcountEntries, fileSize: fileSize,
                                      clusterSize: clusterSize, maximumEntries: QCOW2Header.maximumRefcountEntries)
            .orThrow { QCOW2Error.invalidRefcountTable(reason: $0) }
        if refcountEntries == 0 { throw .invalidRefcountTable(reason: "empty") }
        if snapshotCount > 0 {
            guard snapshotCount <= 65536 else { throw .invalidSnapshotTable(reason: "\(snapshotCount) snapshots") }
            guard snapshotsOffset % clusterSize == 0, snapshotsOffset < fileSize else {
                throw .invalidSnapshotTable(reason: "offset \(snapshotsOffset) is misaligned or past the end")
            }
        }
        if incompatibleFeatures.contains(.externalDataFile) {
            if backingFileOffset != 0 && dataFileIsRaw {
                throw .unsupported(reason: "a raw external data file cannot have a backing file")
            }
        } else if dataFileIsRaw {
            throw .unsupported(reason: "raw external data bit set without an external data file")
        }
    }

    /// qemu's limits: 32 MiB of L1 table, 8 MiB of refcount table.
    static let maximumL1Entries = (32 << 20) / 8
    static let maximumRefcountEntries = (8 << 20) / 8

    /// Why a table of 8-byte entries at `offset` is impossible, or nil.
    static func validateTable(offset: UInt64, entries: UInt64, fileSize: UInt64, clusterSize: UInt64,
                              maximumEntries: Int) -> Result<Void, TableProblem> {
        guard entries <= UInt64(maximumEntries) else { return .failure(TableProblem("\(entries) entries is too large")) }
        guard offset % clusterSize == 0 else { return .failure(TableProblem("offset \(offset) is misaligned")) }
        guard entries == 0 || (offset > 0 && offset <= fileSize && entries * 8 <= fileSize - offset) else {
            return .failure(TableProblem("offset \(offset) with \(entries) entries is beyond the end of the file"))
        }
        return .success(())
    }

    struct TableProblem: Error { var text: String; init(_ text: String) { self.text = text } }

    /// Names for the bits set in `bits`, from the feature name table when it has them.
    func featureNames(for bits: UInt64, kind: FeatureName.Kind) -> [String] {
        (0..<64).filter { bits & (1 << UInt64($0)) != 0 }.map { bit in
            featureNames.first { $0.kind == kind && Int($0.bit) == bit }?.name ?? "unknown feature bit \(bit)"
        }
    }
}

extension Result where Failure == QCOW2Header.TableProblem {
    func orThrow(_ transform: (String) -> QCOW2Error) throws(QCOW2Error) {
        if case .failure(let problem) = self { throw transform(problem.text) }
    }
}
