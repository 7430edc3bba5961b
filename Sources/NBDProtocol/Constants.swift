// Magic numbers and codes of the NBD protocol (../shared/specs/nbd-protocol.md).

public enum Magic {
    /// "NBDMAGIC", the first 8 bytes a server sends.
    public static let nbd: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle negotiation, and the prefix of every option request.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    public static let extendedReply: UInt32 = 0x6e8a_278c
}

/// Flags the server sends in the handshake.
public struct HandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the handshake with.
public struct ClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    public static let known: ClientFlags = [.fixedNewstyle, .noZeroes]

    /// The flags a client sends after the greeting. Unknown bits are an error (the
    /// spec: the server MUST close the connection); no bits at all is plain
    /// newstyle, which may still ask for an export with NBD_OPT_EXPORT_NAME.
    public static func decode(_ raw: UInt32) throws(ProtocolError) -> ClientFlags {
        let flags = ClientFlags(rawValue: raw)
        guard known.isSuperset(of: flags) else { throw .unknownClientFlags(raw) }
        return flags
    }
}

/// Per-export flags announced before transmission.
public struct TransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    /// BLOCK_STATUS may carry a payload naming the contexts wanted (extended headers only).
    public static let blockStatusPayload = TransmissionFlags(rawValue: 1 << 12)
}

/// Option codes. Unknown codes are kept so the server can answer ERR_UNSUP.
public struct OptionCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let exportName = OptionCode(rawValue: 1)
    public static let abort = OptionCode(rawValue: 2)
    public static let list = OptionCode(rawValue: 3)
    public static let peekExport = OptionCode(rawValue: 4)
    public static let startTLS = OptionCode(rawValue: 5)
    public static let info = OptionCode(rawValue: 6)
    public static let go = OptionCode(rawValue: 7)
    public static let structuredReply = OptionCode(rawValue: 8)
    public static let listMetaContext = OptionCode(rawValue: 9)
    public static let setMetaContext = OptionCode(rawValue: 10)
    public static let extendedHeaders = OptionCode(rawValue: 11)

    public var description: String {
        switch self {
        case .exportName: "NBD_OPT_EXPORT_NAME"
        case .abort: "NBD_OPT_ABORT"
        case .list: "NBD_OPT_LIST"
        case .peekExport: "NBD_OPT_PEEK_EXPORT"
        case .startTLS: "NBD_OPT_STARTTLS"
        case .info: "NBD_OPT_INFO"
        case .go: "NBD_OPT_GO"
        case .structuredReply: "NBD_OPT_STRUCTURED_REPLY"
        case .listMetaContext: "NBD_OPT_LIST_META_CONTEXT"
        case .setMetaContext: "NBD_OPT_SET_META_CONTEXT"
        case .extendedHeaders: "NBD_OPT_EXTENDED_HEADERS"
        default: "NBD_OPT_\(rawValue)"
        }
    }
}

/// Option reply types; the error ones have bit 31 set.
public struct OptionReplyType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ack = OptionReplyType(rawValue: 1)
    public static let server = OptionReplyType(rawValue: 2)
    public static let info = OptionReplyType(rawValue: 3)
    public static let metaContext = OptionReplyType(rawValue: 4)
    public static let errUnsupported = OptionReplyType(rawValue: 1 << 31 | 1)
    public static let errPolicy = OptionReplyType(rawValue: 1 << 31 | 2)
    public static let errInvalid = OptionReplyType(rawValue: 1 << 31 | 3)
    public static let errPlatform = OptionReplyType(rawValue: 1 << 31 | 4)
    public static let errTLSRequired = OptionReplyType(rawValue: 1 << 31 | 5)
    public static let errUnknown = OptionReplyType(rawValue: 1 << 31 | 6)
    public static let errShutdown = OptionReplyType(rawValue: 1 << 31 | 7)
    public static let errBlockSizeRequired = OptionReplyType(rawValue: 1 << 31 | 8)
    public static let errTooBig = OptionReplyType(rawValue: 1 << 31 | 9)
    public static let errExtendedHeadersRequired = OptionReplyType(rawValue: 1 << 31 | 10)
    public var isError: Bool { rawValue & (1 << 31) != 0 }
}

