/// The geometry every lookup needs, derived once from the header.
struct Geometry: Sendable {
    let clusterBits: Int
    let clusterSize: UInt64
    /// Entries per L2 table (16-byte entries with extended L2).
    let l2Entries: Int
    let extendedL2: Bool
    /// Bits of the allocation unit: a subcluster with extended L2, else a cluster.
    let unitBits: Int
    let unitsPerCluster: Int
    let hasDataFile: Bool
    let version: UInt32
    /// Compressed descriptor layout (spec, "Compressed Clusters Descriptor").
    let compressedSizeShift: UInt64
    let compressedSizeMask: UInt64

    init(header: QCOW2Header) {
        self.init(clusterBits: Int(header.clusterBits), extendedL2: header.hasExtendedL2,
                  hasDataFile: header.incompatibleFeatures.contains(.externalDataFile), version: header.version)
    }

    /// The geometry of an image with these features, for tests that need no header.
    init(clusterBits: Int, extendedL2: Bool, hasDataFile: Bool, version: UInt32 = 3) {
        self.clusterBits = clusterBits
        clusterSize = 1 << UInt64(clusterBits)
        self.extendedL2 = extendedL2
        l2Entries = Int(clusterSize) / (extendedL2 ? 16 : 8)
        unitsPerCluster = extendedL2 ? 32 : 1
        unitBits = extendedL2 ? clusterBits - 5 : clusterBits
        self.hasDataFile = hasDataFile
        self.version = version
        compressedSizeShift = UInt64(62 - (clusterBits - 8))
        compressedSizeMask = (1 << UInt64(clusterBits - 8)) - 1
    }

    /// Virtual bytes one L2 table maps.
    var bytesPerL2: UInt64 { UInt64(l2Entries) << UInt64(clusterBits) }
    var unitSize: UInt64 { 1 << UInt64(unitBits) }
}

/// Bits of L1 and L2 entries (spec, "Cluster mapping").
enum EntryBits {
    static let copied: UInt64 = 1 << 63
    static let compressed: UInt64 = 1 << 62
    static let zero: UInt64 = 1
    /// Bits 9-55: a cluster-aligned host offset.
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
}

/// What one allocation unit (cluster, or subcluster with extended L2) of
/// the virtual disk maps to.
enum Mapping: Equatable, Sendable {
    /// Not allocated here: read from the backing file, or zeros.
    case unallocated
    /// Reads as zeros without looking further down the chain.
    case zero
    /// Stored uncompressed at `host` in the data file.
    case data(host: UInt64)
    /// Stored compressed: `length` bytes at `host` in the image file hold the whole cluster.
    case compressed(host: UInt64, length: Int)
    /// The entry is inconsistent; reading it is an I/O error.
    case invalid(String)

    /// Whether this layer defines the contents (qemu's BDRV_BLOCK_ALLOCATED).
    var isAllocated: Bool {
        switch self {
        case .unallocated, .invalid: false
        case .zero, .data, .compressed: true
        }
    }

