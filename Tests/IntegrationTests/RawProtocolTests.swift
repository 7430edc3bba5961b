import Foundation
import NBDProtocol
import TestSupport
import Testing

/// Malformed and edge-case input over a plain socket: the offending
/// connection gets an error or is closed, and the server keeps serving.
@Suite struct RawProtocolTests {
    let fixture: RawFixture
    let server: ServerProcess

    init() throws {
        fixture = try RawFixture(size: 1 << 20)
        server = try ServerProcess(["-t", "-e", "4", fixture.image])
    }

    /// After whatever a test did, a real client still gets served.
    func expectServerStillServes() throws {
        let client = try NBDClient(uri: server.uri)
        #expect(client.size == Int64(fixture.size))
        #expect(try client.pread(count: 512, offset: 0) == Array(try fixture.contents.prefix(512)))
    }

    @Test func unknownClientFlagsCloseTheConnection() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet(clientFlags: 0x8000_0001)
        #expect(raw.serverClosed())
        try expectServerStillServes()
    }

    @Test func badOptionMagicClosesTheConnection() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet()
        try raw.send([UInt8](repeating: 0x5a, count: 16))
        #expect(raw.serverClosed())
        try expectServerStillServes()
    }

    @Test func absurdOptionLengthClosesWithoutAllocating() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet()
        var w = WireWriter()
        OptionHeader(option: .go, length: 0xffff_fff0).encode(into: &w)
        try raw.send(w.bytes)
        #expect(raw.serverClosed())
        try expectServerStillServes()
    }

    @Test func truncatedOptionThenHangUp() throws {
        do {
            let raw = try RawClient(port: server.port)
            try raw.greet()
            try raw.send(Array("IHAVEOPT".utf8) + [0, 0])
        }
        try expectServerStillServes()
    }

    @Test func unknownOptionIsUnsupportedAndNegotiationContinues() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet()
        try raw.sendOption(OptionCode(rawValue: 1234), [1, 2, 3, 4])
        #expect(try raw.receiveOptionReplies().map(\.type) == [.errUnsupported])
        try raw.sendOption(.list)
        let list = try raw.receiveOptionReplies()
        #expect(list.map(\.type) == [.server, .ack])
    }

    @Test func wrongExportNameGetsErrUnknown() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet()
        var w = WireWriter()
        InfoRequest(exportName: "no-such-export", requests: []).encode(into: &w)
        try raw.sendOption(.go, w.bytes)
        #expect(try raw.receiveOptionReplies().map(\.type) == [.errUnknown])
        let abort = try RawClient(port: server.port)
        try abort.greet()
        try abort.sendOption(.abort)
        #expect(try abort.receiveOptionReplies().map(\.type) == [.ack])
        #expect(abort.serverClosed())
    }

    @Test func badRequestMagicClosesTheConnection() throws {
        let raw = try RawClient(port: server.port)
        _ = try raw.go()
        try raw.send([UInt8](repeating: 0x77, count: Request.wireSize(extended: false)))
        #expect(raw.serverClosed())
        try expectServerStillServes()
    }

    @Test func rangeErrorsFollowTheSpec() throws {
        let raw = try RawClient(port: server.port)
        _ = try raw.go()
        let size = UInt64(fixture.size)
        try raw.sendRequest(Request(command: .read, cookie: 1, offset: size - 10, length: 11))
        #expect(try raw.receiveSimpleReply()?.error == .invalid)
        try raw.sendRequest(Request(command: .write, cookie: 2, offset: size - 10, length: 11),
                            payload: [UInt8](repeating: 1, count: 11))
        #expect(try raw.receiveSimpleReply()?.error == .noSpace)
        try raw.sendRequest(Request(command: .writeZeroes, cookie: 3, offset: size, length: 1))
        #expect(try raw.receiveSimpleReply()?.error == .noSpace)
        try raw.sendRequest(Request(command: Command(rawValue: 42), cookie: 4, offset: 0, length: 1))
        #expect(try raw.receiveSimpleReply()?.error == .invalid)
        try raw.sendRequest(Request(command: .blockStatus, cookie: 5, offset: 0, length: 512))
        #expect(try raw.receiveSimpleReply()?.error == .invalid, "no context was negotiated")
        // The write payloads were drained: the stream is still in step.
        try raw.sendRequest(Request(command: .read, cookie: 6, offset: 0, length: 16))
        #expect(try raw.receiveSimpleReply()?.cookie == 6)
        #expect(try raw.receive(16) == Array(try fixture.contents.prefix(16)))
    }

    @Test func oversizedReadIsRefusedAndTheConnectionStays() throws {
        let big = try RawFixture(size: 64 << 20)
        let bigServer = try ServerProcess(["-t", big.image])
        let raw = try RawClient(port: bigServer.port)
        _ = try raw.go()
        try raw.sendRequest(Request(command: .read, cookie: 1, offset: 0, length: UInt64(Limits.maxPayload) + 1))
        #expect(try raw.receiveSimpleReply()?.error == .invalid)
        try raw.sendRequest(Request(command: .read, cookie: 3, offset: 0, length: 8))
        #expect(try raw.receiveSimpleReply()?.cookie == 3)
        #expect(try raw.receive(8) == Array(try big.contents.prefix(8)))
    }

    @Test func oversizedWriteIsRefusedAndTheConnectionClosedWithoutDrainingIt() throws {
        let raw = try RawClient(port: server.port)
        _ = try raw.go()
        // A payload over the limit is never read: the error goes out, then the connection closes.
        try raw.sendRequest(Request(command: .write, cookie: 2, offset: 0, length: UInt64(Limits.maxPayload) + 4096),
                            payload: [UInt8](repeating: 0xee, count: 4096))
        #expect(try raw.receiveSimpleReply()?.error == .invalid)
        #expect(raw.serverClosed())
        try expectServerStillServes()
    }

    @Test func plainNewstyleClientGetsItsExportByName() throws {
        let raw = try RawClient(port: server.port)
        try raw.greet(clientFlags: 0)
        try raw.sendOption(.exportName)
        let reply = try #require(try raw.receive(8 + 2 + 124))
        #expect(reply.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } == UInt64(fixture.size))
        try raw.sendRequest(Request(command: .read, cookie: 7, offset: 0, length: 16))
        #expect(try raw.receiveSimpleReply()?.cookie == 7)
        #expect(try raw.receive(16) == Array(try fixture.contents.prefix(16)))
    }

    @Test func readOnlyExportAnswersEPERMAndDrainsThePayload() throws {
        let roServer = try ServerProcess(["-t", "-r", fixture.image])
        let raw = try RawClient(port: roServer.port)
        let flags = try raw.go()
        #expect(flags.contains(.readOnly))
        try raw.sendRequest(Request(command: .write, cookie: 1, offset: 0, length: 4096),
                            payload: [UInt8](repeating: 9, count: 4096))
        #expect(try raw.receiveSimpleReply()?.error == .permission)
        try raw.sendRequest(Request(command: .trim, cookie: 2, offset: 0, length: 4096))
        #expect(try raw.receiveSimpleReply()?.error == .permission)
        try raw.sendRequest(Request(command: .read, cookie: 3, offset: 0, length: 4))
        #expect(try raw.receiveSimpleReply()?.cookie == 3)
        #expect(try raw.receive(4) == Array(try fixture.contents.prefix(4)))
    }

    @Test func disconnectAnswersEverythingReceivedFirst() throws {
        let raw = try RawClient(port: server.port)
        _ = try raw.go()
        var w = WireWriter()
        for cookie in 1...32 {
            Request(command: .read, cookie: UInt64(cookie), offset: UInt64(cookie) * 4096, length: 4096).encode(into: &w)
        }
        Request(command: .disconnect, cookie: 99, offset: 0, length: 0).encode(into: &w)
        try raw.send(w.bytes)
        var cookies: Set<UInt64> = []
        for _ in 1...32 {
            let reply = try #require(try raw.receiveSimpleReply())
            #expect(reply.error == .ok)
            cookies.insert(reply.cookie)
            _ = try raw.receive(4096)
        }
        #expect(cookies == Set(1...32))
        #expect(raw.serverClosed())
    }

    @Test func structuredReadsUseHoleAndDataChunks() throws {
        let raw = try RawClient(port: server.port)
        let flags = try raw.go(structuredReplies: true, metaContexts: ["base:allocation"])
        #expect(flags.contains(.sendDF))
        // The fixture is data in its first MiB only when it has more than one; here all 1 MiB is data.
        try raw.sendRequest(Request(command: .read, cookie: 1, offset: 0, length: 4096))
        let data = try #require(try raw.receiveChunk())
        #expect(data.type == .offsetData && data.flags == 1 && data.payload.count == 8 + 4096)
        try raw.sendRequest(Request(command: .writeZeroes, cookie: 2, offset: 65536, length: 65536))
        #expect(try raw.receiveSimpleReply()?.error == .ok)
        try raw.sendRequest(Request(flags: .dontFragment, command: .read, cookie: 3, offset: 65536, length: 65536))
        let hole = try #require(try raw.receiveChunk())
        #expect(hole.type == .offsetHole && hole.cookie == 3 && hole.payload.count == 12)
        try raw.sendRequest(Request(command: .read, cookie: 4, offset: UInt64(fixture.size), length: 1))
        let error = try #require(try raw.receiveChunk())
        #expect(error.type == .error && error.payload.prefix(4) == [0, 0, 0, 22])
        try raw.sendRequest(Request(command: .blockStatus, cookie: 5, offset: 0, length: UInt64(fixture.size)))
        let status = try #require(try raw.receiveChunk())
        #expect(status.type == .blockStatus && status.flags == 1)
        #expect(status.payload.prefix(4) == [0, 0, 0, 1])
    }
}

