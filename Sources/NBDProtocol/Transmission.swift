// Messages of the transmission phase, in both framings: compact (28-byte
// requests, 16-byte simple and 20-byte structured replies) and extended
// (32-byte requests and replies, NBD_OPT_EXTENDED_HEADERS).

/// A request header; a payload follows it on the wire for WRITE, and with
/// extended headers for any request flagged NBD_CMD_FLAG_PAYLOAD_LEN.
public struct Request: Equatable, Sendable {
    public var flags: CommandFlags
    public var command: Command
    public var cookie: UInt64
    public var offset: UInt64
    /// Effect length, or with NBD_CMD_FLAG_PAYLOAD_LEN (always for compact WRITEs) the payload's length.
    /// 64 bits only with extended headers.
    public var length: UInt64

    public init(flags: CommandFlags = [], command: Command, cookie: UInt64, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public static func wireSize(extended: Bool) -> Int { extended ? 32 : 28 }

    /// Bytes of payload that follow the header on the wire.
    public func payloadLength(extended: Bool) -> UInt64 {
        if extended { return flags.contains(.payloadLength) ? length : 0 }
        return command == .write ? length : 0
    }

    /// Decodes a header; nil when short, throws on bad magic (the stream
    /// can't be resynchronised, so the connection must close).
    public static func decode(_ r: inout WireReader, extended: Bool = false) throws(ProtocolError) -> Request? {
        guard r.readableBytes >= wireSize(extended: extended) else { return nil }
        let magic: UInt32 = r.readInteger()!
        guard magic == (extended ? Magic.extendedRequest : Magic.request) else { throw .badMagic(UInt64(magic)) }
        let flags = CommandFlags(rawValue: r.readInteger()!)
        let command = Command(rawValue: r.readInteger()!)
        let cookie: UInt64 = r.readInteger()!
        let offset: UInt64 = r.readInteger()!
        let length = extended ? r.readInteger(as: UInt64.self)! : UInt64(r.readInteger(as: UInt32.self)!)
        return Request(flags: flags, command: command, cookie: cookie, offset: offset, length: length)
    }

    /// Encodes the header (compact: `length` must fit 32 bits).
    public func encode(into w: inout WireWriter, extended: Bool = false) {
        w.write(extended ? Magic.extendedRequest : Magic.request)
        w.write(flags.rawValue)
        w.write(command.rawValue)
        w.write(cookie)
        w.write(offset)
        if extended { w.write(length) } else { w.write(UInt32(length)) }
    }
}

/// How the chunks of a reply are framed.
public enum ChunkFraming: Equatable, Sendable {
    /// 20-byte structured reply chunk headers (NBD_OPT_STRUCTURED_REPLY).
    case structured
    /// 32-byte extended headers, which repeat the request's offset (NBD_OPT_EXTENDED_HEADERS).
    case extended(requestOffset: UInt64)

    public var headerSize: Int {
        switch self {
        case .structured: ReplyHeader.chunkSize
        case .extended: ReplyHeader.extendedChunkSize
        }
    }
}

/// Reply headers, written into a caller's buffer so the hot path allocates nothing.
public enum ReplyHeader {
    public static let simpleSize = 16
    public static let chunkSize = 20
    public static let extendedChunkSize = 32
    /// The longest header a reply needs (an extended OFFSET_HOLE chunk is 44 bytes).
    public static let maxSize = 48

    /// A simple reply: magic, error, cookie. Data for a successful READ follows.
    @discardableResult
    public static func writeSimple(_ buffer: UnsafeMutableRawBufferPointer, error: NBDError, cookie: UInt64) -> Int {
        var at = buffer.storeBigEndian(Magic.simpleReply, at: 0)
        at = buffer.storeBigEndian(error.rawValue, at: at)
        return buffer.storeBigEndian(cookie, at: at)
    }

    /// A chunk header, structured or extended: the one place either is encoded.
    /// `length` bytes of chunk payload follow.
    @discardableResult
    public static func writeChunk(_ buffer: UnsafeMutableRawBufferPointer, framing: ChunkFraming = .structured,
                                  flags: ChunkFlags, type: ChunkType, cookie: UInt64, length: UInt64) -> Int {
        switch framing {
        case .structured:
            var at = buffer.storeBigEndian(Magic.structuredReply, at: 0)
            at = buffer.storeBigEndian(flags.rawValue, at: at)
            at = buffer.storeBigEndian(type.rawValue, at: at)
            at = buffer.storeBigEndian(cookie, at: at)
            return buffer.storeBigEndian(UInt32(length), at: at)
        case .extended(let requestOffset):
            var at = buffer.storeBigEndian(Magic.extendedReply, at: 0)
            at = buffer.storeBigEndian(flags.rawValue, at: at)
            at = buffer.storeBigEndian(type.rawValue, at: at)
            at = buffer.storeBigEndian(cookie, at: at)
            at = buffer.storeBigEndian(requestOffset, at: at)
            return buffer.storeBigEndian(length, at: at)
        }
    }

