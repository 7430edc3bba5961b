import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// QCOW2Device's extents and allocation depth equal what qemu-nbd serves
/// for the same image, as `nbdinfo --map` prints it (base:allocation and,
/// with qemu-nbd -A, qemu:allocation-depth). qemu-nbd is the oracle only;
/// no swiftnbd server is involved.
@Suite struct QemuNBDMapTests {
    struct Row: Equatable, CustomStringConvertible {
        var offset: UInt64, length: UInt64, value: UInt32
        var description: String { "\(offset)+\(length):\(value)" }
    }

    /// Runs qemu-nbd on `path` and returns nbdinfo's map rows.
    static func qemuMap(_ path: String, context: String) throws -> [Row] {
        let server = try QemuNBDProcess(["-t", "-e", "2", "-r", "-f", "qcow2"]
                                        + (context == "qemu:allocation-depth" ? ["-A"] : []) + [path])
        defer { server.stop() }
        _ = try server.connect()  // ready once a client gets through
        let out = try Tools.check("nbdinfo", ["--map=\(context)", server.uri])
        return merge(out.split(separator: "\n").map { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return Row(offset: UInt64(f[0])!, length: UInt64(f[1])!, value: UInt32(f[2])!)
        })
    }

    static func merge(_ rows: [Row]) -> [Row] {
        var out: [Row] = []
        for r in rows where r.length > 0 {
            if let last = out.last, last.value == r.value, last.offset + last.length == r.offset {
                out[out.count - 1].length += r.length
            } else {
                out.append(r)
            }
        }
        return out
    }

    static func ours(_ device: QCOW2Device, depth: Bool) throws -> [Row] {
        var rows: [Row] = []
        var position: UInt64 = 0
        while position < device.size {
            let before = position
            if depth {
                for e in try device.allocationDepth(at: position, length: device.size - position) {
                    rows.append(Row(offset: position, length: e.length, value: e.depth))
                    position += e.length
                }
            } else {
                for e in try device.extents(at: position, length: device.size - position) {
                    rows.append(Row(offset: position, length: e.length, value: e.flags.rawValue))
                    position += e.length
                }
            }
            if position == before { break }
        }
        return merge(rows)
    }

    static func check(_ path: String) throws {
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        let (a, b) = (try ours(device, depth: false), try qemuMap(path, context: "base:allocation"))
        #expect(a == b, "ours \(a)\nqemu \(b)")
        #expect(try ours(device, depth: true) == qemuMap(path, context: "qemu:allocation-depth"))
    }

    @Test func backingChain() throws {
        let dir = try TemporaryDirectory("qcow2-nbdmap")
        try Self.check(try ChainAndFeatureTests.makeChain(dir))
    }

    @Test func extendedL2Chain() throws {
        let dir = try TemporaryDirectory("qcow2-nbdmap-ext")
        let top = try ChainAndFeatureTests.makeChain(dir, topOptions: ["extended_l2=on"])
        try Q.io(top, ["write -P 0xa1 8k 2k", "write -z 30k 4k", "write -c -P 3 2M 64k"])
        try Self.check(top)
    }

    @Test func preallocatedMetadata() throws {
        let dir = try TemporaryDirectory("qcow2-nbdmap-prealloc")
        let path = dir.file("p.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "1M"])
        try Q.io(path, ["write -P 1 0 64k", "write -z 128k 64k"])
        try Self.check(path)
    }

    @Test func externalDataFile() throws {
        let dir = try TemporaryDirectory("qcow2-nbdmap-data")
        let path = dir.file("d.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("d.data"))", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        try Self.check(path)
    }
}

/// Writes through QCOW2Device to an extended-L2 image over a backing file
/// allocate only the touched subclusters: qemu-nbd then reports the same
/// map and allocation depth as we do, and qemu reads the same bytes.
@Suite struct SubclusterWriteTests {
    @Test func subclusterWritesMatchQemu() throws {
        let dir = try TemporaryDirectory("qcow2-subwrite")
        let top = try ChainAndFeatureTests.makeChain(dir, topOptions: ["extended_l2=on"])
        var model = try Q.qemuRaw(top, scratch: dir)
        let device = try QCOW2Device(path: top, readOnly: false)
        let writes: [(UInt64, Int)] = [(4096, 100), (2048 * 5 + 7, 3000), (700 * 1024, 2048), (2 << 20, 6000),
                                       (3 * 65536 - 10, 20)]
        for (offset, length) in writes {
            let bytes = [UInt8](repeating: UInt8(length % 251), count: length)
            try bytes.withUnsafeBytes { try device.write($0, at: offset, fua: false) }
            model.replaceSubrange(Int(offset)..<Int(offset) + length, with: bytes)
        }
        // Partial-cluster zeroes: whole subclusters get zero bits, the edges real zeros.
        for (offset, length) in [(UInt64(1000), UInt64(9000)), (2600 * 1024, 6144), (2 << 20, 2048)] {
            try device.writeZeroes(at: offset, length: length, mayDeallocate: false, fast: false, fua: false)
            model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
        }
        device.close()
        try WriteTests.expectConsistent(top, model: model, dir: dir)
        try QemuNBDMapTests.check(top)
        let depth = try QCOW2Device(path: top, readOnly: true)
        defer { depth.close() }
        // 700 KiB lies in a cluster the top never wrote before: only its 2 KiB subcluster is local.
        #expect(try depth.allocationDepth(at: 700 * 1024, length: 2048) == [DepthExtent(length: 2048, depth: 1)])
        #expect(try depth.allocationDepth(at: 702 * 1024, length: 2048).first?.depth != 1)
    }
}
