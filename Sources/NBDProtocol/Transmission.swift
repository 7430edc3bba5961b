// Messages of the transmission phase.

/// A request header (28 bytes); a WRITE's payload follows it on the wire.
public struct Request: Equatable, Sendable {
    public static let wireSize = 28
    public var flags: CommandFlags
    public var command: Command
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: CommandFlags = [], command: Command, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Decodes a header; nil when short, throws on bad magic (the stream
    /// can't be resynchronised, so the connection must close).
    public static func decode(_ r: inout WireReader) throws(ProtocolError) -> Request? {
        guard r.readableBytes >= wireSize else { return nil }
        let magic: UInt32 = r.readInteger()!
        guard magic == Magic.request else { throw .badMagic(UInt64(magic)) }
        return Request(flags: CommandFlags(rawValue: r.readInteger()!), command: Command(rawValue: r.readInteger()!),
                       cookie: r.readInteger()!, offset: r.readInteger()!, length: r.readInteger()!)
    }

    public func encode(into w: inout WireWriter) {
        w.write(Magic.request)
        w.write(flags.rawValue)
        w.write(command.rawValue)
        w.write(cookie)
        w.write(offset)
        w.write(length)
    }
}

/// Reply headers, written into a caller's buffer so the hot path allocates nothing.
public enum ReplyHeader {
    public static let simpleSize = 16
    public static let chunkSize = 20

    /// A simple reply: magic, error, cookie. Data for a successful READ follows.
    @discardableResult
    public static func writeSimple(_ buffer: UnsafeMutableRawBufferPointer, error: NBDError, cookie: UInt64) -> Int {
        var at = buffer.storeBigEndian(Magic.simpleReply, at: 0)
        at = buffer.storeBigEndian(error.rawValue, at: at)
        return buffer.storeBigEndian(cookie, at: at)
    }

    /// A structured reply chunk header; `length` bytes of chunk payload follow.
    @discardableResult
    public static func writeChunk(_ buffer: UnsafeMutableRawBufferPointer, flags: ChunkFlags, type: ChunkType,
                                  cookie: UInt64, length: UInt32) -> Int {
        var at = buffer.storeBigEndian(Magic.structuredReply, at: 0)
        at = buffer.storeBigEndian(flags.rawValue, at: at)
        at = buffer.storeBigEndian(type.rawValue, at: at)
        at = buffer.storeBigEndian(cookie, at: at)
        return buffer.storeBigEndian(length, at: at)
    }

    /// NBD_REPLY_TYPE_OFFSET_DATA header and offset (28 bytes); `dataLength` bytes follow.
    @discardableResult
    public static func writeOffsetData(_ buffer: UnsafeMutableRawBufferPointer, flags: ChunkFlags, cookie: UInt64,
                                       offset: UInt64, dataLength: UInt32) -> Int {
        let at = writeChunk(buffer, flags: flags, type: .offsetData, cookie: cookie, length: 8 + dataLength)
        return buffer.storeBigEndian(offset, at: at)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE chunk, complete (32 bytes).
    @discardableResult
    public static func writeOffsetHole(_ buffer: UnsafeMutableRawBufferPointer, flags: ChunkFlags, cookie: UInt64,
                                       offset: UInt64, holeLength: UInt32) -> Int {
        var at = writeChunk(buffer, flags: flags, type: .offsetHole, cookie: cookie, length: 12)
        at = buffer.storeBigEndian(offset, at: at)
        return buffer.storeBigEndian(holeLength, at: at)
    }
}

/// A whole chunk as bytes: the header from `ReplyHeader.writeChunk` (the one
/// place a chunk header is encoded), then a payload written by `body` into
/// exactly `payloadLength` bytes.
func encodeChunk(flags: ChunkFlags, type: ChunkType, cookie: UInt64, payloadLength: Int,
                 _ body: (UnsafeMutableRawBufferPointer) -> Void) -> [UInt8] {
    let total = ReplyHeader.chunkSize + payloadLength
    return [UInt8](unsafeUninitializedCapacity: total) { buffer, count in
        let raw = UnsafeMutableRawBufferPointer(buffer)
        let at = ReplyHeader.writeChunk(raw, flags: flags, type: type, cookie: cookie, length: UInt32(payloadLength))
        body(UnsafeMutableRawBufferPointer(rebasing: raw[at...]))
        count = total
    }
}

/// A structured NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
public func encodeErrorChunk(cookie: UInt64, error: NBDError, message: String) -> [UInt8] {
    let text = Array(message.utf8.prefix(Limits.maxString))
    return encodeChunk(flags: .done, type: .error, cookie: cookie, payloadLength: 6 + text.count) { payload in
        var at = payload.storeBigEndian(error.rawValue, at: 0)
        at = payload.storeBigEndian(UInt16(text.count), at: at)
        UnsafeMutableRawBufferPointer(rebasing: payload[at...]).copyBytes(from: text)
    }
}

/// One block status descriptor: a run of `length` bytes with `flags`.
public struct BlockStatusDescriptor: Equatable, Sendable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// A NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context.
public func encodeBlockStatusChunk(cookie: UInt64, final: Bool, contextID: UInt32,
                                   descriptors: [BlockStatusDescriptor]) -> [UInt8] {
    encodeChunk(flags: final ? .done : [], type: .blockStatus, cookie: cookie,
                payloadLength: 4 + descriptors.count * 8) { payload in
        var at = payload.storeBigEndian(contextID, at: 0)
        for d in descriptors {
            at = payload.storeBigEndian(d.length, at: at)
            at = payload.storeBigEndian(d.flags, at: at)
        }
    }
}

/// A NBD_REPLY_TYPE_NONE chunk with the DONE flag, ending a reply.
public func encodeDoneChunk(cookie: UInt64) -> [UInt8] {
    encodeChunk(flags: .done, type: .none, cookie: cookie, payloadLength: 0) { _ in }
}
