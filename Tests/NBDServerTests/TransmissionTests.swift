#if canImport(Glibc)
import Glibc
#endif
import BlockDevice
import Logging
import NBDProtocol
@testable import NBDServer
import SystemIO
import TestSupport
import Testing

/// The transmission phase over socket pairs against in-memory devices: the
/// server's own threads and queues, with no process or TCP in between.
@Suite struct TransmissionTests {
    static func reads(_ count: Int, length: UInt64, firstCookie: UInt64 = 1) -> [UInt8] {
        var w = WireWriter()
        for i in 0..<count {
            Request(command: .read, cookie: firstCookie + UInt64(i), offset: 0, length: length).encode(into: &w)
        }
        return w.bytes
    }

    @Test func pipelinedWritesThenReadsRoundTrip() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client()
        let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var w = WireWriter()
        Request(command: .write, cookie: 100, offset: 4096, length: 65536).encode(into: &w)
        w.write(pattern)
        try client.send(w.bytes)
        #expect(try client.receiveSimpleReply()?.cookie == 100)
        // Eight reads pipelined; each reply is matched by cookie, whatever the order.
        var requests = WireWriter()
        for i in 0..<8 {
            Request(command: .read, cookie: UInt64(i), offset: 4096 + UInt64(i) * 8192, length: 8192)
                .encode(into: &requests)
        }
        try client.send(requests.bytes)
        for _ in 0..<8 {
            let reply = try #require(try client.receiveSimpleReply())
            #expect(reply.error == .ok)
            let data = try #require(try client.receive(8192))
            let start = Int(reply.cookie) * 8192
            #expect(data == Array(pattern[start..<start + 8192]))
        }
    }

    @Test func clientThatStopsReadingIsNotReadPastItsBudget() throws {
        let device = GatedDevice(size: 1 << 20, open: true)
        let harness = ServerHarness(device) { $0.connectionLimits.maxQueuedBytes = 4 << 20 }
        defer { harness.stop() }
        let client = try harness.client()
        try client.send(Self.reads(64, length: 1 << 20))
        // Three 1 MiB replies fit the 4 MiB budget; none is taken off the socket, so no more are read.
        #expect(harness.eventually("three reads run") { device.readsStarted.load(ordering: .relaxed) >= 3 })
        let settle = MonotonicClock.now() + 300_000_000
        while MonotonicClock.now() < settle {
            #expect(device.readsStarted.load(ordering: .relaxed) <= 4)
            usleep(1000)
        }
        // Once the client reads, every request is answered.
        var cookies = Set<UInt64>()
        for _ in 0..<64 {
            let reply = try #require(try client.receiveSimpleReply())
            #expect(reply.error == .ok)
            cookies.insert(reply.cookie)
            _ = try #require(try client.receive(1 << 20))
        }
        #expect(cookies == Set(1...64))
    }

    @Test func stalledClientDoesNotHoldBackAnother() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let stalled = try harness.client()
        try stalled.send(Self.reads(300, length: 1 << 20))
        let other = try harness.client()
        let started = MonotonicClock.now()
        try other.send(Self.reads(10, length: 4096))
        for _ in 0..<10 {
            #expect(try other.receiveSimpleReply()?.error == .ok)
            _ = try other.receive(4096)
        }
        // A client held back would wait until the stalled one read; the bound is room for a loaded machine.
        #expect(MonotonicClock.now() - started < 5_000_000_000)
        withExtendedLifetime(stalled) {}
    }

    @Test func requestsNotStartedAreDroppedWhenTheClientLeaves() throws {
        let device = GatedDevice(size: 1 << 20)
        // Four threads, of which one connection may occupy two; a budget that
        // lets the reader take all 50 requests, so it sees the end of file
        // while the two reads are still held.
        let harness = ServerHarness(device) {
            $0.deviceThreads = 4
            $0.connectionLimits.maxQueuedBytes = 64 << 20
        }
        defer { harness.stop() }
        var client: RawClient? = try harness.client()
        try client!.send(Self.reads(50, length: 1 << 20))
        #expect(harness.eventually("two device threads are busy") { device.readsStarted.load(ordering: .relaxed) == 2 })
        client = nil  // closes: the server reads the 48 other requests, then end of file
        #expect(harness.eventually("the server sees the client gone") { harness.server.connectionStatuses == [.dead] })
        device.open()
        #expect(harness.eventually("the connection ends") { harness.server.connectionCount == 0 })
        #expect(device.readsStarted.load(ordering: .relaxed) == 2, "only the two reads under way ran")
    }

    @Test func oneConnectionNeverOccupiesEveryDeviceThread() throws {
        let device = GatedDevice(size: 1 << 20)
        let harness = ServerHarness(device) { $0.deviceThreads = 4 }
        defer {
            device.open()
            harness.stop()
        }
        let greedy = try harness.client()
        try greedy.send(Self.reads(20, length: 4096))
        #expect(harness.eventually("the greedy client's reads start") { device.readsStarted.load(ordering: .relaxed) == 2 })
        let other = try harness.client()
        try other.send(Self.reads(1, length: 4096))
        // Its read starts on a thread the greedy client may not take, though the greedy one has 18 waiting.
        #expect(harness.eventually("the other client's read starts") { device.readsStarted.load(ordering: .relaxed) == 3 })
        withExtendedLifetime(greedy) {}
    }

    @Test func blockStatusStopsAtOneMiBOfDescriptors() throws {
        let device = StripedDevice(size: 4 << 30)
        let harness = ServerHarness(device)
        defer { harness.stop() }
        let client = try harness.client(structured: true, metaContexts: ["base:allocation"])
        try client.sendRequest(Request(command: .blockStatus, cookie: 5, offset: 0, length: UInt64(UInt32.max)))
        let chunk = try #require(try client.receiveChunk())
        #expect(chunk.type == .blockStatus && chunk.cookie == 5)
        #expect(chunk.payload.count == 4 + RequestHandler.maxDescriptors * 8)
        // Extents were computed about as far as the reply goes, not over the whole 4 GiB.
        let asked = device.extentBytesAsked.load(ordering: .relaxed)
        #expect(asked <= UInt64(RequestHandler.maxDescriptors) * 4096 + RequestHandler.extentWindow)
    }

    @Test func stopEndsWithinTheGraceWhileAClientStalls() throws {
        let device = GatedDevice(size: 1 << 20, open: true)
        let harness = ServerHarness(device) { $0.shutdownGrace = 0.5 }
        let stalled = try harness.client()
        try stalled.send(Self.reads(300, length: 1 << 20))
        // A reply larger than the socket's buffer is then waiting for the client.
        #expect(harness.eventually("a read ran") { device.readsStarted.load(ordering: .relaxed) >= 1 })
        let started = MonotonicClock.now()
        harness.stop()
        let took = Double(MonotonicClock.now() - started) / 1e9
        #expect(took >= 0.4 && took < 5, "stopped after \(took) s with a 0.5 s grace")
        withExtendedLifetime(stalled) {}
    }
}

