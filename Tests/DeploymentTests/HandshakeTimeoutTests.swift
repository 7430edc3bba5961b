import Foundation
import Glibc
import Testing
import NBDProtocol
import TestSupport

/// A client that connects and says nothing is dropped after --handshake-timeout, so it cannot
/// hold the export (`-e 1` by default) from the clients that follow.
@Suite struct HandshakeTimeoutTests {
    @Test(.timeLimit(.minutes(10))) func silentClientIsDroppedAndTheServerKeepsServing() throws {
        let scratch = try TemporaryDirectory("swiftnbd-handshake")
        let image = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(image, size: 2 << 20, seed: 11)
        let original = Array(try Data(contentsOf: URL(fileURLWithPath: image)))
        let port = try LoopbackTCP.freePort()
        let server = try SpawnedProcess(
            Paths.serverBinary,
            ["-t", "-r", "--handshake-timeout", "1", "-p", "\(port)", "-b", "127.0.0.1", image],
            logPath: scratch.file("server.log"))
        defer { server.stop() }

        // Ready once a real client gets through.
        let first = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(20))
        try first.disconnect()

        let silent = try RawClient(port: Int(port))
        let start = ContinuousClock.now
        let (greeting, closed) = silent.readUntilClosed(timeout: .seconds(5))
        let elapsed = ContinuousClock.now - start
        // The server opens the newstyle handshake: "NBDMAGIC" then "IHAVEOPT".
        #expect(greeting.starts(with: Array("NBDMAGICIHAVEOPT".utf8)), "greeting: \(greeting)")
        #expect(closed, "a silent client was still connected after 5 s\n\(server.log)")
        #expect(elapsed >= .milliseconds(500), "closed after \(elapsed), before the 1 s timeout")

        let next = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(10))
        #expect(try next.pread(count: 65536, offset: 0) == Array(original[0..<65536]))
        try next.disconnect()

        // A silent client that holds the only slot (-e 1) delays the next client by at most the
        // timeout; it does not lock it out.
        let squatter = try RawClient(port: Int(port))
        try withExtendedLifetime(squatter) {
            let waiting = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(8))
            #expect(try waiting.pread(count: 4096, offset: 1 << 20) == Array(original[(1 << 20)..<((1 << 20) + 4096)]))
            try waiting.disconnect()
        }

        server.send(SIGTERM)
        #expect(server.waitForExit(timeout: .seconds(10)) == .exited(0), "\(server.log)")
    }

    /// The timeout covers the whole negotiation: a client that keeps sending options slowly,
    /// each one answered, is still dropped once the bound has passed.
    @Test(.timeLimit(.minutes(10))) func tricklingClientIsDroppedToo() throws {
        let scratch = try TemporaryDirectory("swiftnbd-handshake")
        let image = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(image, size: 1 << 20)
        let server = try ServerProcess(["-t", "-r", "--handshake-timeout", "1", image])
        let slow = try RawClient(port: server.port, timeout: 5)
        try slow.greet()
        let start = ContinuousClock.now
        var answered = 0
        // One NBD_OPT_LIST every 300 ms: the pace of the client under test, not a synchronisation.
        while ContinuousClock.now - start < .seconds(5) {
            guard (try? slow.sendOption(.list)) != nil,
                  let replies = try? slow.receiveOptionReplies(), replies.last?.type == .ack else { break }
            answered += 1
            usleep(300_000)
        }
        let elapsed = ContinuousClock.now - start
        #expect(answered >= 2, "options before the deadline are answered")
        #expect(elapsed < .seconds(3), "a trickling client was still negotiating after \(elapsed)")
        #expect(server.isRunning)
    }
}
