import NBDProtocol
import Testing

/// Request and reply layouts on the transmission phase.
@Suite struct TransmissionMessageTests {
    @Test(arguments: [
        Request(command: .read, cookie: 1, offset: 0, length: 512),
        Request(flags: .fua, command: .write, cookie: .max, offset: 1 << 50, length: 1 << 25),
        Request(flags: [.noHole, .fastZero], command: .writeZeroes, cookie: 7, offset: 4096, length: 4096),
        Request(flags: .requestOne, command: .blockStatus, cookie: 9, offset: 0, length: UInt64(UInt32.max)),
        Request(command: Command(rawValue: 77), cookie: 3, offset: 0, length: 0),
    ])
    func requestRoundTrips(_ request: Request) throws {
        for extended in [false, true] {
            var w = WireWriter()
            request.encode(into: &w, extended: extended)
            #expect(w.count == Request.wireSize(extended: extended))
            let decoded = try w.bytes.withUnsafeBytes { raw in
                var r = WireReader(raw)
                return try Request.decode(&r, extended: extended)
            }
            #expect(decoded == request)
        }
    }

    @Test func extendedRequestsCarry64BitLengths() throws {
        let request = Request(flags: .payloadLength, command: .blockStatus, cookie: 1, offset: 1 << 40,
                              length: 1 << 40)
        var w = WireWriter()
        request.encode(into: &w, extended: true)
        #expect(Array(w.bytes[0..<4]) == [0x21, 0xe4, 0x1c, 0x71])
        #expect(Array(w.bytes[24..<32]) == [0, 0, 1, 0, 0, 0, 0, 0])
        #expect(request.payloadLength(extended: true) == 1 << 40)
        #expect(request.payloadLength(extended: false) == 0, "compact: only WRITE carries a payload")
        // A compact header is not an extended one: the magic differs.
        var compact = WireWriter()
        Request(command: .read, cookie: 1, offset: 0, length: 1).encode(into: &compact)
        compact.write([UInt8](repeating: 0, count: 4))
        #expect(throws: ProtocolError.badMagic(UInt64(Magic.request))) {
            try compact.bytes.withUnsafeBytes { raw in
                var r = WireReader(raw)
                _ = try Request.decode(&r, extended: true)
            }
        }
    }

    @Test func extendedChunkHeaderRepeatsTheRequestOffset() {
        var header = [UInt8](repeating: 0, count: 32)
        let n = header.withUnsafeMutableBytes {
            ReplyHeader.writeDone($0, framing: .extended(requestOffset: 0x0102_0304_0506_0708), cookie: 9)
        }
        #expect(n == 32)
        #expect(Array(header[0..<8]) == [0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0])
        #expect(Array(header[16..<24]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(Array(header[24..<32]) == [0, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test func blockStatusExtChunkLayout() {
        let chunk = encodeBlockStatusChunk(framing: .extended(requestOffset: 0), cookie: 2, final: true, contextID: 1,
                                           descriptors: [.init(length: 1 << 33, flags: 3)])
        #expect(chunk.count == 32 + 8 + 16)
        #expect(Array(chunk[6..<8]) == [0, 6])
        #expect(Array(chunk[32..<40]) == [0, 0, 0, 1, 0, 0, 0, 1], "context ID, then descriptor count")
        #expect(Array(chunk[40..<56]) == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3])
    }

    @Test func blockStatusPayloadMustBe8Plus4N() throws {
        var w = WireWriter()
        BlockStatusPayload(effectLength: 4096, contextIDs: [1, 2]).encode(into: &w)
        let decoded = try w.bytes.withUnsafeBytes { try BlockStatusPayload.decode($0) }
        #expect(decoded == BlockStatusPayload(effectLength: 4096, contextIDs: [1, 2]))
        for bad in [[UInt8](repeating: 0, count: 8), [UInt8](repeating: 0, count: 14)] {
            #expect(throws: ProtocolError.self) { try bad.withUnsafeBytes { try BlockStatusPayload.decode($0) } }
        }
    }

    @Test func truncatedRequestNeedsMoreBytes() throws {
        var w = WireWriter()
        Request(command: .read, cookie: 1, offset: 0, length: 1).encode(into: &w)
        for cut in 0..<Request.wireSize(extended: false) {
            let decoded = try w.bytes.prefix(cut).withUnsafeBytes { raw in
                var r = WireReader(raw)
                return try Request.decode(&r)
            }
            #expect(decoded == nil)
        }
    }

    @Test func requestWithBadMagicIsRefused() {
        let bytes = [UInt8](repeating: 0xaa, count: Request.wireSize(extended: false))
        #expect(throws: ProtocolError.badMagic(0xaaaa_aaaa)) {
            try bytes.withUnsafeBytes { raw in
                var r = WireReader(raw)
                _ = try Request.decode(&r)
            }
        }
    }

    @Test func simpleReplyLayout() {
        var bytes = [UInt8](repeating: 0, count: ReplyHeader.simpleSize)
        bytes.withUnsafeMutableBytes { _ = ReplyHeader.writeSimple($0, error: .noSpace, cookie: 0x0102_0304_0506_0708) }
        #expect(bytes == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 1, 2, 3, 4, 5, 6, 7, 8])
    }

    @Test func offsetDataAndHoleChunkLayouts() {
        var data = [UInt8](repeating: 0, count: 28)
        let n = data.withUnsafeMutableBytes {
            ReplyHeader.writeOffsetData($0, flags: .done, cookie: 5, offset: 4096, dataLength: 512)
        }
        #expect(n == 28)
        #expect(Array(data[0..<4]) == [0x66, 0x8e, 0x33, 0xef])
        #expect(Array(data[4..<8]) == [0, 1, 0, 1])               // DONE, OFFSET_DATA
        #expect(Array(data[16..<20]) == [0, 0, 0x02, 0x08])       // 8 + 512
        var hole = [UInt8](repeating: 0, count: 32)
        let m = hole.withUnsafeMutableBytes {
            ReplyHeader.writeOffsetHole($0, flags: .done, cookie: 5, offset: 0, holeLength: 65536)
        }
        #expect(m == 32)
        #expect(Array(hole[4..<8]) == [0, 1, 0, 2])
        #expect(Array(hole[16..<20]) == [0, 0, 0, 12])
        #expect(Array(hole[28..<32]) == [0, 1, 0, 0])
    }

    @Test func errorChunkCarriesMessage() {
        let chunk = encodeErrorChunk(cookie: 1, error: .io, message: "bad sector")
        #expect(Array(chunk[6..<8]) == [0x80, 0x01])
        #expect(Array(chunk[16..<20]) == [0, 0, 0, 16])
        #expect(Array(chunk[20..<24]) == [0, 0, 0, 5])
        #expect(Array(chunk[24..<26]) == [0, 10])
        #expect(String(decoding: chunk[26...], as: UTF8.self) == "bad sector")
    }

    @Test func blockStatusChunkLayout() {
        let chunk = encodeBlockStatusChunk(cookie: 2, final: true, contextID: 1,
                                           descriptors: [.init(length: 4096, flags: 3), .init(length: 512, flags: 0)])
        #expect(chunk.count == 20 + 4 + 16)
        #expect(Array(chunk[4..<8]) == [0, 1, 0, 5])
        #expect(Array(chunk[20..<24]) == [0, 0, 0, 1])
        #expect(Array(chunk[24..<32]) == [0, 0, 0x10, 0, 0, 0, 0, 3])
    }
}
