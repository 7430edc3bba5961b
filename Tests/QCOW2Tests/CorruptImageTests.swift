import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Broken and unsupported images are refused at open with the error that
/// names the problem, or fail the read that meets the damage with
/// DeviceError(.io); nothing crashes.
@Suite struct CorruptImageTests {
    /// Header field offsets (spec, "Header").
    enum Field {
        static let version: UInt64 = 4, backingOffset: UInt64 = 8, clusterBits: UInt64 = 20, size: UInt64 = 24
        static let crypt: UInt64 = 32, l1Size: UInt64 = 36, l1Offset: UInt64 = 40, refcountOffset: UInt64 = 48
        static let refcountClusters: UInt64 = 56, snapshotCount: UInt64 = 60, incompatible: UInt64 = 72
        static let refcountOrder: UInt64 = 96, headerLength: UInt64 = 100
    }

    /// A valid v3 image, 64 KiB clusters, with data and a compressed cluster.
    static func makeImage(_ dir: TemporaryDirectory, compat: String = "1.1") throws -> String {
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", path, "1M"])
        try Q.io(path, ["write -c -P 0x5a 0 64k", "write -P 0x11 64k 64k", "write -P 0x22 512k 4k"])
        return path
    }

    static func header(_ path: String) throws -> QCOW2Header {
        try QCOW2Header.parse(Array(try Q.fileBytes(path).prefix(65536)))
    }

    /// The host offset of the L2 table for the first 512 MiB.
    static func firstL2(_ path: String) throws -> UInt64 {
        let h = try header(path)
        let bytes = try Q.fileBytes(path)
        return ByteCursor.peek(UInt64.self, in: bytes, at: Int(h.l1TableOffset))! & EntryBits.offsetMask
    }

    static func refusal(_ path: String, readOnly: Bool = true, options: QCOW2Options = .init()) -> QCOW2Error? {
        do {
            let device = try QCOW2Device(path: path, readOnly: readOnly, options: options)
            device.close()
            return nil
        } catch {
            return error
        }
    }

    struct HeaderPatch: CustomTestStringConvertible, Sendable {
        var name: String
        var offset: UInt64
        var bytes: [UInt8]
        var expected: QCOW2Error?  // nil: any refusal
        var testDescription: String { name }
    }

    static let headerPatches: [HeaderPatch] = [
        HeaderPatch(name: "bad magic", offset: 0, bytes: [0x51, 0x46, 0x49, 0x00], expected: .notQCOW2),
        HeaderPatch(name: "version 4", offset: Field.version, bytes: Q.bigEndian(UInt32(4)),
                    expected: .unsupportedVersion(4)),
        HeaderPatch(name: "version 1", offset: Field.version, bytes: Q.bigEndian(UInt32(1)),
                    expected: .unsupportedVersion(1)),
        HeaderPatch(name: "cluster_bits 8", offset: Field.clusterBits, bytes: Q.bigEndian(UInt32(8)),
                    expected: .invalidClusterBits(8)),
        HeaderPatch(name: "cluster_bits 22", offset: Field.clusterBits, bytes: Q.bigEndian(UInt32(22)),
                    expected: .invalidClusterBits(22)),
        HeaderPatch(name: "size 2^63", offset: Field.size, bytes: Q.bigEndian(UInt64(1) << 63),
                    expected: .invalidSize(1 << 63)),
        HeaderPatch(name: "size needs a larger L1", offset: Field.size, bytes: Q.bigEndian(UInt64(1) << 40),
                    expected: nil),
        HeaderPatch(name: "AES", offset: Field.crypt, bytes: Q.bigEndian(UInt32(1)), expected: .encrypted(method: "AES")),
        HeaderPatch(name: "l1_size huge", offset: Field.l1Size, bytes: Q.bigEndian(UInt32(0x1000_0000)), expected: nil),
        HeaderPatch(name: "l1_size 0", offset: Field.l1Size, bytes: Q.bigEndian(UInt32(0)), expected: nil),
        HeaderPatch(name: "L1 misaligned", offset: Field.l1Offset, bytes: Q.bigEndian(UInt64(0x30008)), expected: nil),
        HeaderPatch(name: "L1 past EOF", offset: Field.l1Offset, bytes: Q.bigEndian(UInt64(1) << 40), expected: nil),
        HeaderPatch(name: "refcount table past EOF", offset: Field.refcountOffset,
                    bytes: Q.bigEndian(UInt64(1) << 40), expected: nil),
        HeaderPatch(name: "refcount table huge", offset: Field.refcountClusters,
                    bytes: Q.bigEndian(UInt32(0x100_0000)), expected: nil),
        HeaderPatch(name: "snapshots huge", offset: Field.snapshotCount, bytes: Q.bigEndian(UInt32(0xFFFF_FFFF)),
                    expected: nil),
        HeaderPatch(name: "unknown incompatible bit", offset: Field.incompatible, bytes: Q.bigEndian(UInt64(1) << 40),
                    expected: .unknownIncompatibleFeatures(names: ["unknown feature bit 40"])),
        HeaderPatch(name: "refcount_order 7", offset: Field.refcountOrder, bytes: Q.bigEndian(UInt32(7)),
                    expected: .invalidRefcountOrder(7)),
        HeaderPatch(name: "header_length 100", offset: Field.headerLength, bytes: Q.bigEndian(UInt32(100)),
                    expected: .invalidHeaderLength(100)),
        HeaderPatch(name: "header_length past cluster", offset: Field.headerLength,
                    bytes: Q.bigEndian(UInt32(0x20000)), expected: .invalidHeaderLength(0x20000)),
        HeaderPatch(name: "backing name out of cluster", offset: Field.backingOffset,
                    bytes: Q.bigEndian(UInt64(0x1_0000)) + Q.bigEndian(UInt32(10)), expected: .invalidBackingFileName),
        // qemu 7.2 writes header_length 112, so the first extension's length is at 116.
        HeaderPatch(name: "extension overruns", offset: 116, bytes: Q.bigEndian(UInt32(0xFFFF_FF00)), expected: nil),
    ]

