import Logging
import NBDProtocol
import SystemIO
import TLS

/// The negotiation phase on a socket: the I/O around the pure `Negotiation`,
/// including the TLS upgrade. Runs on the connection's own thread; the whole
/// exchange, TLS handshake included, is bounded by one deadline, so a client
/// trickling options or stalling mid-handshake can't hold a slot longer than
/// a silent one.
struct Handshake {
    enum Failure: Error {
        case timedOut
        /// The client broke the protocol.
        case refused(String)
        /// The client may not come in: no TLS where it is required, a failed
        /// TLS handshake, an identity not on the allow-list.
        case denied(String)
        /// The client ended negotiation itself with NBD_OPT_ABORT.
        case aborted(String)
    }

    let socket: Socket
    let exports: [Export]
    let tls: TLSConfiguration
    let logger: Logger
    /// Nanoseconds on `MonotonicClock`, or nil for no limit.
    let deadline: UInt64?

    /// Negotiates until the client enters transmission; returns what was
    /// agreed. The reader's transport is then the one to use (TLS if started).
    func run(_ reader: inout SocketReader) throws -> Session {
        try armTimeout()
        try send(encodeGreeting(flags: [.fixedNewstyle, .noZeroes]), on: reader.transport)
        var flagBytes = UInt32(0)
        try withUnsafeMutableBytes(of: &flagBytes) { try reader.readExactly(into: $0) }
        let clientFlags: ClientFlags
        do {
            clientFlags = try ClientFlags.decode(UInt32(bigEndian: flagBytes))
        } catch {
            throw Failure.refused("\(error)")
        }
        var negotiation = Negotiation(exports: exports, clientFlags: clientFlags, tls: tls.mode)
        do {
            return try negotiate(&negotiation, &reader)
        } catch Failure.refused(let why) where negotiation.refusedWithoutTLS {
            throw Failure.denied("TLS is required; the client did not start it (\(why))")
        } catch Failure.aborted(let why) where negotiation.refusedWithoutTLS {
            throw Failure.denied("TLS is required; the client did not start it (\(why))")
        } catch SocketReader.Failure.closed where negotiation.refusedWithoutTLS {
            throw Failure.denied("TLS is required; the client did not start it")
        }
    }

    private func negotiate(_ negotiation: inout Negotiation, _ reader: inout SocketReader) throws -> Session {
        var header = [UInt8](repeating: 0, count: OptionHeader.wireSize)
        while true {
            try armTimeout()
            try header.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
            let option: OptionHeader
            do {
                option = try header.withUnsafeBytes { raw throws(ProtocolError) in
                    var r = WireReader(raw)
                    return try OptionHeader.decode(&r)!
                }
            } catch {
                throw Failure.refused("bad option header: \(error)")
            }
            var payload = [UInt8](repeating: 0, count: Int(option.length))
            try payload.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
            logger.trace("Option", metadata: ["nbd.option": "\(option.option)", "nbd.length": "\(option.length)"])
            switch payload.withUnsafeBytes({ negotiation.received(option.option, payload: $0) }) {
            case .reply(let replies):
                try send(replies, on: reader.transport)
            case .transmit(let replies, let agreed):
                try send(replies, on: reader.transport)
                return entered(agreed)
            case .transmitAfterExportName(let bytes, let agreed):
                try send(bytes, on: reader.transport)
                return entered(agreed)
            case .close(let replies, let reason):
                try? send(replies, on: reader.transport)
                throw option.option == .abort ? Failure.aborted(reason) : Failure.refused(reason)
            case .startTLS(let replies):
                try send(replies, on: reader.transport)
                // Plaintext sent after STARTTLS, before its reply, must not pass for TLS data.
                guard !reader.hasBufferedBytes else { throw Failure.refused("client sent data right after STARTTLS") }
                reader.switchTransport(to: .tls(try startTLS()))
                negotiation.tlsStarted()
            }
        }
    }

    /// Runs the TLS handshake on the socket and checks who the client is.
    private func startTLS() throws -> TLSSession {
        guard let credentials = tls.credentials else { preconditionFailure("STARTTLS accepted without credentials") }
        let session: TLSSession
        do {
            session = try TLSSession(credentials: credentials, fd: socket.rawValue)
            try session.handshake()
        } catch {
            if error.isTimeout { throw Failure.timedOut }
            throw Failure.denied("TLS handshake failed: \(error)")
        }
        let identities = session.peerIdentities
        if let allowed = tls.allowedIdentities {
            guard identities.contains(where: allowed.contains) else {
                session.close()
                throw Failure.denied("identity \(identities.first.map { "'\($0)'" } ?? "(none)") is not on the allow-list")
            }
        }
        logger.debug("TLS started", metadata: ["nbd.tls.identity": "\(identities.first ?? "")"])
        return session
    }

    private func entered(_ session: Session) -> Session {
        socket.setReceiveTimeout(seconds: nil)
        socket.setSendTimeout(seconds: nil)
        return session
    }

    private func armTimeout() throws {
        guard let deadline else { return }
        let now = MonotonicClock.now()
        guard now < deadline else { throw Failure.timedOut }
        let left = Double(deadline - now) / 1e9
        socket.setReceiveTimeout(seconds: left)
        socket.setSendTimeout(seconds: left)
    }

    private func send(_ replies: [OptionReply], on transport: Transport) throws {
        var w = WireWriter()
        for r in replies { r.encode(into: &w) }
        try send(w.bytes, on: transport)
    }

    private func send(_ bytes: [UInt8], on transport: Transport) throws {
        let sent = bytes.withUnsafeBytes { raw in Result { () throws(Transport.Failure) in try transport.sendAll(raw) } }
        if case .failure(let error) = sent {
            throw error.isTimeout ? Failure.timedOut : error
        }
    }
}
