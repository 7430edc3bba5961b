import Logging
import NBDProtocol
import SystemIO

/// The negotiation phase on a socket: the I/O around the pure `Negotiation`.
/// Runs on the connection's own thread; the whole exchange is bounded by
/// one deadline, so a client trickling options can't hold a slot longer
/// than a silent one.
struct Handshake {
    enum Failure: Error {
        case timedOut
        case refused(String)
        /// The client ended negotiation itself with NBD_OPT_ABORT.
        case aborted(String)
    }

    let socket: Socket
    let export: Export
    let logger: Logger
    /// Nanoseconds on `MonotonicClock`, or nil for no limit.
    let deadline: UInt64?

    /// Negotiates until the client enters transmission; returns what was agreed.
    func run(_ reader: inout SocketReader) throws -> Session {
        try armTimeout()
        try send(encodeGreeting(flags: [.fixedNewstyle, .noZeroes]))
        var flagBytes = UInt32(0)
        try withUnsafeMutableBytes(of: &flagBytes) { try reader.readExactly(into: $0) }
        let clientFlags: ClientFlags
        do {
            clientFlags = try ClientFlags.decode(UInt32(bigEndian: flagBytes))
        } catch {
            throw Failure.refused("\(error)")
        }
        var negotiation = Negotiation(export: export, clientFlags: clientFlags)
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
                try send(replies)
            case .transmit(let replies, let agreed):
                try send(replies)
                return entered(agreed)
            case .transmitAfterExportName(let bytes, let agreed):
                try send(bytes)
                return entered(agreed)
            case .close(let replies, let reason):
                try? send(replies)
                throw option.option == .abort ? Failure.aborted(reason) : Failure.refused(reason)
            }
        }
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

    private func send(_ replies: [OptionReply]) throws {
        var w = WireWriter()
        for r in replies { r.encode(into: &w) }
        try send(w.bytes)
    }

    private func send(_ bytes: [UInt8]) throws {
        let sent = bytes.withUnsafeBytes { raw in Result { () throws(Errno) in try socket.writeAll(raw) } }
        if case .failure(let error) = sent {
            throw error == .wouldBlock ? Failure.timedOut : error
        }
    }
}
