// Messages of the fixed newstyle negotiation phase.

public enum ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A magic number that isn't the one the protocol puts there.
    case badMagic(UInt64)
    /// An option payload longer than `Limits.maxOptionLength`.
    case optionTooLong(UInt32)
    /// The option's own fields don't fit its declared length.
    case malformedOption(OptionCode, String)
    /// The client set flag bits this server doesn't know.
    case unknownClientFlags(UInt32)
    /// A request payload whose layout is wrong for its command.
    case malformedPayload(String)

    public var description: String {
        switch self {
        case .badMagic(let m): "bad magic 0x\(String(m, radix: 16))"
        case .optionTooLong(let n): "option length \(n) exceeds \(Limits.maxOptionLength)"
        case .malformedOption(let o, let why): "malformed \(o): \(why)"
        case .unknownClientFlags(let f): "unknown client flags 0x\(String(f, radix: 16))"
        case .malformedPayload(let why): why
        }
    }
}

/// The server's greeting: magic, IHAVEOPT, handshake flags (18 bytes).
public func encodeGreeting(flags: HandshakeFlags) -> [UInt8] {
    var w = WireWriter(capacity: 18)
    w.write(Magic.nbd)
    w.write(Magic.option)
    w.write(flags.rawValue)
    return w.bytes
}

/// The 16-byte header of every option request; the payload follows.
public struct OptionHeader: Equatable, Sendable {
    public static let wireSize = 16
    public var option: OptionCode
    public var length: UInt32

    public init(option: OptionCode, length: UInt32) {
        self.option = option
        self.length = length
    }

    /// Decodes a header; nil when short, throws on bad magic or an absurd length.
    public static func decode(_ r: inout WireReader) throws(ProtocolError) -> OptionHeader? {
        guard r.readableBytes >= wireSize else { return nil }
        let magic: UInt64 = r.readInteger()!
        guard magic == Magic.option else { throw .badMagic(magic) }
        let header = OptionHeader(option: OptionCode(rawValue: r.readInteger()!), length: r.readInteger()!)
        guard header.length <= Limits.maxOptionLength else { throw .optionTooLong(header.length) }
        return header
    }

    public func encode(into w: inout WireWriter) {
        w.write(Magic.option)
        w.write(option.rawValue)
        w.write(length)
    }
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
public struct InfoRequest: Equatable, Sendable {
    public var exportName: String
    public var requests: [InfoType]

    public init(exportName: String, requests: [InfoType]) {
        self.exportName = exportName
        self.requests = requests
    }

    public static func decode(_ payload: UnsafeRawBufferPointer, option: OptionCode) throws(ProtocolError) -> InfoRequest {
        var r = WireReader(payload)
        guard let nameLength: UInt32 = r.readInteger(), nameLength <= Limits.maxString,
              let name = r.readString(Int(nameLength))
        else { throw .malformedOption(option, "bad export name") }
        guard let count: UInt16 = r.readInteger(), r.readableBytes == Int(count) * 2 else {
            throw .malformedOption(option, "information request count does not match length")
        }
        let requests = (0..<count).map { _ in InfoType(rawValue: r.readInteger()!) }
        return InfoRequest(exportName: name, requests: requests)
    }

    public func encode(into w: inout WireWriter) {
        w.write(UInt32(exportName.utf8.count))
        w.write(exportName)
        w.write(UInt16(requests.count))
        for r in requests { w.write(r.rawValue) }
    }
}

/// The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
public struct MetaContextRequest: Equatable, Sendable {
    public var exportName: String
    public var queries: [String]

    public init(exportName: String, queries: [String]) {
        self.exportName = exportName
        self.queries = queries
    }

    public static func decode(_ payload: UnsafeRawBufferPointer, option: OptionCode) throws(ProtocolError)
        -> MetaContextRequest
    {
        var r = WireReader(payload)
        guard let nameLength: UInt32 = r.readInteger(), nameLength <= Limits.maxString,
              let name = r.readString(Int(nameLength))
        else { throw .malformedOption(option, "bad export name") }
        guard let count: UInt32 = r.readInteger() else { throw .malformedOption(option, "missing query count") }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length: UInt32 = r.readInteger(), length <= Limits.maxString,
                  let query = r.readString(Int(length))
            else { throw .malformedOption(option, "query runs past the option's length") }
            queries.append(query)
        }
        guard r.readableBytes == 0 else { throw .malformedOption(option, "trailing bytes") }
        return MetaContextRequest(exportName: name, queries: queries)
    }