    /// NBD_REPLY_TYPE_OFFSET_DATA header and offset; `dataLength` bytes follow.
    @discardableResult
    public static func writeOffsetData(_ buffer: UnsafeMutableRawBufferPointer, framing: ChunkFraming = .structured,
                                       flags: ChunkFlags, cookie: UInt64, offset: UInt64, dataLength: UInt32) -> Int {
        let at = writeChunk(buffer, framing: framing, flags: flags, type: .offsetData, cookie: cookie,
                            length: 8 + UInt64(dataLength))
        return buffer.storeBigEndian(offset, at: at)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE chunk, complete.
    @discardableResult
    public static func writeOffsetHole(_ buffer: UnsafeMutableRawBufferPointer, framing: ChunkFraming = .structured,
                                       flags: ChunkFlags, cookie: UInt64, offset: UInt64, holeLength: UInt32) -> Int {
        var at = writeChunk(buffer, framing: framing, flags: flags, type: .offsetHole, cookie: cookie, length: 12)
        at = buffer.storeBigEndian(offset, at: at)
        return buffer.storeBigEndian(holeLength, at: at)
    }

    /// NBD_REPLY_TYPE_NONE with DONE: a reply with nothing to say but success.
    @discardableResult
    public static func writeDone(_ buffer: UnsafeMutableRawBufferPointer, framing: ChunkFraming = .structured,
                                 cookie: UInt64) -> Int {
        writeChunk(buffer, framing: framing, flags: .done, type: .none, cookie: cookie, length: 0)
    }
}

/// A whole chunk as bytes: the header from `ReplyHeader.writeChunk`, then a
/// payload written by `body` into exactly `payloadLength` bytes.
func encodeChunk(framing: ChunkFraming, flags: ChunkFlags, type: ChunkType, cookie: UInt64, payloadLength: Int,
                 _ body: (UnsafeMutableRawBufferPointer) -> Void) -> [UInt8] {
    let total = framing.headerSize + payloadLength
    return [UInt8](unsafeUninitializedCapacity: total) { buffer, count in
        let raw = UnsafeMutableRawBufferPointer(buffer)
        let at = ReplyHeader.writeChunk(raw, framing: framing, flags: flags, type: type, cookie: cookie,
                                        length: UInt64(payloadLength))
        body(UnsafeMutableRawBufferPointer(rebasing: raw[at...]))
        count = total
    }
}

/// A NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
public func encodeErrorChunk(framing: ChunkFraming = .structured, cookie: UInt64, error: NBDError,
                             message: String) -> [UInt8] {
    let text = Array(message.utf8.prefix(Limits.maxString))
    return encodeChunk(framing: framing, flags: .done, type: .error, cookie: cookie,
                       payloadLength: 6 + text.count) { payload in
        var at = payload.storeBigEndian(error.rawValue, at: 0)
        at = payload.storeBigEndian(UInt16(text.count), at: at)
        UnsafeMutableRawBufferPointer(rebasing: payload[at...]).copyBytes(from: text)
    }
}

/// One block status descriptor: a run of `length` bytes with `flags`. The
/// compact BLOCK_STATUS chunk holds 32 bits of each; BLOCK_STATUS_EXT all 64.
public struct BlockStatusDescriptor: Equatable, Sendable {
    public var length: UInt64
    public var flags: UInt64
    public init(length: UInt64, flags: UInt64) {
        self.length = length
        self.flags = flags
    }

    public static func size(extended: Bool) -> Int { extended ? 16 : 8 }
}

/// The status chunk for one metadata context: NBD_REPLY_TYPE_BLOCK_STATUS, or
/// with extended framing NBD_REPLY_TYPE_BLOCK_STATUS_EXT.
public func encodeBlockStatusChunk(framing: ChunkFraming = .structured, cookie: UInt64, final: Bool,
                                   contextID: UInt32, descriptors: [BlockStatusDescriptor]) -> [UInt8] {
    let extended = framing != .structured
    let payloadLength = (extended ? 8 : 4) + descriptors.count * BlockStatusDescriptor.size(extended: extended)
    return encodeChunk(framing: framing, flags: final ? .done : [], type: extended ? .blockStatusExt : .blockStatus,
                       cookie: cookie, payloadLength: payloadLength) { payload in
        var at = payload.storeBigEndian(contextID, at: 0)
        if extended { at = payload.storeBigEndian(UInt32(descriptors.count), at: at) }
        for d in descriptors {
            if extended {
                at = payload.storeBigEndian(d.length, at: at)
                at = payload.storeBigEndian(d.flags, at: at)
            } else {
                at = payload.storeBigEndian(UInt32(d.length), at: at)
                at = payload.storeBigEndian(UInt32(d.flags), at: at)
            }
        }
    }
}

/// The payload form of NBD_CMD_BLOCK_STATUS (extended headers with
/// NBD_FLAG_BLOCK_STATUS_PAYLOAD): the effect length, then the IDs of the
/// metadata contexts the client wants answered.
public struct BlockStatusPayload: Equatable, Sendable {
    public var effectLength: UInt64
    public var contextIDs: [UInt32]

    public init(effectLength: UInt64, contextIDs: [UInt32]) {
        self.effectLength = effectLength
        self.contextIDs = contextIDs
    }

    public static func decode(_ payload: UnsafeRawBufferPointer) throws(ProtocolError) -> BlockStatusPayload {
        var r = WireReader(payload)
        guard payload.count >= 12, (payload.count - 8) % 4 == 0, let effect: UInt64 = r.readInteger() else {
            throw .malformedPayload("block status payload of \(payload.count) bytes is not 8 + 4n, n > 0")
        }
        var ids: [UInt32] = []
        while let id: UInt32 = r.readInteger() { ids.append(id) }
        return BlockStatusPayload(effectLength: effect, contextIDs: ids)
    }

    public func encode(into w: inout WireWriter) {
        w.write(effectLength)
        for id in contextIDs { w.write(id) }
    }
}
