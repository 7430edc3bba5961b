@testable import QCOW2
import Testing

/// Every decision of the cluster writer, from the L2 entry alone: where a
/// write into one guest cluster goes (in place, new subclusters, a whole
/// rewrite) and which entries are refused as corrupt.
@Suite struct ClusterWritePlanTests {
    struct Row: Sendable, CustomTestStringConvertible {
        var name: String
        var geometry: Geometry
        var entry: UInt64
        var bitmap: UInt64 = 0
        var from: UInt64 = 0
        var length: UInt64 = 4096
        var refcount: UInt64? = nil
        var expected: ClusterWritePlan
        var testDescription: String { name }
    }

    // 64 KiB clusters; with extended L2, 2 KiB subclusters.
    static let plain = Geometry(clusterBits: 16, extendedL2: false, hasDataFile: false)
    static let extended = Geometry(clusterBits: 16, extendedL2: true, hasDataFile: false)
    static let dataFile = Geometry(clusterBits: 16, extendedL2: false, hasDataFile: true)
    static let dataFileExtended = Geometry(clusterBits: 16, extendedL2: true, hasDataFile: true)

    static let guest: UInt64 = 0x10000
    static let host: UInt64 = 0x50000
    static let copied = EntryBits.copied
    static let compressed = EntryBits.compressed | 0x7_0000

    static let rows: [Row] = [
        // Plain L2 entries.
        Row(name: "unallocated: new cluster", geometry: plain, entry: 0, expected: .rewrite(host: nil)),
        Row(name: "zero flag, no host: new cluster", geometry: plain, entry: EntryBits.zero, expected: .rewrite(host: nil)),
        Row(name: "COPIED: in place", geometry: plain, entry: host | copied, expected: .inPlace(host: host)),
        Row(name: "COPIED, unaligned write: in place", geometry: plain, entry: host | copied, from: 100, length: 7,
            expected: .inPlace(host: host)),
        Row(name: "COPIED zero cluster: rewrite where it is", geometry: plain, entry: host | copied | EntryBits.zero,
            expected: .rewrite(host: host)),
        Row(name: "no COPIED, refcount 1: rewrite where it is", geometry: plain, entry: host, refcount: 1,
            expected: .rewrite(host: host)),
        Row(name: "no COPIED, shared with a snapshot: new cluster", geometry: plain, entry: host, refcount: 2,
            expected: .rewrite(host: nil)),
        Row(name: "compressed: new cluster", geometry: plain, entry: compressed, expected: .rewrite(host: nil)),
        Row(name: "misaligned host: corrupt", geometry: plain, entry: (host + 512) | copied,
            expected: .corrupt("misaligned cluster offset 0x50200")),

        // Extended L2: the bitmap decides between in place and new subclusters.
        Row(name: "ext: COPIED, written units allocated: in place", geometry: extended, entry: host | copied,
            bitmap: 0b11, expected: .inPlace(host: host)),
        Row(name: "ext: COPIED, second unit only, allocated: in place", geometry: extended, entry: host | copied,
            bitmap: 0b10, from: 2048, length: 2048, expected: .inPlace(host: host)),
        Row(name: "ext: COPIED, one written unit unallocated: subclusters in place", geometry: extended,
            entry: host | copied, bitmap: 0b01, expected: .subclusters(host: host)),
        Row(name: "ext: unaligned write over two units, one allocated", geometry: extended, entry: host | copied,
            bitmap: 0b01, from: 1000, length: 2000, expected: .subclusters(host: host)),
        Row(name: "ext: unallocated: subclusters in a new cluster", geometry: extended, entry: 0,
            expected: .subclusters(host: nil)),
        Row(name: "ext: no COPIED, refcount 1: subclusters in place", geometry: extended, entry: host, bitmap: 0b11,
            refcount: 1, expected: .subclusters(host: host)),
        Row(name: "ext: no COPIED, shared: new cluster", geometry: extended, entry: host, bitmap: 0b11,
            refcount: 2, expected: .rewrite(host: nil)),
        Row(name: "ext: compressed: new cluster", geometry: extended, entry: compressed, expected: .rewrite(host: nil)),

        // External data file: a cluster's host offset is its guest offset.
        Row(name: "data file: unallocated: rewrite at the guest offset", geometry: dataFile, entry: 0,
            expected: .rewrite(host: guest)),
        Row(name: "data file: COPIED with no offset (raw): in place", geometry: dataFile, entry: copied,
            expected: .inPlace(host: guest)),
        Row(name: "data file: COPIED at the guest offset: in place", geometry: dataFile, entry: guest | copied,
            expected: .inPlace(host: guest)),
        Row(name: "data file: zero cluster: rewrite at the guest offset", geometry: dataFile,
            entry: guest | copied | EntryBits.zero, expected: .rewrite(host: guest)),
        Row(name: "data file: elsewhere than the guest offset: corrupt", geometry: dataFile, entry: host | copied,
            expected: .corrupt("data file cluster at 0x50000 for guest 0x10000")),
        Row(name: "data file: compressed: corrupt", geometry: dataFile, entry: compressed,
            expected: .corrupt("compressed cluster in an image with an external data file")),
        Row(name: "data file ext: written units allocated: in place", geometry: dataFileExtended,
            entry: guest | copied, bitmap: 0b11, expected: .inPlace(host: guest)),
        Row(name: "data file ext: unallocated: subclusters at the guest offset", geometry: dataFileExtended,
            entry: 0, expected: .subclusters(host: guest)),
    ]

    @Test(arguments: rows)
    func plan(_ row: Row) {
        let plan = ClusterWritePlan.plan(entry: row.entry, bitmap: row.bitmap, from: row.from, length: row.length,
                                         guestCluster: Self.guest, geometry: row.geometry, refcount: row.refcount)
        #expect(plan == row.expected)
    }
}