    public func encode(into w: inout WireWriter) {
        w.write(UInt32(exportName.utf8.count))
        w.write(exportName)
        w.write(UInt32(queries.count))
        for q in queries {
            w.write(UInt32(q.utf8.count))
            w.write(q)
        }
    }
}

/// One reply to an option: header and payload.
public struct OptionReply: Equatable, Sendable {
    public var option: OptionCode
    public var type: OptionReplyType
    public var payload: [UInt8]

    public init(option: OptionCode, type: OptionReplyType, payload: [UInt8] = []) {
        self.option = option
        self.type = type
        self.payload = payload
    }

    public static func ack(_ option: OptionCode) -> OptionReply { OptionReply(option: option, type: .ack) }

    /// An error reply; the message is for humans (nbdinfo prints it).
    public static func error(_ option: OptionCode, _ type: OptionReplyType, _ message: String) -> OptionReply {
        OptionReply(option: option, type: type, payload: Array(message.utf8.prefix(Limits.maxString)))
    }

    /// NBD_REP_SERVER for NBD_OPT_LIST.
    public static func server(name: String, description: String) -> OptionReply {
        var w = WireWriter()
        w.write(UInt32(name.utf8.count))
        w.write(name)
        w.write(description)
        return OptionReply(option: .list, type: .server, payload: w.bytes)
    }

    public static func metaContext(_ option: OptionCode, id: UInt32, name: String) -> OptionReply {
        var w = WireWriter()
        w.write(id)
        w.write(name)
        return OptionReply(option: option, type: .metaContext, payload: w.bytes)
    }

    public static func infoExport(_ option: OptionCode, size: UInt64, flags: TransmissionFlags) -> OptionReply {
        var w = WireWriter()
        w.write(InfoType.export.rawValue)
        w.write(size)
        w.write(flags.rawValue)
        return OptionReply(option: option, type: .info, payload: w.bytes)
    }

    public static func infoName(_ option: OptionCode, _ name: String) -> OptionReply {
        var w = WireWriter()
        w.write(InfoType.name.rawValue)
        w.write(name)
        return OptionReply(option: option, type: .info, payload: w.bytes)
    }

    public static func infoDescription(_ option: OptionCode, _ text: String) -> OptionReply {
        var w = WireWriter()
        w.write(InfoType.description.rawValue)
        w.write(text)
        return OptionReply(option: option, type: .info, payload: w.bytes)
    }

    public static func infoBlockSize(_ option: OptionCode, minimum: UInt32, preferred: UInt32, maximum: UInt32)
        -> OptionReply
    {
        var w = WireWriter()
        w.write(InfoType.blockSize.rawValue)
        w.write(minimum)
        w.write(preferred)
        w.write(maximum)
        return OptionReply(option: option, type: .info, payload: w.bytes)
    }

    public func encode(into w: inout WireWriter) {
        w.write(Magic.optionReply)
        w.write(option.rawValue)
        w.write(type.rawValue)
        w.write(UInt32(payload.count))
        w.write(payload)
    }

    /// Decodes one reply (used by tests acting as a client).
    public static func decode(_ r: inout WireReader) throws(ProtocolError) -> OptionReply? {
        guard r.readableBytes >= 20 else { return nil }
        let start = r
        let magic: UInt64 = r.readInteger()!
        guard magic == Magic.optionReply else { throw .badMagic(magic) }
        let option = OptionCode(rawValue: r.readInteger()!)
        let type = OptionReplyType(rawValue: r.readInteger()!)
        let length: UInt32 = r.readInteger()!
        guard let payload = r.readBytes(Int(length)) else {
            r = start
            return nil
        }
        return OptionReply(option: option, type: type, payload: Array(payload))
    }
}

/// What NBD_OPT_EXPORT_NAME is answered with when it succeeds: size,
/// flags and, unless the client set NO_ZEROES, 124 zero bytes.
public func encodeExportNameReply(size: UInt64, flags: TransmissionFlags, noZeroes: Bool) -> [UInt8] {
    var w = WireWriter(capacity: 134)
    w.write(size)
    w.write(flags.rawValue)
    if !noZeroes { w.write(repeatElement(UInt8(0), count: 124)) }
    return w.bytes
}
