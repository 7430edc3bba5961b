import Foundation
import TestSupport
import Testing

/// Connection logging, and SIGHUP reopening the log file after logrotate moved it.
@Suite struct LoggingTests {
    @Test func connectionsAreLoggedWithPeerExportAndBytes() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", "-x", "disk", fixture.image])
        let client = try NBDClient(uri: server.uri + "/disk")
        _ = try client.pread(count: 65536, offset: 0)
        client.shutdown()
        let deadline = Date().addingTimeInterval(10)
        while !server.log.contains("Connection closed") && Date() < deadline { usleep(10_000) }
        let closed = try #require(server.log.split(separator: "\n").first { $0.contains("Connection closed") })
        #expect(closed.contains("nbd.peer=127.0.0.1:"))
        #expect(closed.contains("nbd.bytes_read=65536"))
        #expect(server.log.contains("nbd.export=disk"))
    }

    @Test func sighupReopensTheLogFile() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let log = fixture.scratch.file("swiftnbd.log")
        let server = try ServerProcess(["-t", "--log-file", log, fixture.image], portFromLog: log)
        let rotated = fixture.scratch.file("swiftnbd.log.1")
        try FileManager.default.moveItem(atPath: log, toPath: rotated)
        kill(server.pid, SIGHUP)
        // The server recreates the file on SIGHUP; until then a connection would go to the old one.
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: log) && Date() < deadline { usleep(10_000) }
        #expect(FileManager.default.fileExists(atPath: log))
        let client = try NBDClient(uri: server.uri)
        client.shutdown()
        while !((try? String(contentsOfFile: log, encoding: .utf8))?.contains("Connection closed") ?? false)
            && Date() < deadline { usleep(10_000) }
        #expect(try String(contentsOfFile: log, encoding: .utf8).contains("Connection closed"))
        #expect(try String(contentsOfFile: rotated, encoding: .utf8).contains("listening"))
        #expect(server.stop() == 0)
    }
}
