import Foundation
import Glibc
import Testing
import TestSupport

/// Started by `systemd-socket-activate` (what swiftnbd.socket does), the server serves on the
/// listening socket it is handed in LISTEN_FDS and ignores -p, -b and -k.
@Suite struct SocketActivationTests {
    static let imageSize = 4 << 20

    static func makeImage(in scratch: TemporaryDirectory) throws -> (path: String, bytes: [UInt8]) {
        let path = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(path, size: imageSize, seed: 7)
        return (path, Array(try Data(contentsOf: URL(fileURLWithPath: path))))
    }

    @Test(.timeLimit(.minutes(10))) func servesTheImageOnAnActivatedTCPSocket() throws {
        let scratch = try TemporaryDirectory("swiftnbd-activate")
        let image = try Self.makeImage(in: scratch)
        let port = try LoopbackTCP.freePort()
        let decoyPort = try LoopbackTCP.freePort()
        let decoySocket = scratch.file("decoy.sock")
        let server = try SpawnedProcess(
            "/usr/bin/systemd-socket-activate",
            ["-l", "127.0.0.1:\(port)", Paths.serverBinary,
             "-t", "-r", "-p", "\(decoyPort)", "-b", "127.0.0.1", "-k", decoySocket, image.path],
            logPath: scratch.file("server.log"))
        defer { server.stop() }

        let client = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(20))
        #expect(client.size == Int64(Self.imageSize), "\(server.log)")
        let served = try client.readAll()
        #expect(served == image.bytes, "the export differs from the image")
        try client.disconnect()

        // The passed socket replaced the ones the options ask for.
        #expect(!LoopbackTCP.isListening(port: decoyPort), "it also listens on -p \(decoyPort)")
        #expect(!FileManager.default.fileExists(atPath: decoySocket), "it also created -k \(decoySocket)")

        // -t: still serving after the first client left, on the same activated socket.
        let again = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(10))
        #expect(try again.pread(count: 4096, offset: 4096) == Array(image.bytes[4096..<8192]))
        try again.disconnect()

        server.send(SIGTERM)
        #expect(server.waitForExit(timeout: .seconds(10)) == .exited(0), "\(server.log)")
    }

    @Test(.timeLimit(.minutes(10))) func servesTheImageOnAnActivatedUnixSocket() throws {
        let scratch = try TemporaryDirectory("swiftnbd-activate-unix")
        let image = try Self.makeImage(in: scratch)
        let socketPath = scratch.file("nbd.sock")
        let decoyPort = try LoopbackTCP.freePort()
        let server = try SpawnedProcess(
            "/usr/bin/systemd-socket-activate",
            ["-l", socketPath, Paths.serverBinary, "-t", "-r", "-p", "\(decoyPort)", "-b", "127.0.0.1", image.path],
            logPath: scratch.file("server.log"))
        defer { server.stop() }

        let client = try NBDClient.connect("nbd+unix:///?socket=\(socketPath)", retryingFor: .seconds(20))
        #expect(client.size == Int64(Self.imageSize), "\(server.log)")
        #expect(try client.readAll() == image.bytes, "the export differs from the image")
        try client.disconnect()
        #expect(!LoopbackTCP.isListening(port: decoyPort), "it also listens on -p \(decoyPort)")

        server.send(SIGTERM)
        #expect(server.waitForExit(timeout: .seconds(10)) == .exited(0), "\(server.log)")
    }

    /// swiftnbd.socket with a TCP and a Unix ListenStream= passes two sockets; both serve.
    @Test(.timeLimit(.minutes(10))) func servesOnEveryActivatedSocket() throws {
        let scratch = try TemporaryDirectory("swiftnbd-activate-two")
        let image = try Self.makeImage(in: scratch)
        let port = try LoopbackTCP.freePort()
        let socketPath = scratch.file("nbd.sock")
        let server = try SpawnedProcess(
            "/usr/bin/systemd-socket-activate",
            ["-l", "127.0.0.1:\(port)", "-l", socketPath, Paths.serverBinary, "-t", "-r", "-e", "2", image.path],
            logPath: scratch.file("server.log"))
        defer { server.stop() }

        let overTCP = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(20))
        let overUnix = try NBDClient.connect("nbd+unix:///?socket=\(socketPath)", retryingFor: .seconds(10))
        let tail = UInt64(Self.imageSize - 65536)
        #expect(try overTCP.pread(count: 65536, offset: tail) == Array(image.bytes[Int(tail)...]))
        #expect(try overUnix.pread(count: 65536, offset: 0) == Array(image.bytes[0..<65536]))
        try overTCP.disconnect()
        try overUnix.disconnect()

        server.send(SIGTERM)
        #expect(server.waitForExit(timeout: .seconds(10)) == .exited(0), "\(server.log)")
    }
}
