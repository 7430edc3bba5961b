import Foundation
import Glibc
import TestSupport
import Testing

/// Persistent qcow2 bitmaps, the incremental-backup path: exported as
/// `qemu:dirty-bitmap:NAME` with the extents qemu-nbd -B gives, and kept
/// true by writes through swiftnbd, as qemu keeps them when it writes.
@Suite struct DirtyBitmapTests {
    static let bitmaps = ["b0", "b1", "bdis", "late"]

    /// A 64 MiB image with data, then bitmaps b0 (64 KiB granularity), b1
    /// (256 KiB), bdis (disabled) and late (enabled after the first writes),
    /// then writes that only the enabled ones see.
    static func image(in scratch: TemporaryDirectory, name: String = "disk.qcow2") throws -> String {
        let path = scratch.file(name)
        try ImageFactory.create(path, format: "qcow2", size: "64M", options: [])
        try ImageFactory.io(path, format: "qcow2", ["write -P 1 0 8M"])
        try Tools.check("qemu-img", ["bitmap", "--add", path, "b0"])
        try Tools.check("qemu-img", ["bitmap", "--add", "-g", "256K", path, "b1"])
        try Tools.check("qemu-img", ["bitmap", "--add", "--disable", path, "bdis"])
        try Tools.check("qemu-img", ["bitmap", "--add", "--disable", path, "late"])
        try ImageFactory.io(path, format: "qcow2", ["write -P 2 1M 100K", "write -P 3 10M 4K"])
        try Tools.check("qemu-img", ["bitmap", "--enable", path, "late"])
        try ImageFactory.io(path, format: "qcow2", ["write -z 30M 1M"])
        return path
    }

    /// Writes, unaligned writes, zeroes with and without holes, a discard:
    /// run by qemu-io on one twin and through swiftnbd on the other.
    static let writes = ["write -P 7 3M 4K", "write -P 8 10000 70000", "write -z 20M 1M", "discard 4M 1M",
                         "write -z -u 6M 128K", "write -P 9 40M 200K", "flush"]

    /// `nbdinfo --map=qemu:dirty-bitmap:NAME` of `uri`.
    static func map(_ bitmap: String, _ uri: String) throws -> String {
        try Tools.check("nbdinfo", ["--map=qemu:dirty-bitmap:\(bitmap)", uri])
    }

    /// What qemu-nbd -r -B reports for each bitmap of `path`.
    static func qemuMaps(_ path: String, _ names: [String] = bitmaps) throws -> [String: String] {
        let qemu = try QemuNBDProcess(["-r", "-f", "qcow2", "-t"] + names.flatMap { ["-B", $0] } + [path])
        defer { qemu.stop() }
        try qemu.connect().shutdown()
        var maps: [String: String] = [:]
        for name in names { maps[name] = try map(name, qemu.uri) }
        return maps
    }

    /// Each bitmap's flags as `qemu-img info` reports them.
    static func flags(_ path: String) throws -> [String: [String]] {
        let info = try jsonObject(try Tools.check("qemu-img", ["info", "--output=json", "-U", path]))
        let specific = (info as? [String: Any])?["format-specific"] as? [String: Any]
        let list = (specific?["data"] as? [String: Any])?["bitmaps"] as? [[String: Any]] ?? []
        return Dictionary(uniqueKeysWithValues: list.map { ($0["name"] as! String, $0["flags"] as! [String]) })
    }

    @Test func mapsEqualQemuNBD() throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let expected = try Self.qemuMaps(path)
        #expect(expected["b0"]!.contains("dirty") && !expected["bdis"]!.contains("dirty"), "the fixture's premise")
        #expect(expected["late"] != expected["b0"], "late saw only the writes after --enable")
        let server = try ServerProcess(["-t", "-r", "-e", "4"] + Self.bitmaps.flatMap { ["-B", $0] } + [path])
        defer { server.stop() }
        for name in Self.bitmaps {
            #expect(try Self.map(name, server.uri) == expected[name], "\(name)")
        }
        let contexts = try Tools.check("nbdinfo", ["--list", "--content", server.uri])
        for name in Self.bitmaps { #expect(contexts.contains("qemu:dirty-bitmap:\(name)")) }
    }

