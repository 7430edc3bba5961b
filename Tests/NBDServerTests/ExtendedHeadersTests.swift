import BlockDevice
import Foundation
import NBDProtocol
@testable import NBDServer
import SystemIO
import TestSupport
import Testing

/// NBD_OPT_EXTENDED_HEADERS as the spec's extended-headers text lays it out, one rule
/// a test, with a raw client (no packaged client speaks extended headers yet).
@Suite struct ExtendedHeadersTests {
    static let gib: UInt64 = 1 << 30

    /// A sparse 8 GiB raw file: large enough for lengths past 32 bits.
    final class BigImage {
        let scratch: TemporaryDirectory
        let device: RawFileDevice

        init() throws {
            scratch = try TemporaryDirectory()
            let path = scratch.file("big.raw")
            FileManager.default.createFile(atPath: path, contents: nil)
            let handle = try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path))
            try handle.truncate(atOffset: 8 * gib)
            try handle.close()
            device = try RawFileDevice(path: path, readOnly: false)
        }
    }

    func write(_ client: RawClient, cookie: UInt64, offset: UInt64, _ data: [UInt8]) throws {
        try client.sendRequest(Request(flags: .payloadLength, command: .write, cookie: cookie, offset: offset,
                                       length: UInt64(data.count)), payload: data, extended: true)
    }

    /// The next reply must be an extended chunk answering `cookie` at `offset`.
    func expectChunk(_ client: RawClient, cookie: UInt64, offset: UInt64, type: ChunkType,
                     sourceLocation: SourceLocation = #_sourceLocation) throws -> RawClient.Chunk {
        let chunk = try #require(try client.receiveExtendedChunk(), sourceLocation: sourceLocation)
        #expect(chunk.cookie == cookie && chunk.offset == offset, sourceLocation: sourceLocation)
        #expect(chunk.type == type, "got \(chunk.type.rawValue)", sourceLocation: sourceLocation)
        return chunk
    }

    func errorCode(_ chunk: RawClient.Chunk) -> UInt32 {
        chunk.payload.prefix(4).reduce(0) { $0 << 8 | UInt32($1) }
    }

    @Test func negotiatedOnceWithoutDataAndItOutranksStructuredReplies() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let (ours, theirs) = try Socket.pair()
        harness.server.adopt(ours, peer: "pair")
        let client = RawClient(socket: theirs)
        try client.greet()
        try client.sendOption(.extendedHeaders, [1])
        #expect(try client.receiveOptionReplies().last?.type == .errInvalid, "the option takes no data")
        try client.sendOption(.extendedHeaders)
        #expect(try client.receiveOptionReplies().last?.type == .ack)
        try client.sendOption(.extendedHeaders)
        #expect(try client.receiveOptionReplies().last?.type == .errInvalid, "already negotiated")
        try client.sendOption(.structuredReply)
        #expect(try client.receiveOptionReplies().last?.type == .errExtendedHeadersRequired)
        // NBD_OPT_EXPORT_NAME is forbidden now; it can't carry an error, so the server hangs up.
        try client.sendOption(.exportName)
        #expect(client.serverClosed())
    }

    @Test func blockStatusPayloadIsOfferedOnlyWithContexts() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        _ = try harness.client(extended: true)
        #expect(harness.flags.contains(.sendDF) && !harness.flags.contains(.blockStatusPayload))
        _ = try harness.client(extended: true, metaContexts: ["base:allocation"])
        #expect(harness.flags.contains(.blockStatusPayload))
        _ = try harness.client(structured: true, metaContexts: ["base:allocation"])
        #expect(!harness.flags.contains(.blockStatusPayload), "never without extended headers")
    }

    @Test func readsAndWritesUseExtendedChunksOnly() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + 1) }
        try write(client, cookie: 1, offset: 8192, data)
        let done = try expectChunk(client, cookie: 1, offset: 8192, type: .none)
        #expect(done.flags == 1 && done.payload.isEmpty, "success is a NONE chunk with DONE, never a simple reply")
        try client.sendRequest(Request(command: .read, cookie: 2, offset: 8192, length: 4096), extended: true)
        let read = try expectChunk(client, cookie: 2, offset: 8192, type: .offsetData)
        #expect(Array(read.payload.dropFirst(8)) == data)
        try client.sendRequest(Request(command: .read, cookie: 3, offset: 65536, length: 65536), extended: true)
        let hole = try expectChunk(client, cookie: 3, offset: 65536, type: .offsetHole)
        #expect(hole.payload == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
        try client.sendRequest(Request(command: .flush, cookie: 4, offset: 0, length: 0), extended: true)
        _ = try expectChunk(client, cookie: 4, offset: 0, type: .none)
    }

    @Test func writeWithoutPayloadLengthIsRefusedAndTheStreamStaysInStep() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        // Without the flag the length is an effect length, so no payload follows.
        try client.sendRequest(Request(command: .write, cookie: 1, offset: 0, length: 512), extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 1, offset: 0, type: .error)) == 22)
        try client.sendRequest(Request(command: .read, cookie: 2, offset: 0, length: 16), extended: true)
        _ = try expectChunk(client, cookie: 2, offset: 0, type: .offsetHole)
    }

    @Test func otherCommandsWithAPayloadHaveItConsumedThenGetEINVAL() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try client.sendRequest(Request(flags: .payloadLength, command: .read, cookie: 1, offset: 0, length: 16),
                               payload: [UInt8](repeating: 0x11, count: 16), extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 1, offset: 0, type: .error)) == 22)
        try client.sendRequest(Request(command: .flush, cookie: 2, offset: 0, length: 0), extended: true)
        _ = try expectChunk(client, cookie: 2, offset: 0, type: .none)
    }

    @Test func aPayloadOverTheMaximumEndsTheConnection() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try client.sendRequest(Request(flags: .payloadLength, command: .write, cookie: 1, offset: 0,
                                       length: UInt64(Limits.maxPayload) + 1), extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 1, offset: 0, type: .error)) == 22)
        #expect(client.serverClosed())
    }

    @Test func readsLongerThanTheMaximumPayloadAreRefused() throws {
        let big = try BigImage()
        let harness = ServerHarness(big.device)
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try client.sendRequest(Request(command: .read, cookie: 1, offset: 0, length: 5 * Self.gib), extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 1, offset: 0, type: .error)) == 22)
    }

    @Test func zeroTrimAndCacheTake64BitLengths() throws {
        let big = try BigImage()
        let harness = ServerHarness(big.device)
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try write(client, cookie: 1, offset: 6 * Self.gib, [UInt8](repeating: 0xee, count: 4096))
        _ = try expectChunk(client, cookie: 1, offset: 6 * Self.gib, type: .none)
        try client.sendRequest(Request(command: .writeZeroes, cookie: 2, offset: Self.gib, length: 6 * Self.gib),
                               extended: true)
        _ = try expectChunk(client, cookie: 2, offset: Self.gib, type: .none)
        try client.sendRequest(Request(command: .read, cookie: 3, offset: 6 * Self.gib, length: 4096), extended: true)
        _ = try expectChunk(client, cookie: 3, offset: 6 * Self.gib, type: .offsetHole)
        try client.sendRequest(Request(command: .trim, cookie: 4, offset: 0, length: 7 * Self.gib), extended: true)
        _ = try expectChunk(client, cookie: 4, offset: 0, type: .none)
        try client.sendRequest(Request(command: .cache, cookie: 5, offset: 0, length: 5 * Self.gib), extended: true)
        _ = try expectChunk(client, cookie: 5, offset: 0, type: .none)
        // Past the end is still past the end, however the length is spelled.
        try client.sendRequest(Request(command: .writeZeroes, cookie: 6, offset: 4 * Self.gib, length: 5 * Self.gib),
                               extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 6, offset: 4 * Self.gib, type: .error)) == 28)
    }

    @Test func blockStatusExtDescribesMoreThan4GiBInOneDescriptor() throws {
        let big = try BigImage()
        let harness = ServerHarness(big.device)
        defer { harness.stop() }
        let client = try harness.client(extended: true, metaContexts: ["base:allocation"])
        try client.sendRequest(Request(command: .blockStatus, cookie: 1, offset: 0, length: 8 * Self.gib),
                               extended: true)
        let chunk = try expectChunk(client, cookie: 1, offset: 0, type: .blockStatusExt)
        #expect(chunk.flags == 1)
        let be = { (range: Range<Int>) in chunk.payload[range].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        #expect(be(0..<4) == 1, "context ID")
        let count = Int(be(4..<8))
        #expect(count >= 1 && chunk.payload.count == 8 + count * 16, "descriptor count matches the length")
        #expect(be(8..<16) == 8 * Self.gib, "one descriptor for the whole empty image")
        #expect(be(16..<24) == 3, "hole and zero")
    }

    @Test func oneRequestDescribesAWhole8GiBImageFragmentedEvery64KiB() throws {
        // 131,072 alternating extents: qemu-nbd's descriptor cap, 2 MiB of 16-byte descriptors.
        let harness = ServerHarness(StripedDevice(size: 8 * Self.gib, stripe: 64 << 10))
        defer { harness.stop() }
        let client = try harness.client(extended: true, metaContexts: ["base:allocation"])
        try client.sendRequest(Request(command: .blockStatus, cookie: 1, offset: 0, length: 8 * Self.gib),
                               extended: true)
        let chunk = try expectChunk(client, cookie: 1, offset: 0, type: .blockStatusExt)
        let be = { (at: Int, width: Int) in chunk.payload[at..<at + width].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        let count = Int(be(4, 4))
        #expect(count == RequestHandler.maxDescriptors && chunk.payload.count == 8 + count * 16)
        let covered = stride(from: 8, to: chunk.payload.count, by: 16).reduce(UInt64(0)) { $0 + be($1, 8) }
        #expect(covered == 8 * Self.gib)
    }

    @Test func blockStatusPayloadChoosesContexts() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20), exposeAllocationDepth: true)
        defer { harness.stop() }
        let client = try harness.client(extended: true, metaContexts: ["base:allocation", "qemu:allocation-depth"])
        func blockStatus(_ cookie: UInt64, ids: [UInt32], rawPayload: [UInt8]? = nil) throws {
            var w = WireWriter()
            BlockStatusPayload(effectLength: 65536, contextIDs: ids).encode(into: &w)
            let payload = rawPayload ?? w.bytes
            try client.sendRequest(Request(flags: .payloadLength, command: .blockStatus, cookie: cookie, offset: 0,
                                           length: UInt64(payload.count)), payload: payload, extended: true)
        }
        let depth = MetaContext.allocationDepth.rawValue
        try blockStatus(1, ids: [depth])
        let only = try expectChunk(client, cookie: 1, offset: 0, type: .blockStatusExt)
        #expect(only.flags == 1 && Array(only.payload.prefix(4)) == [0, 0, 0, UInt8(depth)],
                "one chunk, for the context asked for")
        try blockStatus(2, ids: [depth, 77])
        #expect(errorCode(try expectChunk(client, cookie: 2, offset: 0, type: .error)) == 22, "unknown ID")
        try blockStatus(3, ids: [depth, depth])
        #expect(errorCode(try expectChunk(client, cookie: 3, offset: 0, type: .error)) == 22, "repeated ID")
        try blockStatus(4, ids: [], rawPayload: [0, 0, 0, 0, 0, 0, 0, 1, 0, 0])
        #expect(errorCode(try expectChunk(client, cookie: 4, offset: 0, type: .error)) == 22, "not 8 + 4n bytes")
        // Every payload above was consumed: a plain request still lines up, and answers both contexts.
        try client.sendRequest(Request(command: .blockStatus, cookie: 5, offset: 0, length: 4096), extended: true)
        let first = try expectChunk(client, cookie: 5, offset: 0, type: .blockStatusExt)
        let second = try expectChunk(client, cookie: 5, offset: 0, type: .blockStatusExt)
        #expect(first.flags == 0 && second.flags == 1)
    }

    @Test func errorsCarryTheRequestOffset() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try client.sendRequest(Request(command: .read, cookie: 9, offset: 2 << 20, length: 1), extended: true)
        let error = try expectChunk(client, cookie: 9, offset: 2 << 20, type: .error)
        #expect(errorCode(error) == 22 && error.flags == 1)
        try client.sendRequest(Request(command: .flush, cookie: 10, offset: 0, length: 5), extended: true)
        #expect(errorCode(try expectChunk(client, cookie: 10, offset: 0, type: .error)) == 22)
    }

    @Test func aCompactRequestAfterExtendedHeadersIsABadMagic() throws {
        let harness = ServerHarness(MemoryDevice(size: 1 << 20))
        defer { harness.stop() }
        let client = try harness.client(extended: true)
        try client.sendRequest(Request(command: .read, cookie: 1, offset: 0, length: 512))
        try client.send([0, 0, 0, 0])  // the 32 bytes the server waits for
        #expect(client.serverClosed())
    }
}
