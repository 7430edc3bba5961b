import BlockDevice
import NBDProtocol

/// What the client and server agreed on during negotiation.
public struct Session: Sendable, Equatable {
    /// Replies may be chunks (NBD_OPT_STRUCTURED_REPLY, or implied by extended headers).
    public var structuredReplies = false
    /// 32-byte requests and replies with 64-bit lengths (NBD_OPT_EXTENDED_HEADERS).
    public var extendedHeaders = false
    /// Contexts selected by the last NBD_OPT_SET_META_CONTEXT for the export.
    public var metaContexts: [MetaContext] = []
    public var flags: TransmissionFlags = []
    /// Which of the server's exports the client chose.
    public var exportIndex = 0
}

/// Whether TLS is offered, and whether it is a must (qemu-nbd's `--tls-creds`
/// makes it one; nbdkit's `--tls=on|require`).
public enum TLSMode: String, Sendable, CaseIterable {
    /// NBD_OPT_STARTTLS is refused (NOTLS in the spec).
    case off
    /// Clients may start TLS or stay in plaintext (SELECTIVETLS with no TLS-only export).
    case on
    /// Every option but STARTTLS and ABORT is refused until TLS runs (FORCEDTLS).
    case require
}

/// The fixed newstyle option haggling, as a pure state machine: the
/// connection feeds it each option and performs the action it returns.
public struct Negotiation {
    public enum Action: Equatable {
        /// Send these replies and wait for the next option.
        case reply([OptionReply])
        /// Send the replies (NBD_OPT_GO), then enter transmission.
        case transmit([OptionReply], Session)
        /// Send these raw bytes (NBD_OPT_EXPORT_NAME), then enter transmission.
        case transmitAfterExportName([UInt8], Session)
        /// Send the replies, if any, then close the connection.
        case close([OptionReply], reason: String)
        /// Send the replies (the ACK to NBD_OPT_STARTTLS), run the TLS
        /// handshake, then call `tlsStarted()` and go on negotiating over TLS.
        case startTLS([OptionReply])
    }

    /// The server's exports; the first is also the default (the empty name).
    let exports: [Export]
    let noZeroes: Bool
    /// Without NBD_FLAG_C_FIXED_NEWSTYLE, NBD_OPT_EXPORT_NAME is the only option there is.
    let fixedNewstyle: Bool
    private(set) var session = Session()
    /// The export name the last NBD_OPT_SET_META_CONTEXT chose contexts for.
    private var metaContextsFor: String?
    private var optionCount = 0
    let tls: TLSMode
    /// TLS has been started on this connection.
    public private(set) var tlsActive = false
    /// The client was told TLS is required (or asked for the export in plaintext) and hasn't started it.
    public private(set) var refusedWithoutTLS = false

    public init(exports: [Export], clientFlags: ClientFlags, tls: TLSMode = .off) {
        precondition(!exports.isEmpty, "a server needs an export")
        self.exports = exports
        self.tls = tls
        noZeroes = clientFlags.contains(.noZeroes)
        fixedNewstyle = clientFlags.contains(.fixedNewstyle)
    }

    /// TLS is up: everything agreed before it is forgotten (spec: NBD_OPT_STARTTLS),
    /// since a man in the middle could have chosen it.
    public mutating func tlsStarted() {
        tlsActive = true
        refusedWithoutTLS = false
        session = Session()
        metaContextsFor = nil
    }