    @Test func exportSpecTakesBitmaps() throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let expected = try Self.qemuMaps(path, ["b1"])
        let server = try ServerProcess(["-t", "-e", "4", "--export", "name=backup,file=\(path),readonly=on,bitmap=b1"])
        defer { server.stop() }
        #expect(try Self.map("b1", server.uri + "/backup") == expected["b1"])
    }

    /// The same writes through swiftnbd and by qemu-io on a twin image: after
    /// a clean stop the bitmaps are consistent and qemu-nbd maps them alike.
    @Test func writesThroughServerKeepBitmapsTrue() throws {
        let scratch = try TemporaryDirectory()
        let ours = try Self.image(in: scratch, name: "ours.qcow2")
        let twin = scratch.file("twin.qcow2"), before = scratch.file("before.qcow2")
        try FileManager.default.copyItem(atPath: ours, toPath: twin)
        try FileManager.default.copyItem(atPath: ours, toPath: before)
        try ImageFactory.io(twin, format: "qcow2", Self.writes)

        let server = try ServerProcess(["-t", "--discard=unmap", ours])
        #expect(try Self.flags(ours)["b0"] == ["in-use", "auto"], "in use while open")
        try ImageFactory.io(server.uri, format: "raw", Self.writes)
        #expect(server.stop() == 0)

        let flags = try Self.flags(ours)
        #expect(flags == ["b0": ["auto"], "b1": ["auto"], "bdis": [], "late": ["auto"]], "consistent after a clean stop")
        try Tools.check("qemu-img", ["check", ours])
        let expected = try Self.qemuMaps(twin), actual = try Self.qemuMaps(ours)
        for name in Self.bitmaps { #expect(actual[name] == expected[name], "\(name)") }
        #expect(actual["b0"] != (try Self.qemuMaps(before, ["b0"]))["b0"], "the writes changed b0")
    }

    @Test func killLeavesEnabledBitmapsInUse() throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let server = try ServerProcess(["-t", path])
        try ImageFactory.io(server.uri, format: "raw", ["write -P 5 2M 64K", "flush"])
        server.process.send(SIGKILL)
        _ = server.process.waitForExit(timeout: .seconds(30))
        #expect(try Self.flags(path) == ["b0": ["in-use", "auto"], "b1": ["in-use", "auto"], "bdis": [],
                                         "late": ["in-use", "auto"]])
        // Leaked clusters (exit 3) are what a kill may leave; errors (exit 2) are not.
        let check = try Tools.run("qemu-img", ["check", path])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout)")
        // Inconsistent is refused, as qemu-nbd refuses it; the disabled one is still good.
        let refused = try Tools.run(ServerProcess.binary, ["-r", "-k", scratch.file("x.sock"), "-B", "b0", path])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("bitmap 'b0'") && refused.stderr.contains("inconsistent"), "\(refused.stderr)")
        let server2 = try ServerProcess(["-t", "-r", "-B", "bdis", path])
        defer { server2.stop() }
        #expect(try Self.map("bdis", server2.uri) == (try Self.qemuMaps(path, ["bdis"]))["bdis"])
    }

    @Test func readOnlyExportLeavesImageAlone() throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let server = try ServerProcess(["-t", "-r", "-B", "b0", path])
        _ = try Self.map("b0", server.uri)
        #expect(server.stop() == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
    }

    /// With -s the writes go to the overlay: the image and its bitmaps stay as they were.
    @Test func temporarySnapshotLeavesBitmapsAlone() throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let expected = try Self.qemuMaps(path, ["b0"])
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let server = try ServerProcess(["-t", "-s", "-B", "b0", path])
        try ImageFactory.io(server.uri, format: "raw", ["write -P 6 50M 1M", "flush"])
        #expect(try Self.map("b0", server.uri) == expected["b0"])
        #expect(server.stop() == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)
    }

    @Test(arguments: [(["-B", "nope"], "no bitmap of that name"), (["-f", "raw", "-B", "b0"], "raw images have no bitmaps")])
    func refusesBitmapsItCannotExport(_ arguments: [String], _ why: String) throws {
        let scratch = try TemporaryDirectory()
        let path = try Self.image(in: scratch)
        let result = try Tools.run(ServerProcess.binary, ["-k", scratch.file("x.sock")] + arguments + [path])
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1 && result.stderr.contains(why), "\(result.stderr)")
    }
}