    @Test(arguments: headerPatches)
    func refusedHeader(_ patch: HeaderPatch) throws {
        let dir = try TemporaryDirectory("qcow2-corrupt")
        let path = try Self.makeImage(dir)
        try Q.patch(path, at: patch.offset, patch.bytes)
        let error = Self.refusal(path)
        #expect(error != nil)
        if let expected = patch.expected { #expect(error == expected) }
        if let error { #expect(!error.description.isEmpty && !error.description.contains("\n")) }
    }

    @Test(arguments: [10, 80, 100, 0x30000, 0x48000])
    func truncated(to length: Int) throws {
        let dir = try TemporaryDirectory("qcow2-trunc")
        let path = try Self.makeImage(dir)
        try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path)).truncate(atOffset: UInt64(length))
        if let error = Self.refusal(path) {
            _ = error  // refused at open: fine
        } else {
            // Opened (the tables fit): reading the lost clusters fails or reads zeros, never crashes.
            let device = try QCOW2Device(path: path, readOnly: true)
            defer { device.close() }
            _ = try? Q.readAll(device)
        }
    }

    @Test func namedUnknownFeature() throws {
        let dir = try TemporaryDirectory("qcow2-names")
        let path = try Self.makeImage(dir)
        // Rename the table entry for incompatible bit 4 to bit 9, then set bit 9.
        var bytes = try Q.fileBytes(path)
        let name = Array("extended L2 entries".utf8)
        guard let at = (0..<65536 - 48).first(where: { bytes[$0] == 0 && bytes[$0 + 1] == 4
                                                       && Array(bytes[($0 + 2)..<($0 + 2 + name.count)]) == name })
        else { Issue.record("no feature name table entry for bit 4"); return }
        bytes[at + 1] = 9
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        try Q.patch(path, at: Field.incompatible, Q.bigEndian(UInt64(1) << 9))
        #expect(Self.refusal(path) == .unknownIncompatibleFeatures(names: ["extended L2 entries"]))
    }

    @Test func corruptBitRefusedWritable() throws {
        let dir = try TemporaryDirectory("qcow2-corruptbit")
        let path = try Self.makeImage(dir)
        try Q.patch(path, at: Field.incompatible, Q.bigEndian(UInt64(2)))
        #expect(Self.refusal(path, readOnly: false) == .corrupt)
        #expect(Self.refusal(path, readOnly: true) == nil)
    }

    @Test func luksRefused() throws {
        let dir = try TemporaryDirectory("qcow2-luks")
        let path = dir.file("luks.qcow2")
        try Q.img(["create", "-q", "--object", "secret,id=sec0,data=abc", "-f", "qcow2",
                   "-o", "encrypt.format=luks,encrypt.key-secret=sec0", path, "1M"])
        #expect(Self.refusal(path) == .encrypted(method: "LUKS"))
    }