/// Random bytes at every stage of the protocol never take the server down.
@Suite struct GarbageInputTests {
    @Test func randomBytesNeverKillTheServer() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", "-e", "8", fixture.image])
        var rng = SplitMix(seed: 0x5eed)
        for round in 0..<150 {
            let raw = try RawClient(port: server.port, timeout: 10)
            switch round % 3 {
            case 0:  // garbage instead of client flags and options
                try? raw.send((0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
            case 1:  // valid IHAVEOPT headers with random codes, lengths and payloads
                try raw.greet()
                for _ in 0..<4 {
                    let length = UInt32(rng.next() % 64)
                    var w = WireWriter()
                    OptionHeader(option: OptionCode(rawValue: UInt32(rng.next() % 16)), length: length).encode(into: &w)
                    w.write((0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
                    try? raw.send(w.bytes)
                }
            default:  // requests with random commands, flags, offsets and lengths after a real GO
                _ = try raw.go(structuredReplies: rng.next() % 2 == 0)
                for _ in 0..<4 {
                    let command = Command(rawValue: UInt16(rng.next() % 10))
                    var request = Request(flags: CommandFlags(rawValue: UInt16(rng.next() % 64)), command: command,
                                          cookie: rng.next(), offset: rng.next() % (2 << 20),
                                          length: rng.next() % (64 << 10))
                    if command == .disconnect { request.command = .read }
                    try? raw.sendRequest(request, payload: command == .write
                                         ? [UInt8](repeating: 0, count: Int(request.length)) : [])
                }
            }
        }
        #expect(server.isRunning)
        let client = try NBDClient(uri: server.uri)
        #expect(client.size == Int64(fixture.size))
    }
}