/// Information types in NBD_OPT_INFO / NBD_OPT_GO.
public struct InfoType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let export = InfoType(rawValue: 0)
    public static let name = InfoType(rawValue: 1)
    public static let description = InfoType(rawValue: 2)
    public static let blockSize = InfoType(rawValue: 3)
}

/// Transmission commands. Unknown types are kept so the server answers EINVAL.
public struct Command: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let read = Command(rawValue: 0)
    public static let write = Command(rawValue: 1)
    public static let disconnect = Command(rawValue: 2)
    public static let flush = Command(rawValue: 3)
    public static let trim = Command(rawValue: 4)
    public static let cache = Command(rawValue: 5)
    public static let writeZeroes = Command(rawValue: 6)
    public static let blockStatus = Command(rawValue: 7)
    public static let resize = Command(rawValue: 8)

    /// Whether the request header is followed by `length` bytes of payload.
    public var hasPayload: Bool { self == .write }

    /// Whether the command changes the export's contents.
    public var modifiesData: Bool { self == .write || self == .trim || self == .writeZeroes || self == .resize }

    public var description: String {
        switch self {
        case .read: "NBD_CMD_READ"
        case .write: "NBD_CMD_WRITE"
        case .disconnect: "NBD_CMD_DISC"
        case .flush: "NBD_CMD_FLUSH"
        case .trim: "NBD_CMD_TRIM"
        case .cache: "NBD_CMD_CACHE"
        case .writeZeroes: "NBD_CMD_WRITE_ZEROES"
        case .blockStatus: "NBD_CMD_BLOCK_STATUS"
        case .resize: "NBD_CMD_RESIZE"
        default: "NBD_CMD_\(rawValue)"
        }
    }
}

public struct CommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = CommandFlags(rawValue: 1 << 0)
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    public static let dontFragment = CommandFlags(rawValue: 1 << 2)
    public static let requestOne = CommandFlags(rawValue: 1 << 3)
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    public static let payloadLength = CommandFlags(rawValue: 1 << 5)
}

/// Error values on the wire; they are not the host's errno values.
public struct NBDError: RawRepresentable, Hashable, Sendable, Error, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ok = NBDError(rawValue: 0)
    public static let permission = NBDError(rawValue: 1)
    public static let io = NBDError(rawValue: 5)
    public static let noMemory = NBDError(rawValue: 12)
    public static let invalid = NBDError(rawValue: 22)
    public static let noSpace = NBDError(rawValue: 28)
    public static let overflow = NBDError(rawValue: 75)
    public static let notSupported = NBDError(rawValue: 95)
    public static let shutdown = NBDError(rawValue: 108)

    public var description: String {
        switch self {
        case .ok: "success"
        case .permission: "EPERM"
        case .io: "EIO"
        case .noMemory: "ENOMEM"
        case .invalid: "EINVAL"
        case .noSpace: "ENOSPC"
        case .overflow: "EOVERFLOW"
        case .notSupported: "ENOTSUP"
        case .shutdown: "ESHUTDOWN"
        default: "error \(rawValue)"
        }
    }
}

/// Structured reply chunk types.
public struct ChunkType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let none = ChunkType(rawValue: 0)
    public static let offsetData = ChunkType(rawValue: 1)
    public static let offsetHole = ChunkType(rawValue: 2)
    public static let blockStatus = ChunkType(rawValue: 5)
    public static let blockStatusExt = ChunkType(rawValue: 6)
    public static let error = ChunkType(rawValue: 1 << 15 | 1)
    public static let errorOffset = ChunkType(rawValue: 1 << 15 | 2)
}

public struct ChunkFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let done = ChunkFlags(rawValue: 1 << 0)
}

/// Flags of a `base:allocation` block status descriptor.
public struct AllocationFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = AllocationFlags(rawValue: 1 << 0)
    public static let zero = AllocationFlags(rawValue: 1 << 1)
}

/// Limits this implementation holds the peer to.
public enum Limits {
    /// Longest string the spec lets a peer send (names, descriptions, queries).
    public static let maxString = 4096
    /// Largest option payload accepted; room for a name plus many queries.
    public static let maxOptionLength: UInt32 = 64 * 1024
    /// How many options one client may send before it is dropped.
    public static let maxOptions = 256
    /// Largest READ or WRITE payload, advertised as the maximum block size.
    public static let maxPayload: UInt32 = 32 * 1024 * 1024
}