    /// Decodes unit `unit` of an L2 entry and its extended-L2 `bitmap`.
    /// Pure, so the fuzzer can feed it anything.
    static func decode(entry: UInt64, bitmap: UInt64, unit: Int, geometry g: Geometry) -> Mapping {
        if entry & EntryBits.compressed != 0 {
            guard !g.hasDataFile else { return .invalid("compressed cluster in an image with an external data file") }
            let host = entry & ((1 << g.compressedSizeShift) - 1)
            let sectors = (entry >> g.compressedSizeShift) & g.compressedSizeMask + 1
            let length = Int(sectors * 512 - (host & 511))
            guard host != 0 else { return .invalid("compressed cluster at host offset 0") }
            return .compressed(host: host, length: length)
        }
        let host = entry & EntryBits.offsetMask
        // With an external data file, offset 0 is valid and COPIED marks allocation (qemu,
        // qcow2_get_cluster_type).
        let allocated = host != 0 || (g.hasDataFile && entry & EntryBits.copied != 0)
        if allocated && host & (g.clusterSize - 1) != 0 {
            return .invalid("misaligned cluster offset 0x\(String(host, radix: 16))")
        }
        if g.extendedL2 {
            let allocBits = UInt32(truncatingIfNeeded: bitmap), zeroBits = UInt32(truncatingIfNeeded: bitmap >> 32)
            guard allocBits & zeroBits == 0 else { return .invalid("subcluster both allocated and zero") }
            if !allocated && allocBits != 0 { return .invalid("allocated subclusters in an unallocated cluster") }
            if zeroBits & (1 << UInt32(unit)) != 0 { return .zero }
            if allocBits & (1 << UInt32(unit)) != 0 { return .data(host: host + (UInt64(unit) << UInt64(g.unitBits))) }
            return .unallocated
        }
        if entry & EntryBits.zero != 0 {
            // qemu treats a zero flag in a v2 image as corruption.
            guard g.version >= 3 else { return .invalid("zero cluster flag in a version 2 image") }
            return .zero
        }
        return allocated ? .data(host: host) : .unallocated
    }
}

/// An L2 table as loaded from disk, entries in host byte order. Immutable:
/// a writer replaces the whole table, so readers never see a torn update.
final class L2Table: Sendable {
    /// Raw entries; with extended L2, entry and bitmap alternate.
    let entries: [UInt64]

    init(entries: [UInt64]) { self.entries = entries }

    /// Decodes a table from its on-disk bytes.
    convenience init(bytes: UnsafeRawBufferPointer) {
        let count = bytes.count / 8
        var entries = [UInt64](repeating: 0, count: count)
        for i in 0..<count {
            entries[i] = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
        }
        self.init(entries: entries)
    }

    func mapping(index: Int, unit: Int, geometry g: Geometry) -> Mapping {
        if g.extendedL2 {
            return Mapping.decode(entry: entries[2 * index], bitmap: entries[2 * index + 1], unit: unit, geometry: g)
        }
        return Mapping.decode(entry: entries[index], bitmap: 0, unit: 0, geometry: g)
    }

    /// The longest run of like units starting `offset` bytes into the virtual
    /// range this table maps, at most `limit` bytes: unallocated or zero
    /// units of any host, data units that are contiguous on the host, or one
    /// compressed cluster's remainder. Returns the first unit's mapping
    /// (for data, the host offset of `offset` itself) and the run's length.
    func run(at offset: UInt64, limit: UInt64, geometry g: Geometry) -> (Mapping, UInt64) {
        let unitSize = g.unitSize
        let firstUnit = Int(offset >> UInt64(g.unitBits))
        var unitIndex = firstUnit
        let intoUnit = offset & (unitSize - 1)
        let totalUnits = g.l2Entries * g.unitsPerCluster
        let first = mapping(index: unitIndex / g.unitsPerCluster, unit: unitIndex % g.unitsPerCluster, geometry: g)
        var length = unitSize - intoUnit
        switch first {
        case .invalid:
            return (first, min(length, limit))
        case .compressed(let host, let size):
            let intoCluster = offset & (g.clusterSize - 1)
            return (.compressed(host: host, length: size), min(g.clusterSize - intoCluster, limit))
        default:
            break
        }
        unitIndex += 1
        while length < limit && unitIndex < totalUnits {
            let next = mapping(index: unitIndex / g.unitsPerCluster, unit: unitIndex % g.unitsPerCluster, geometry: g)
            switch (first, next) {
            case (.unallocated, .unallocated), (.zero, .zero): break
            case (.data(let a), .data(let b)) where b == a + UInt64(unitIndex - firstUnit) * unitSize:
                break
            default:
                return (adjusted(first, by: intoUnit), min(length, limit))
            }
            length += unitSize
            unitIndex += 1
        }
        return (adjusted(first, by: intoUnit), min(length, limit))
    }

    private func adjusted(_ mapping: Mapping, by delta: UInt64) -> Mapping {
        if case .data(let host) = mapping { return .data(host: host + delta) }
        return mapping
    }
}
