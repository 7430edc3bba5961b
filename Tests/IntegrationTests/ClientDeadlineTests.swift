import Foundation
import TestSupport
import Testing

/// The test client's deadlines: a server that stops answering fails the call in bounded
/// time, with an error naming it, instead of hanging the test run.
@Suite struct ClientDeadlineTests {
    @Test(.timeLimit(.minutes(10))) func connectToASilentServerTimesOut() throws {
        let listener = try LoopbackTCP.listen()  // the kernel accepts; nobody sends a greeting
        defer { listener.close() }
        let uri = "nbd://127.0.0.1:\(listener.port)"
        let start = ContinuousClock.now
        let error = try #require(throws: NBDClientError.self) {
            _ = try NBDClient(uri: uri, timeout: .milliseconds(500))
        }
        #expect(error.errno == ETIMEDOUT)
        #expect(error.message.contains("connect to \(uri)"), "\(error)")
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test(.timeLimit(.minutes(10))) func commandToAStoppedServerTimesOutAndRetiresTheClient() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", fixture.image])
        let client = try NBDClient(uri: server.uri)
        #expect(try client.pread(count: 512, offset: 0) == Array(try fixture.contents.prefix(512)))

        kill(server.pid, SIGSTOP)
        defer { kill(server.pid, SIGCONT) }
        try #require(ProcessTable.waitUntilStopped(server.pid, timeout: .seconds(10)))
        client.timeout = .milliseconds(500)
        let error = try #require(throws: NBDClientError.self) { _ = try client.pread(count: 512, offset: 4096) }
        #expect(error.errno == ETIMEDOUT)
        #expect(error.message.contains("pread 512@4096"), "\(error)")
        // The read may still land later, so the client takes no more calls.
        let refused = try #require(throws: NBDClientError.self) { try client.flush() }
        #expect(refused.message.contains("timed out earlier"), "\(refused)")
        #expect(server.isRunning)
    }
}
