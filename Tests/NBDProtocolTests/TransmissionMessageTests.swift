import NBDProtocol
import Testing

/// Request and reply layouts on the transmission phase.
@Suite struct TransmissionMessageTests {
    @Test(arguments: [
        Request(command: .read, cookie: 1, offset: 0, length: 512),
        Request(flags: .fua, command: .write, cookie: .max, offset: 1 << 50, length: 1 << 25),
        Request(flags: [.noHole, .fastZero], command: .writeZeroes, cookie: 7, offset: 4096, length: 4096),
        Request(flags: .requestOne, command: .blockStatus, cookie: 9, offset: 0, length: .max),
        Request(command: Command(rawValue: 77), cookie: 3, offset: 0, length: 0),
    ])
    func requestRoundTrips(_ request: Request) throws {
        var w = WireWriter()
        request.encode(into: &w)
        #expect(w.count == Request.wireSize)
        let decoded = try w.bytes.withUnsafeBytes { raw in
            var r = WireReader(raw)
            return try Request.decode(&r)
        }
        #expect(decoded == request)
    }

    @Test func truncatedRequestNeedsMoreBytes() throws {
        var w = WireWriter()
        Request(command: .read, cookie: 1, offset: 0, length: 1).encode(into: &w)
        for cut in 0..<Request.wireSize {
            let decoded = try w.bytes.prefix(cut).withUnsafeBytes { raw in
                var r = WireReader(raw)
                return try Request.decode(&r)
            }
            #expect(decoded == nil)
        }
    }

    @Test func requestWithBadMagicIsRefused() {
        let bytes = [UInt8](repeating: 0xaa, count: Request.wireSize)
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
