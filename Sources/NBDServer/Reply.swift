import BlockDevice
import NBDProtocol
import SystemIO

/// One whole reply to one request, as the bytes to send: a header of up to
/// `ReplyHeader.maxSize` bytes kept inline (so the common replies need no
/// heap), then a body.
/// Values move from the request handler to the reply writer; `cost` is the
/// budget the reader reserved for the request, released once the reply is
/// sent or dropped.
struct Reply: @unchecked Sendable {
    enum Body {
        case none
        /// Read data in a buffer from the pool, given back after sending.
        case pooled(UnsafeMutableRawBufferPointer)
        /// Encoded chunks (block status, error messages).
        case bytes([UInt8])
        /// Read data still in the image file, sent from there with sendfile(2).
        case file(FileRange, count: Int)
    }

    private var header: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0)
    private(set) var headerLength = 0
    private(set) var body: Body = .none
    var cost = 0
    /// The error the client is told, for metrics.
    var error: NBDError = .ok

    /// A reply whose header `write` encodes (returning its length), followed by `body`.
    init(body: Body = .none, header write: (UnsafeMutableRawBufferPointer) -> Int) {
        self.body = body
        headerLength = withUnsafeMutableBytes(of: &header) { write($0) }
        precondition(headerLength <= MemoryLayout.size(ofValue: header))
    }

    var length: Int {
        switch body {
        case .none: headerLength
        case .pooled(let data): headerLength + data.count
        case .bytes(let bytes): headerLength + bytes.count
        case .file(_, let count): headerLength + count
        }
    }

    /// sendfile(2) can't be asked not to block, so only the writer thread sends such a reply.
    var needsBlockingSend: Bool {
        if case .file = body { return true }
        return false
    }

    /// Sends what is left after `sent` bytes; returns the new count (see `Transport.send`).
    mutating func send(on transport: Transport, alreadySent sent: Int, blocking: Bool) throws(Transport.Failure) -> Int {
        let count = headerLength
        let body = self.body
        return try withUnsafeBytes(of: &header) { (raw) throws(Transport.Failure) -> Int in
            let head = UnsafeRawBufferPointer(rebasing: raw[..<count])
            switch body {
            case .none:
                return try transport.send(head, UnsafeRawBufferPointer(start: nil, count: 0), alreadySent: sent,
                                          blocking: blocking)
            case .pooled(let data):
                return try transport.send(head, UnsafeRawBufferPointer(data), alreadySent: sent, blocking: blocking)
            case .bytes(let bytes):
                let result = bytes.withUnsafeBytes { b in
                    Result { () throws(Transport.Failure) in
                        try transport.send(head, b, alreadySent: sent, blocking: blocking)
                    }
                }
                return try result.get()
            case .file(let range, let count):
                precondition(blocking, "file ranges are sent by the writer thread")
                return try transport.send(head, file: range, count: count, alreadySent: sent)
            }
        }
    }

    // MARK: - The replies there are

    /// Success or an error without a message: a simple reply, or with
    /// extended headers (where simple replies are not allowed) a chunk.
    static func status(cookie: UInt64, error: NBDError, framing: ChunkFraming?) -> Reply {
        var reply: Reply
        if let framing, case .extended = framing {
            guard error != .ok else { return Reply { ReplyHeader.writeDone($0, framing: framing, cookie: cookie) } }
            reply = .chunks(encodeErrorChunk(framing: framing, cookie: cookie, error: error, message: ""))
        } else {
            reply = Reply { ReplyHeader.writeSimple($0, error: error, cookie: cookie) }
        }
        reply.error = error
        return reply
    }

    /// Read data, as a simple reply or one OFFSET_DATA chunk.
    static func data(cookie: UInt64, offset: UInt64, _ data: UnsafeMutableRawBufferPointer,
                     framing: ChunkFraming?) -> Reply {
        Reply(body: .pooled(data)) { header in
            guard let framing else { return ReplyHeader.writeSimple(header, error: .ok, cookie: cookie) }
            return ReplyHeader.writeOffsetData(header, framing: framing, flags: .done, cookie: cookie, offset: offset,
                                               dataLength: UInt32(data.count))
        }
    }

    /// Read data sent straight from the image file, as a simple reply or one OFFSET_DATA chunk.
    static func fileData(cookie: UInt64, offset: UInt64, _ range: FileRange, count: Int,
                         framing: ChunkFraming?) -> Reply {
        Reply(body: .file(range, count: count)) { header in
            guard let framing else { return ReplyHeader.writeSimple(header, error: .ok, cookie: cookie) }
            return ReplyHeader.writeOffsetData(header, framing: framing, flags: .done, cookie: cookie, offset: offset,
                                               dataLength: UInt32(count))
        }
    }

    /// One OFFSET_HOLE chunk: the range reads as zeros, which are not sent.
    static func hole(cookie: UInt64, offset: UInt64, length: UInt32, framing: ChunkFraming) -> Reply {
        Reply {
            ReplyHeader.writeOffsetHole($0, framing: framing, flags: .done, cookie: cookie, offset: offset,
                                        holeLength: length)
        }
    }

    /// Encoded chunks, sent as they are.
    static func chunks(_ bytes: [UInt8]) -> Reply {
        Reply(body: .bytes(bytes)) { _ in 0 }
    }
}
