import NBDProtocol
@testable import NBDServer
import SystemIO
import Testing

/// The writer's callbacks in the order the connection relies on: it waits
/// for every reply to come back through `finished` and may then be freed,
/// so `failed` must never come after the last `finished`.
@Suite struct ReplyWriterTests {
    @Test func failedComesBeforeTheLastFinished() throws {
        let (ours, theirs) = try Socket.pair()
        theirs.close()
        let events = Locked<[String]>([])
        let writer = ReplyWriter(transport: .plain(ours), name: "test-send", finished: { _ in
            events.withLock { $0.append("finished") }
        }, failed: { _ in
            events.withLock { $0.append("failed") }
        })
        writer.enqueue(.status(cookie: 1, error: .ok, framing: nil))
        writer.stop()
        ours.close()
        let seen = events.withLock { $0 }
        #expect(seen == ["failed", "finished"])
    }
}
