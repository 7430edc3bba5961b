import Foundation
import NBDProtocol
import TestSupport
import Testing

/// One slow or hostile client never holds back another, nor the operator
/// stopping the server: the real binary against raw-socket clients that
/// misbehave on purpose, with a well-behaved libnbd client beside them.
@Suite struct IsolationTests {
    enum Kind: String, CaseIterable, Sendable { case raw, qcow2 }

    /// A 64 MiB image of the kind, patterned, and the raw bytes it must read as.
    static func image(_ kind: Kind, in scratch: TemporaryDirectory) throws -> String {
        let raw = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(raw, size: 64 << 20)
        guard kind == .qcow2 else { return raw }
        let qcow2 = scratch.file("disk.qcow2")
        try Tools.check("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2])
        return qcow2
    }

    /// Pipelined reads of `length` bytes whose replies the sender never reads.
    static func reads(_ count: Int, length: UInt64) -> [UInt8] {
        var w = WireWriter()
        for i in 0..<count {
            Request(command: .read, cookie: UInt64(i), offset: 0, length: length).encode(into: &w)
        }
        return w.bytes
    }

    @Test(arguments: Kind.allCases)
    func secondClientIsServedWhileTheFirstNeverReads(kind: Kind) throws {
        let scratch = try TemporaryDirectory()
        let server = try ServerProcess(["-t", "-e", "4", try Self.image(kind, in: scratch)])
        let stalled = try RawClient(port: server.port)
        _ = try stalled.go()
        try stalled.send(Self.reads(300, length: 1 << 20))
        let started = ContinuousClock.now
        let other = try NBDClient(uri: server.uri)
        for i in 0..<10 { _ = try other.pread(count: 4096, offset: UInt64(i) << 20) }
        let took = ContinuousClock.now - started
        // Served at once on an idle machine; the bound leaves room for a loaded
        // one, while a client held back would wait for as long as the first stalls.
        #expect(took < .seconds(5), "the second client waited \(took)")
        withExtendedLifetime(stalled) {}
    }

    @Test(arguments: Kind.allCases)
    func sigtermWithAStalledClientExitsPromptlyAndFlushes(kind: Kind) throws {
        let scratch = try TemporaryDirectory()
        let image = try Self.image(kind, in: scratch)
        let server = try ServerProcess(["-t", "-e", "4", image])
        let stalled = try RawClient(port: server.port)
        _ = try stalled.go()
        try stalled.send(Self.reads(300, length: 1 << 20))
        let writer = try NBDClient(uri: server.uri)
        let data = [UInt8](repeating: 0xc3, count: 1 << 20)
        try writer.pwrite(data, offset: 8 << 20)
        let started = ContinuousClock.now
        let status = server.stop()
        let took = ContinuousClock.now - started
        #expect(status == 0, "server log:\n\(server.log)")
        // The documented bound is a 2 s grace plus the device work under way (the
        // flush here); the margin is for a loaded machine. A server that waited
        // for the stalled client would be killed after 30 s with another status.
        #expect(took < .seconds(10), "SIGTERM took \(took)")
        let contents = try ImageFactory.rawContents(of: image, format: kind.rawValue, scratch: scratch)
        #expect(Array(contents[(8 << 20)..<(9 << 20)]) == data)
        if kind == .qcow2 { try Tools.check("qemu-img", ["check", "-q", image]) }
        withExtendedLifetime(stalled) {}
    }

    @Test func queuedReadsStopWhenTheClientLeaves() throws {
        let scratch = try TemporaryDirectory()
        let server = try ServerProcess(["-t", try Self.image(.raw, in: scratch)])
        var client: RawClient? = try RawClient(port: server.port)
        _ = try client!.go()
        try client!.send(Self.reads(5000, length: UInt64(Limits.maxPayload)))
        client = nil
        // Within a second of the client leaving, the server has stopped working for it.
        Thread.sleep(forTimeInterval: 1)
        let settled = try #require(ProcessStats.cpuSeconds(server.pid))
        Thread.sleep(forTimeInterval: 1)
        let later = try #require(ProcessStats.cpuSeconds(server.pid))
        #expect(later - settled < 0.1, "the server used \(later - settled) s of CPU after the client left")
        _ = try NBDClient(uri: server.uri).pread(count: 512, offset: 0)
    }

    @Test func blockStatusOverAFragmentedImageIsCappedAndMemoryBounded() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("fragmented.raw")
        // 2 GiB with 4 KiB of data at every other 4 KiB over the first 1.25 GiB: 327,680 extents.
        try Tools.check("python3", ["-c", """
            import os
            fd = os.open('\(image)', os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, 2 << 30)
            block = b'\\x5a' * 4096
            for offset in range(0, 1280 << 20, 8192): os.pwrite(fd, block, offset)
            os.close(fd)
            """])
        let server = try ServerProcess(["-t", "-e", "4", image])
        let client = try RawClient(port: server.port)
        _ = try client.go(structuredReplies: true, metaContexts: ["base:allocation"])
        try client.sendRequest(Request(command: .blockStatus, cookie: 1, offset: 0, length: 2 << 30))
        let chunk = try #require(try client.receiveChunk())
        #expect(chunk.type == .blockStatus)
        #expect(chunk.payload.count == 4 + 131_072 * 8, "one reply holds at most 1 MiB of descriptors")
        // 64 more that are never read: the server stops reading at its budget.
        var w = WireWriter()
        for cookie in 2...65 {
            Request(command: .blockStatus, cookie: UInt64(cookie), offset: 0, length: 2 << 30).encode(into: &w)
        }
        try client.send(w.bytes)
        // One connection may hold at most half of the device threads: the other client finds one free.
        let started = ContinuousClock.now
        let other = try NBDClient(uri: server.uri)
        let firstBlock = try other.pread(count: 4096, offset: 0)
        let took = ContinuousClock.now - started
        #expect(firstBlock == [UInt8](repeating: 0x5a, count: 4096))
        // Without a free device thread it would wait behind 64 block-status scans.
        #expect(took < .seconds(5), "the other client waited \(took)")
        let memory = try #require(ProcessStats.memory(server.pid))
        #expect(memory.peak < 160 << 20, "peak RSS \(memory.peak >> 20) MiB")
        withExtendedLifetime(client) {}
    }

    @Test func memoryIsGivenBackAfterALargeReadStorm() throws {
        let scratch = try TemporaryDirectory()
        let server = try ServerProcess(["-t", "-e", "4", try Self.image(.raw, in: scratch)])
        for _ in 0..<3 {
            try Tools.check("nbdcopy", ["--request-size=33554432", "--requests=8", "--connections=4",
                                        server.uri, "null:"])
        }
        let peak = try #require(ProcessStats.memory(server.pid)).peak
        // Idle buffers go back within a few seconds.
        var resident = 0
        let trimmed = ProcessStats.waitUntil(timeout: .seconds(15)) {
            resident = ProcessStats.memory(server.pid)?.resident ?? .max
            return resident < 48 << 20
        }
        #expect(trimmed, "RSS still \(resident >> 20) MiB after the reads (peak \(peak >> 20) MiB)")
    }

    @Test func sharedZeroMeansNoLimit() throws {
        let scratch = try TemporaryDirectory()
        let server = try ServerProcess(["-t", "-e", "0", try Self.image(.raw, in: scratch)])
        let clients = try (0..<6).map { _ in try NBDClient(uri: server.uri) }
        for client in clients { #expect(client.size == 64 << 20) }
        #expect(clients.allSatisfy { $0.canMultiConn })
    }
}
