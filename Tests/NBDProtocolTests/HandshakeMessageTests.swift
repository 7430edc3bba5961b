import NBDProtocol
import Testing

/// Negotiation messages encode to the bytes the spec lays out and decode back; malformed ones are refused.
@Suite struct HandshakeMessageTests {
    @Test func greetingIsMagicThenIHAVEOPTThenFlags() {
        let bytes = encodeGreeting(flags: [.fixedNewstyle, .noZeroes])
        #expect(bytes.count == 18)
        #expect(Array(bytes[0..<8]) == Array("NBDMAGIC".utf8))
        #expect(Array(bytes[8..<16]) == Array("IHAVEOPT".utf8))
        #expect(bytes[16] == 0 && bytes[17] == 3)
    }

    @Test(arguments: [OptionCode.go, .info, .list, .abort, .structuredReply, OptionCode(rawValue: 999)])
    func optionHeaderRoundTrips(_ option: OptionCode) throws {
        var w = WireWriter()
        OptionHeader(option: option, length: 42).encode(into: &w)
        let decoded = try w.bytes.withUnsafeBytes { raw in
            var r = WireReader(raw)
            return try OptionHeader.decode(&r)
        }
        #expect(decoded == OptionHeader(option: option, length: 42))
    }

    @Test func clientFlagsMayBeAnyKnownBitsButNoOthers() throws {
        #expect(try ClientFlags.decode(3) == [.fixedNewstyle, .noZeroes])
        #expect(try ClientFlags.decode(1) == [.fixedNewstyle])
        #expect(try ClientFlags.decode(0) == [], "plain newstyle is allowed")
        #expect(throws: ProtocolError.unknownClientFlags(1 | 4)) { try ClientFlags.decode(1 | 4) }
    }

    @Test func shortOptionHeaderNeedsMoreBytes() throws {
        var w = WireWriter()
        OptionHeader(option: .go, length: 0).encode(into: &w)
        let decoded = try w.bytes.dropLast().withUnsafeBytes { raw in
            var r = WireReader(raw)
            return try OptionHeader.decode(&r)
        }
        #expect(decoded == nil)
    }

    @Test func optionHeaderWithBadMagicIsRefused() {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes[0] = 0x42
        #expect(throws: ProtocolError.self) {
            try bytes.withUnsafeBytes { raw in
                var r = WireReader(raw)
                _ = try OptionHeader.decode(&r)
            }
        }
    }

    @Test func absurdOptionLengthIsRefused() {
        var w = WireWriter()
        OptionHeader(option: .go, length: 0xffff_ffff).encode(into: &w)
        #expect(throws: ProtocolError.optionTooLong(0xffff_ffff)) {
            try w.bytes.withUnsafeBytes { raw in
                var r = WireReader(raw)
                _ = try OptionHeader.decode(&r)
            }
        }
    }

    @Test(arguments: [("", [InfoType]()), ("disk", [.name, .description, .blockSize])])
    func infoRequestRoundTrips(name: String, requests: [InfoType]) throws {
        var w = WireWriter()
        let request = InfoRequest(exportName: name, requests: requests)
        request.encode(into: &w)
        let decoded = try w.bytes.withUnsafeBytes { try InfoRequest.decode($0, option: .go) }
        #expect(decoded == request)
    }

    /// Payloads whose inner lengths disagree with the option's length.
    @Test(arguments: [
        [UInt8](),                                  // no name length
        [0, 0, 0, 5, 0x61],                         // name runs past the end
        [0, 0, 0, 0, 0, 2, 0, 1],                   // two requests announced, one present
        [0, 0, 0, 0, 0, 0, 9],                      // trailing byte
        [0xff, 0xff, 0xff, 0xff],                   // name length beyond 4096
    ])
    func malformedInfoRequestIsRefused(_ payload: [UInt8]) {
        #expect(throws: ProtocolError.self) { try payload.withUnsafeBytes { _ = try InfoRequest.decode($0, option: .go) } }
    }

    @Test func metaContextRequestRoundTrips() throws {
        var w = WireWriter()
        let request = MetaContextRequest(exportName: "x", queries: ["base:allocation", "qemu:"])
        request.encode(into: &w)
        let decoded = try w.bytes.withUnsafeBytes { try MetaContextRequest.decode($0, option: .setMetaContext) }
        #expect(decoded == request)
    }

    @Test(arguments: [
        [0, 0, 0, 0],                                // no query count
        [0, 0, 0, 0, 0, 0, 0, 1],                    // one query announced, none present
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0x62],  // query runs past the end
        [0, 0, 0, 0, 0, 0, 0, 0, 7],                 // trailing byte
    ])
    func malformedMetaContextRequestIsRefused(_ payload: [UInt8]) {
        #expect(throws: ProtocolError.self) {
            try payload.withUnsafeBytes { _ = try MetaContextRequest.decode($0, option: .listMetaContext) }
        }
    }

    @Test func optionRepliesRoundTrip() throws {
        let replies: [OptionReply] = [
            .ack(.go),
            .error(.go, .errUnknown, "no such export"),
            .server(name: "disk", description: "a disk"),
            .metaContext(.setMetaContext, id: 1, name: "base:allocation"),
            .infoExport(.go, size: 1 << 40, flags: [.hasFlags, .readOnly]),
            .infoName(.info, "disk"),
            .infoDescription(.info, "desc"),
            .infoBlockSize(.go, minimum: 1, preferred: 4096, maximum: 1 << 25),
        ]
        var w = WireWriter()
        for r in replies { r.encode(into: &w) }
        var decoded: [OptionReply] = []
        try w.bytes.withUnsafeBytes { raw in
            var r = WireReader(raw)
            while let reply = try OptionReply.decode(&r) { decoded.append(reply) }
            #expect(r.readableBytes == 0)
        }
        #expect(decoded == replies)
        #expect(replies[4].payload == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3])  // type, size 2^40, flags
        #expect(replies[1].type.isError && !replies[0].type.isError)
    }

    @Test(arguments: [true, false])
    func exportNameReplyHonoursNoZeroes(noZeroes: Bool) {
        let bytes = encodeExportNameReply(size: 512, flags: [.hasFlags], noZeroes: noZeroes)
        #expect(bytes.count == (noZeroes ? 10 : 134))
        #expect(Array(bytes[0..<10]) == [0, 0, 0, 0, 0, 0, 2, 0, 0, 1])
    }
}
