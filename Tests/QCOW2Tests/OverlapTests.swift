import BlockDevice
import Foundation
import Logging
@testable import QCOW2
import SystemIO
import TestSupport
import Testing

/// Hostile images opened read-write: guest writes must never land on
/// metadata. A write that would is refused with EIO, the image is marked
/// corrupt and one line is logged; the allocator never hands out a
/// metadata cluster, whatever its refcount says.
@Suite struct OverlapTests {
    typealias Field = CorruptImageTests.Field

    /// Where an L2 entry that claims guest cluster 64k (COPIED, owned) points.
    /// (Not the header: host offset 0 means "unallocated" in an L2 entry.)
    enum Target: String, CaseIterable, CustomTestStringConvertible {
        case l1Table, l2Table, refcountTable, refcountBlock, snapshotTable
        var testDescription: String { rawValue }
    }

    static func offset(of target: Target, in path: String) throws -> UInt64 {
        let h = try CorruptImageTests.header(path)
        let bytes = try Q.fileBytes(path)
        switch target {
        case .l1Table: return h.l1TableOffset
        case .l2Table: return try CorruptImageTests.firstL2(path)
        case .refcountTable: return h.refcountTableOffset
        case .refcountBlock: return ByteCursor.peek(UInt64.self, in: bytes, at: Int(h.refcountTableOffset))!
        case .snapshotTable: return h.snapshotsOffset
        }
    }

    /// Collects log lines, to see the refusal reported.
    final class Lines: LogHandler, @unchecked Sendable {
        let lines = Locked<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            lines.withLock { $0.append("\(event.message)") }
        }
    }

    @Test(arguments: Target.allCases)
    func copiedEntryPointingAtMetadata(_ target: Target) throws {
        let dir = try TemporaryDirectory("qcow2-overlap")
        let path = try CorruptImageTests.makeImage(dir)
        try Q.img(["snapshot", "-c", "s", path])
        try Q.io(path, ["write -P 0x33 64k 64k"])  // cluster 64k is now this image's alone
        let victim = try Self.offset(of: target, in: path)
        let l2 = try CorruptImageTests.firstL2(path)
        try Q.patch(path, at: l2 + 8, Q.bigEndian(victim | EntryBits.copied))
        let before = try Q.fileBytes(path)

        let lines = Lines()
        let logger = Logger(label: "test") { _ in lines }
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(logger: logger))
        let error = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 0xEE, count: 4096).withUnsafeBytes { try device.write($0, at: 65536, fua: false) }
        }
        #expect(error?.kind == .io)
        // Marked corrupt: later writes are refused too, and qemu will want a repair.
        let again = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 0xEE, count: 512).withUnsafeBytes { try device.write($0, at: 512 * 1024, fua: false) }
        }
        #expect(again?.kind == .io)
        device.close()
        #expect(lines.lines.withLock { $0.contains { $0.contains("refused a data write over metadata") } })
        let after = try Q.fileBytes(path)
        #expect(try CorruptImageTests.header(path).incompatibleFeatures.contains(.corrupt))
        // Nothing but the corrupt bit changed: the metadata the entry named is intact.
        var expected = before
        expected.replaceSubrange(Int(Field.incompatible)..<Int(Field.incompatible) + 8,
                                 with: Q.bigEndian(try CorruptImageTests.header(path).incompatibleFeatures.rawValue))
        #expect(after.prefix(expected.count) == expected[...])
    }

    /// An L2 table and a refcount block whose refcounts are 0: allocating
    /// writes must go around them, and the data read back.
    @Test func metadataWithRefcountZeroIsNeverAllocated() throws {
        let dir = try TemporaryDirectory("qcow2-overlap-alloc")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4M"])
        try Q.io(path, ["write -P 0x11 0 4k"])
        let h = try CorruptImageTests.header(path)
        let l2 = try CorruptImageTests.firstL2(path)
        let block = try Self.offset(of: .refcountBlock, in: path)
        // 16-bit refcounts in the first block: zero the L2 table's and the block's own.
        try Q.patch(path, at: block + (l2 / 4096) * 2, [0, 0])
        try Q.patch(path, at: block + (block / 4096) * 2, [0, 0])
        try Q.patch(path, at: block + (h.l1TableOffset / 4096) * 2, [0, 0])
        let l2Before = Array(try Q.fileBytes(path)[Int(l2)..<Int(l2) + 4096])

        let device = try QCOW2Device(path: path, readOnly: false)
        var model = [UInt8](repeating: 0, count: 4 << 20)
        model.replaceSubrange(0..<4096, with: repeatElement(0x11, count: 4096))
        for i in 1..<64 {
            let bytes = [UInt8](repeating: UInt8(i), count: 4096)
            try bytes.withUnsafeBytes { try device.write($0, at: UInt64(i) * 65536, fua: false) }
            model.replaceSubrange(i * 65536..<i * 65536 + 4096, with: bytes)
        }
        try Q.expectSameContents(device, model)
        device.close()
        #expect(!(try CorruptImageTests.header(path).incompatibleFeatures.contains(.corrupt)))
        // The L2 table holds entries, not guest data: its first entry is unchanged.
        let l2After = Array(try Q.fileBytes(path)[Int(l2)..<Int(l2) + 4096])
        #expect(l2After[0..<8] == l2Before[0..<8])
        #expect(!l2After.contains(0x3F) || l2After.filter { $0 == 0x3F }.count < 64)
        #expect(try Q.qemuRaw(path, scratch: dir) == model)
    }

    /// An L1 entry naming a misaligned L2 table fails writes in place too
    /// (every path checks alignment), and marks the image corrupt.
    @Test func misalignedL2OnInPlacePath() throws {
        let dir = try TemporaryDirectory("qcow2-overlap-align")
        let path = try CorruptImageTests.makeImage(dir)
        let h = try CorruptImageTests.header(path)
        let l2 = try CorruptImageTests.firstL2(path)
        try Q.patch(path, at: h.l1TableOffset, Q.bigEndian((l2 + 512) | EntryBits.copied))
        let device = try QCOW2Device(path: path, readOnly: false)
        let error = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try device.write($0, at: 65536, fua: false) }
        }
        #expect(error?.isCorruption == true)
        device.close()
        #expect(try CorruptImageTests.header(path).incompatibleFeatures.contains(.corrupt))
    }
}