    @Test func zstdFieldMismatch() throws {
        let dir = try TemporaryDirectory("qcow2-ctype")
        let path = dir.file("z.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "1M"])
        try Q.patch(path, at: 104, [2])
        #expect(Self.refusal(path) == .unsupportedCompressionType(2))
    }

    @Test func backingChainProblems() throws {
        let dir = try TemporaryDirectory("qcow2-chainbad")
        let a = dir.file("a.qcow2"), b = dir.file("b.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", a, "1M"])
        try Q.img(["create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b, "1M"])
        try Q.img(["rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a])
        #expect(Self.refusal(b) == .backingChainLoop(path: b))
        let selfLoop = dir.file("self.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", selfLoop, "1M"])
        #expect(Self.refusal(selfLoop) == .backingChainLoop(path: selfLoop))

        var previous = dir.file("c0.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", previous, "1M"])
        for i in 1...4 {
            let next = dir.file("c\(i).qcow2")
            try Q.img(["create", "-q", "-f", "qcow2", "-b", previous, "-F", "qcow2", next, "1M"])
            previous = next
        }
        #expect(Self.refusal(previous, options: QCOW2Options(maxBackingDepth: 3)) == .backingChainTooDeep(limit: 3))
        #expect(Self.refusal(previous, options: QCOW2Options(maxBackingDepth: 4)) == nil)

        let missing = dir.file("missing.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", missing, "1M"])
        guard case .backingFileUnavailable? = Self.refusal(missing) else {
            Issue.record("missing backing file not refused"); return
        }
        let vmdk = dir.file("vmdk.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-u", "-b", "x.vmdk", "-F", "vmdk", vmdk, "1M"])
        #expect(Self.refusal(vmdk) == .unsupportedBackingFormat("vmdk"))
    }

    struct ReadDamage: CustomTestStringConvertible, Sendable {
        var name: String
        var testDescription: String { name }
    }

    /// Damage found while serving fails the read with DeviceError(.io).
    @Test(arguments: ["L2 past EOF", "L2 misaligned", "data misaligned", "compressed garbage",
                      "compressed past EOF", "offset below a cluster"])
    func damagedWhileServing(_ damage: String) throws {
        let dir = try TemporaryDirectory("qcow2-damage")
        let path = try Self.makeImage(dir)
        let h = try Self.header(path)
        let l2 = try Self.firstL2(path)
        let bytes = try Q.fileBytes(path)
        let entry0 = ByteCursor.peek(UInt64.self, in: bytes, at: Int(l2))!
        switch damage {
        case "L2 past EOF": try Q.patch(path, at: h.l1TableOffset, Q.bigEndian(EntryBits.copied | 0x7FFF_0000))
        case "L2 misaligned": try Q.patch(path, at: h.l1TableOffset, Q.bigEndian(EntryBits.copied | (l2 + 512)))
        case "data misaligned":
            let entry1 = ByteCursor.peek(UInt64.self, in: bytes, at: Int(l2) + 8)!
            try Q.patch(path, at: l2 + 8, Q.bigEndian(entry1 + 512))
        case "compressed garbage":
            let g = Geometry(header: h)
            let host = entry0 & ((1 << g.compressedSizeShift) - 1)
            try Q.patch(path, at: host, [UInt8](repeating: 0xFF, count: 64))
        case "compressed past EOF":
            try Q.patch(path, at: l2, Q.bigEndian(EntryBits.compressed | 0x3FFF_0000))
        case "offset below a cluster":
            try Q.patch(path, at: l2 + 8, Q.bigEndian(EntryBits.copied | 0x200))
        default: Issue.record("unknown damage")
        }
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        let error = #expect(throws: DeviceError.self) { try Q.readAll(device) }
        #expect(error?.kind == .io)
    }

    @Test func v2ZeroFlagIsIOError() throws {
        let dir = try TemporaryDirectory("qcow2-v2zero")
        let path = try Self.makeImage(dir, compat: "0.10")
        let l2 = try Self.firstL2(path)
        let bytes = try Q.fileBytes(path)
        let entry1 = ByteCursor.peek(UInt64.self, in: bytes, at: Int(l2) + 8)!
        try Q.patch(path, at: l2 + 8, Q.bigEndian(entry1 | 1))
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        let error = #expect(throws: DeviceError.self) { try Q.readAll(device) }
        #expect(error?.kind == .io)
    }
}

/// Inconsistent metadata met by a write sets the corrupt bit and stops writes.
@Suite struct CorruptOnWriteTests {
    @Test func misalignedL2MarksCorrupt() throws {
        let dir = try TemporaryDirectory("qcow2-markcorrupt")
        let path = try CorruptImageTests.makeImage(dir)
        let h = try CorruptImageTests.header(path)
        let l2 = try CorruptImageTests.firstL2(path)
        try Q.patch(path, at: h.l1TableOffset, Q.bigEndian(EntryBits.copied | (l2 + 512)))
        let device = try QCOW2Device(path: path, readOnly: false)
        let first = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try device.write($0, at: 0, fua: false) }
        }
        #expect(first?.kind == .io)
        // Later writes are refused even where the metadata is fine.
        let second = #expect(throws: DeviceError.self) {
            try device.writeZeroes(at: 0, length: 4096, mayDeallocate: false, fast: false, fua: false)
        }
        #expect(second?.kind == .io)
        device.close()
        #expect(try CorruptImageTests.header(path).incompatibleFeatures.contains(.corrupt))
        #expect(CorruptImageTests.refusal(path, readOnly: false) == .corrupt)
    }
}
