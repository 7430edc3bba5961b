import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Persistent bitmaps stay true through the engine's writes, zeroes and
/// trims: after a clean close every enabled bitmap has exactly the bits of
/// the ranges written, without in_use; a disabled one is unchanged.
@Suite struct PersistentBitmapTests {
    struct Case: Sendable, CustomStringConvertible {
        var options: String
        /// Granularities of the enabled bitmaps b0 and b1.
        var granularities: [UInt64]
        var description: String { "\(options) g=\(granularities)" }
    }

    static let cases = [
        Case(options: "compat=1.1", granularities: [65536, 131072]),
        // 4 KiB clusters and 512-byte granules: the bitmap data spans four clusters.
        Case(options: "compat=1.1,cluster_size=4k", granularities: [512, 1 << 20]),
        Case(options: "compat=1.1,cluster_size=16k,extended_l2=on,lazy_refcounts=on", granularities: [4096, 65536]),
    ]

    /// Granule runs each bitmap must report: the union of the ops' ranges, rounded out.
    static func expectedRuns(_ ops: [WriteTests.Op], granularity: UInt64, size: UInt64) -> [BitmapExtent] {
        var dirty = [Bool](repeating: false, count: Int((size + granularity - 1) / granularity))
        for op in ops {
            let (offset, length): (UInt64, UInt64)
            switch op {
            case .write(let o, let bytes): (offset, length) = (o, UInt64(bytes.count))
            case .zero(let o, let l, _): (offset, length) = (o, l)
            case .trim(let o, let l): (offset, length) = (o, l)
            }
            for g in Int(offset / granularity)...Int((offset + length - 1) / granularity) { dirty[g] = true }
        }
        var runs: [BitmapExtent] = []
        for (g, bit) in dirty.enumerated() {
            let length = min(granularity, size - UInt64(g) * granularity)
            if let last = runs.last, last.dirty == bit { runs[runs.count - 1].length += length } else {
                runs.append(BitmapExtent(length: length, dirty: bit))
            }
        }
        return runs
    }

    static func inUseCount(_ path: String) throws -> Int {
        try Tools.check("qemu-img", ["info", "-U", path]).components(separatedBy: "in-use").count - 1
    }

    @Test(arguments: cases)
    func writesSetTheBitsOfEnabledBitmaps(_ c: Case) throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps")
        let path = try WriteTests.plain(c.options)(dir)
        try Q.img(["bitmap", "--add", "-g", "\(c.granularities[0])", path, "b0"])
        try Q.img(["bitmap", "--add", "-g", "\(c.granularities[1])", path, "b1"])
        try Q.img(["bitmap", "--add", "--disable", path, "bdis"])
        var model = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        #expect(try Self.inUseCount(path) == 2, "the enabled bitmaps are in use while open")
        let ops = WriteTests.randomOps(count: 30, size: device.size, cluster: device.geometry.clusterSize, seed: 11)
        try WriteTests.apply(Array(ops.prefix(15)), to: device, model: &model)
        try device.flush()  // a write-back in the middle: later bits must still reach the disk
        try WriteTests.apply(Array(ops.dropFirst(15)), to: device, model: &model)
        device.close()