    public mutating func received(_ option: OptionCode, payload: UnsafeRawBufferPointer) -> Action {
        optionCount += 1
        guard optionCount <= Limits.maxOptions else {
            return .close([], reason: "more than \(Limits.maxOptions) options")
        }
        guard fixedNewstyle || option == .exportName else {
            // Such a client can't read option replies: the spec leaves only a disconnect, as qemu-nbd does.
            return .close([], reason: "client without fixed newstyle sent \(option)")
        }
        if tls == .require && !tlsActive && option != .startTLS && option != .abort {
            refusedWithoutTLS = true
            // NBD_OPT_EXPORT_NAME can't be answered with an error; the spec leaves only a disconnect.
            if option == .exportName { return .close([], reason: "client asked for the export without TLS") }
            // INFO and GO are refused too, so nothing about the export leaks before TLS.
            return .reply([.error(option, .errTLSRequired, "TLS is required")])
        }
        switch option {
        case .startTLS: return startTLS(payload)
        case .exportName: return exportName(payload)
        case .abort: return .close([.ack(option)], reason: "client sent NBD_OPT_ABORT")
        case .list: return list(payload)
        case .info, .go: return infoOrGo(option, payload)
        case .structuredReply: return structuredReply(payload)
        case .extendedHeaders: return extendedHeaders(payload)
        case .listMetaContext, .setMetaContext: return metaContext(option, payload)
        default:
            return .reply([.error(option, .errUnsupported, "\(option) is not supported")])
        }
    }

    // MARK: - One method per option

    private func startTLS(_ payload: UnsafeRawBufferPointer) -> Action {
        // qemu-nbd answers ERR_POLICY when it has no credentials.
        guard tls != .off else { return .reply([.error(.startTLS, .errPolicy, "TLS is not configured")]) }
        guard payload.isEmpty else {
            return .reply([.error(.startTLS, .errInvalid, "NBD_OPT_STARTTLS takes no data")])
        }
        guard !tlsActive else { return .reply([.error(.startTLS, .errInvalid, "TLS is already active")]) }
        return .startTLS([.ack(.startTLS)])
    }

    private mutating func exportName(_ payload: UnsafeRawBufferPointer) -> Action {
        guard !session.extendedHeaders else {
            // The spec forbids it after extended headers, and this option can't carry an error.
            return .close([], reason: "NBD_OPT_EXPORT_NAME after extended headers")
        }
        // No error reply is possible here: a wrong name can only be a hard disconnect.
        guard let name = String(validating: payload, as: UTF8.self), let index = index(of: name) else {
            return .close([], reason: "client asked for an unknown export")
        }
        finishSession(exportIndex: index, name: name)
        return .transmitAfterExportName(
            encodeExportNameReply(size: exports[index].device.size, flags: session.flags, noZeroes: noZeroes),
            session)
    }

    private func list(_ payload: UnsafeRawBufferPointer) -> Action {
        guard payload.isEmpty else { return .reply([.error(.list, .errInvalid, "NBD_OPT_LIST takes no data")]) }
        return .reply(exports.map { .server(name: $0.name, description: $0.description) } + [.ack(.list)])
    }