/// The request handler alone: requests in, reply values out.
@Suite struct RequestHandlerTests {
    let buffers = BufferPool()

    func handler(_ device: any BlockDevice, structured: Bool, contexts: [MetaContext] = []) -> RequestHandler {
        RequestHandler(device: device, session: Session(structuredReplies: structured, metaContexts: contexts),
                       buffers: buffers, counters: TransferCounters(), logger: Logger(label: "test"))
    }

    @Test func readsBecomeDataOrHoleReplies() throws {
        let device = MemoryDevice(size: 1 << 16)
        let data: [UInt8] = Array(repeating: 0xab, count: 512)
        try data.withUnsafeBytes { try device.write($0, at: 0, fua: false) }
        let structured = handler(device, structured: true)
        let read = structured.handle(Request(command: .read, cookie: 1, offset: 0, length: 512), payload: nil)
        guard case .pooled(let bytes) = read.body else {
            Issue.record("a read of data must carry it")
            return
        }
        // The writer gives read buffers back once sent; here the test does.
        defer { buffers.give(bytes) }
        #expect(Array(bytes) == data)
        #expect(read.headerLength == ReplyHeader.chunkSize + 8)
        let zeros = structured.handle(Request(command: .read, cookie: 2, offset: 4096, length: 4096), payload: nil)
        #expect(zeros.length == 32, "all zeros become one OFFSET_HOLE chunk")
        let simple = handler(device, structured: false)
            .handle(Request(command: .read, cookie: 3, offset: 4096, length: 4096), payload: nil)
        #expect(simple.length == ReplyHeader.simpleSize + 4096)
        if case .pooled(let simpleBytes) = simple.body { buffers.give(simpleBytes) }
    }

    @Test func blockStatusDescriptorsAreCappedAndMerged() throws {
        let device = StripedDevice(size: 1 << 30)
        let h = handler(device, structured: true, contexts: [.baseAllocation])
        let capped = try h.descriptors(of: .baseAllocation, at: 0, length: 1 << 30, limit: 1000)
        #expect(capped.count == 1000)
        #expect(capped.allSatisfy { $0.length == 4096 })
        let one = try h.descriptors(of: .baseAllocation, at: 100, length: 8192, limit: 1)
        #expect(one == [BlockStatusDescriptor(length: 3996, flags: 0)])
    }

    @Test func deviceErrorsOnReadsCarryAMessage() throws {
        let device = MemoryDevice(size: 4096)
        let h = handler(device, structured: true)
        let reply = h.errorReply(Request(command: .read, cookie: 9, offset: 0, length: 1), .io, "bad sector")
        guard case .bytes(let chunk) = reply.body else {
            Issue.record("a structured read error is an error chunk")
            return
        }
        #expect(chunk == encodeErrorChunk(cookie: 9, error: .io, message: "bad sector"))
    }
}