        try WriteTests.expectConsistent(path, model: model, dir: dir)
        #expect(try Self.inUseCount(path) == 0, "consistent after a clean close")
        let reopened = try QCOW2Device(path: path, readOnly: true)
        defer { reopened.close() }
        for (name, granularity) in zip(["b0", "b1"], c.granularities) {
            let actual = try reopened.dirtyBitmapExtents(named: name, at: 0, length: reopened.size)
            #expect(actual == Self.expectedRuns(ops, granularity: granularity, size: reopened.size), "\(name)")
        }
        #expect(try reopened.dirtyBitmapExtents(named: "bdis", at: 0, length: reopened.size)
            == [BitmapExtent(length: reopened.size, dirty: false)])
    }

    /// Writers set bits while flushes copy the bitmap out and write it back: no bit is lost.
    @Test func bitsSetDuringFlushesAreKept() throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps-mt")
        let path = try WriteTests.plain("compat=1.1,cluster_size=4k")(dir)
        try Q.img(["bitmap", "--add", "-g", "4k", path, "b0"])
        let device = try QCOW2Device(path: path, readOnly: false)
        let threads = 4, blocks = Int(device.size / 4096)
        // Every third 4 KiB block, spread over the threads; a fifth thread flushes.
        runTogether(threads + 1) { role in
            if role == threads {
                for _ in 0..<20 { try? device.flush() }
                return
            }
            let t = role
            let bytes = [UInt8](repeating: UInt8(t + 1), count: 4096)
            for block in stride(from: t * 3, to: blocks, by: threads * 3) {
                try? bytes.withUnsafeBytes { try device.write($0, at: UInt64(block * 4096), fua: false) }
            }
        }
        device.close()
        let check = try Tools.run("qemu-img", ["check", path])
        #expect(check.status == 0, "\(check.stdout)")
        let reopened = try QCOW2Device(path: path, readOnly: true)
        defer { reopened.close() }
        var expected: [BitmapExtent] = []
        for block in 0..<blocks {
            let dirty = block % 3 == 0
            if let last = expected.last, last.dirty == dirty { expected[expected.count - 1].length += 4096 } else {
                expected.append(BitmapExtent(length: 4096, dirty: dirty))
            }
        }
        #expect(try reopened.dirtyBitmapExtents(named: "b0", at: 0, length: reopened.size) == expected)
    }

    @Test func anOpenRefusedForAnotherReasonLeavesBitmapsConsistent() throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps-refused")
        let base = dir.file("base.raw"), path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "raw", base, "1M"])
        try Q.img(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path, "1M"])
        try Q.img(["bitmap", "--add", path, "b0"])
        try FileManager.default.removeItem(atPath: base)
        #expect(throws: QCOW2Error.self) { try QCOW2Device(path: path, readOnly: false).close() }
        #expect(try Self.inUseCount(path) == 0)
    }

    @Test func readOnlyOpenChangesNothing() throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps-ro")
        let path = try WriteTests.plain("compat=1.1")(dir)
        try Q.img(["bitmap", "--add", path, "b0"])
        let before = try Q.fileBytes(path)
        let device = try QCOW2Device(path: path, readOnly: true)
        #expect(throws: DeviceError.self) { try device.trim(at: 0, length: 65536, fua: false) }
        device.close()
        #expect(try Q.fileBytes(path) == before)
    }

    @Test func aBrokenDirectoryFailsOnlyTheBitmapsOfAReadOnlyOpen() throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps-broken")
        let path = try WriteTests.plain("compat=1.1")(dir)
        try Q.img(["bitmap", "--add", path, "b0"])
        // The bitmaps extension's directory offset, moved off its cluster boundary.
        let bytes = try Q.fileBytes(path)
        let type: [UInt8] = [0x23, 0x85, 0x28, 0x75]
        let ext = try #require((72..<65536).first { Array(bytes[$0..<$0 + 4]) == type })
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: UInt64(ext + 8 + 23))
        try handle.write(contentsOf: [0x08])
        try handle.close()
        #expect(throws: QCOW2Error.self) { try QCOW2Device(path: path, readOnly: false).close() }
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        #expect(try Q.readAll(device).count == Int(device.size))
        #expect(throws: QCOW2Error.bitmapUnavailable(
            name: "b0", reason: "invalid qcow2 header extension 0x23852875: bitmap directory is misplaced")) {
            try device.requireExportableBitmap(named: "b0")
        }
    }

    @Test func bitmapsOfAnOlderProgramAreIgnored() throws {
        let dir = try TemporaryDirectory("qcow2-bitmaps-autoclear")
        let path = try WriteTests.plain("compat=1.1")(dir)
        try Q.img(["bitmap", "--add", path, "b0"])
        // Autoclear bit 0 cleared, as a program without bitmap support leaves it: the bitmaps are inconsistent.
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 88)
        try handle.write(contentsOf: [UInt8](repeating: 0, count: 8))
        try handle.close()
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        #expect(throws: QCOW2Error.bitmapUnavailable(name: "b0", reason: "the image has no bitmap of that name")) {
            try device.requireExportableBitmap(named: "b0")
        }
    }
}