    private mutating func structuredReply(_ payload: UnsafeRawBufferPointer) -> Action {
        guard payload.isEmpty else {
            return .reply([.error(.structuredReply, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")])
        }
        guard !session.extendedHeaders else {
            return .reply([.error(.structuredReply, .errExtendedHeadersRequired,
                                  "extended headers were negotiated and take precedence")])
        }
        session.structuredReplies = true
        return .reply([.ack(.structuredReply)])
    }

    private mutating func extendedHeaders(_ payload: UnsafeRawBufferPointer) -> Action {
        guard payload.isEmpty else {
            return .reply([.error(.extendedHeaders, .errInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")])
        }
        guard !session.extendedHeaders else {
            return .reply([.error(.extendedHeaders, .errInvalid, "extended headers were already negotiated")])
        }
        session.extendedHeaders = true
        session.structuredReplies = true
        return .reply([.ack(.extendedHeaders)])
    }

    /// An export by the name a client asked for: an exact match, or for the empty name the default.
    func index(of name: String) -> Int? {
        exports.firstIndex { $0.name == name } ?? (name.isEmpty ? 0 : nil)
    }

    /// The export's flags as this session would see them.
    private func transmissionFlags(_ export: Export, metaContexts: [MetaContext]) -> TransmissionFlags {
        var flags = TransmissionFlags(capabilities: export.device.capabilities, readOnly: export.readOnly,
                                      multiConn: export.allowMultiConn, structuredReplies: session.structuredReplies)
        // The payload form of BLOCK_STATUS exists only with extended headers and contexts to choose from.
        if session.extendedHeaders && !metaContexts.isEmpty { flags.insert(.blockStatusPayload) }
        return flags
    }

    private mutating func infoOrGo(_ option: OptionCode, _ payload: UnsafeRawBufferPointer) -> Action {
        let request: InfoRequest
        do {
            request = try InfoRequest.decode(payload, option: option)
        } catch {
            return .reply([.error(option, .errInvalid, error.description)])
        }
        guard let index = index(of: request.exportName) else {
            return .reply([.error(option, .errUnknown, "export '\(request.exportName)' not available")])
        }
        let export = exports[index]
        let contexts = metaContextsFor == request.exportName ? session.metaContexts : []
        let flags = transmissionFlags(export, metaContexts: contexts)
        var replies: [OptionReply] = [.infoExport(option, size: export.device.size, flags: flags)]
        // NBD_INFO_EXPORT is always sent; the others only when asked for.
        for info in Set(request.requests.map(\.rawValue)).sorted() {
            switch InfoType(rawValue: info) {
            case .name: replies.append(.infoName(option, export.name))
            case .description: replies.append(.infoDescription(option, export.description))
            case .blockSize:
                replies.append(.infoBlockSize(option, minimum: 1,
                                              preferred: max(512, export.device.capabilities.preferredBlockSize),
                                              maximum: Limits.maxPayload))
            default: break
            }
        }
        replies.append(.ack(option))
        guard option == .go else { return .reply(replies) }
        finishSession(exportIndex: index, name: request.exportName)
        return .transmit(replies, session)
    }

    private mutating func finishSession(exportIndex: Int, name: String) {
        // Contexts chosen for another export name don't carry over (spec: NBD_OPT_SET_META_CONTEXT).
        if metaContextsFor != name || !session.structuredReplies { session.metaContexts = [] }
        session.exportIndex = exportIndex
        session.flags = transmissionFlags(exports[exportIndex], metaContexts: session.metaContexts)
    }

    private mutating func metaContext(_ option: OptionCode, _ payload: UnsafeRawBufferPointer) -> Action {
        let request: MetaContextRequest
        do {
            request = try MetaContextRequest.decode(payload, option: option)
        } catch {
            return .reply([.error(option, .errInvalid, error.description)])
        }
        let setting = option == .setMetaContext
        if setting {
            session.metaContexts = []  // replaced even when this option fails
            guard session.structuredReplies else {
                return .reply([.error(option, .errInvalid, "structured replies were not negotiated")])
            }
        }
        guard let index = index(of: request.exportName) else {
            return .reply([.error(option, .errUnknown, "export '\(request.exportName)' not available")])
        }
        let offered = exports[index].metaContexts
        var matched: [MetaContext] = []
        if request.queries.isEmpty {
            if !setting { matched = offered }
        } else {
            for query in request.queries {
                for context in offered where Self.query(query, selects: context, wildcard: !setting)
                    && !matched.contains(context) {
                    matched.append(context)
                }
            }
        }
        if setting {
            session.metaContexts = matched
            metaContextsFor = request.exportName
        }
        return .reply(matched.map { .metaContext(option, id: setting ? $0.rawValue : 0, name: $0.name) } + [.ack(option)])
    }

    /// Exact names select; a bare namespace ("base:") lists that namespace.
    static func query(_ query: String, selects context: MetaContext, wildcard: Bool) -> Bool {
        if query == context.name { return true }
        guard wildcard, query.hasSuffix(":") else { return false }
        return context.name.hasPrefix(query)
    }
}
