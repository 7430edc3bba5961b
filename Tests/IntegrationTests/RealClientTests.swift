import Foundation
import TestSupport
import Testing

/// nbdinfo, nbdcopy, qemu-img and qemu-io see a raw export as the file it is.
@Suite struct RealClientTests {
    @Test func nbdinfoShowsTheExportWithSizeAndFlags() throws {
        let fixture = try RawFixture()
        let server = try ServerProcess(["-t", "-D", "a test disk", fixture.image])
        let info = try jsonObject(try Tools.check("nbdinfo", ["--json", server.uri])) as? [String: Any]
        let export = try #require((info?["exports"] as? [[String: Any]])?.first)
        #expect(info?["protocol"] as? String == "newstyle-fixed")
        #expect(export["export-size"] as? Int == fixture.size)
        #expect(export["description"] as? String == "a test disk")
        #expect(export["is_read_only"] as? Bool == false)
        #expect(export["can_flush"] as? Bool == true)
        #expect(export["can_trim"] as? Bool == true)
        #expect(export["can_zero"] as? Bool == true)
        #expect(export["block_size_maximum"] as? Int == 32 << 20)
        #expect((export["contexts"] as? [String])?.contains("base:allocation") == true)
    }

    @Test func nbdcopyReproducesTheFileByteForByte() throws {
        let fixture = try RawFixture()
        let server = try ServerProcess([fixture.image])
        let out = fixture.scratch.file("copy.raw")
        try Tools.check("nbdcopy", [server.uri, out])
        #expect(try Data(contentsOf: URL(fileURLWithPath: out)) == fixture.contents)
        // Without -t the server leaves once its only client has gone.
        #expect(server.waitForExit(timeout: 10) == 0)
    }

    @Test func qemuImgComparesIdentical() throws {
        let fixture = try RawFixture()
        let server = try ServerProcess(["-t", fixture.image])
        let result = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.image, server.uri])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("Images are identical"))
    }

    @Test func nbdinfoMapReportsHolesAndData() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let server = try ServerProcess(["-t", fixture.image])
        let map = try #require(try jsonObject(try Tools.check("nbdinfo", ["--map", "--json", server.uri])) as? [[String: Any]])
        // The fixture has data in even MiBs and holes in odd ones.
        let expected: [(Int, Int, Int)] = [(0, 1 << 20, 0), (1 << 20, 1 << 20, 3), (2 << 20, 1 << 20, 0), (3 << 20, 1 << 20, 3)]
        #expect(map.map { [$0["offset"] as? Int, $0["length"] as? Int, $0["type"] as? Int] }
            == expected.map { [$0.0, $0.1, $0.2] })
    }

    @Test func qemuIoWritesLandInTheFile() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let model = fixture.scratch.file("model.raw")
        try FileManager.default.copyItem(atPath: fixture.image, toPath: model)
        let commands = ["write -P 0xab 1000 70000", "write -z 2M 300k", "write -P 0x11 4190000 4304",
                        "discard 3M 64k", "flush"]
        let server = try ServerProcess(["-t", fixture.image])
        try ImageFactory.io(server.uri, format: "raw", commands)
        try ImageFactory.io(model, format: "raw", commands)
        let result = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", model, server.uri])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(server.stop() == 0)
        // Discarded bytes are unspecified by NBD; everything else must match the model.
        var got = try fixture.contents, want = try Data(contentsOf: URL(fileURLWithPath: model))
        got.replaceSubrange((3 << 20)..<((3 << 20) + 65536), with: Data(count: 65536))
        want.replaceSubrange((3 << 20)..<((3 << 20) + 65536), with: Data(count: 65536))
        #expect(got == want)
    }

    @Test func readOnlyExportIsReadOnlyToClients() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let before = try fixture.contents
        let server = try ServerProcess(["-t", "-r", fixture.image])
        let info = try Tools.check("nbdinfo", ["--json", server.uri])
        #expect(info.contains("\"is_read_only\": true"))
        let write = try Tools.run("qemu-io", ["-f", "raw", "-c", "write -P 0x66 0 512", server.uri])
        // qemu-io refuses to open a read-only export for writing.
        #expect(!write.succeeded && write.stderr.contains("Permission denied"), "\(write.stdout)\(write.stderr)")
        #expect(server.stop() == 0)
        #expect(try fixture.contents == before)
    }

    @Test func missingImageIsAOneLineErrorAndExitOne() throws {
        let result = try Tools.run(ServerProcess.binary, ["-p", "0", "/nonexistent/disk.img"])
        #expect(result.status == 1)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1)
        #expect(result.stderr.contains("/nonexistent/disk.img"))
    }

    @Test func sigtermStopsCleanly() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", fixture.image])
        #expect(server.stop() == 0)
    }
}
