import Foundation
import NBDProtocol
import SystemIO

/// A hand-driven NBD client over a plain socket, for sending what no real
/// client would: malformed handshakes, oversized requests, exact flags.
///
/// Connecting is one attempt, no retry, so `try RawClient(port:)` also checks that a server
/// accepts connections now. The socket is closed when the client is released; a test that
/// holds a connection open while it does other things keeps it with `withExtendedLifetime`.
public final class RawClient {
    public let socket: Socket
    /// How long one read waits for the server.
    public let timeout: Double

    public convenience init(port: Int, timeout: Double = 10) throws {
        self.init(socket: try Socket.connectTCP(host: "127.0.0.1", port: port), timeout: timeout)
    }

    /// Drives an already connected socket (one end of a socket pair), which it then owns.
    public init(socket: Socket, timeout: Double = 10) {
        self.socket = socket
        self.timeout = timeout
        socket.setReceiveTimeout(seconds: timeout)
    }

    deinit { socket.close() }

    public func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try socket.writeAll($0) }
    }

    /// Exactly `count` bytes, or nil if the server closed first.
    public func receive(_ count: Int) throws -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        while filled < count {
            let n = try bytes.withUnsafeMutableBytes {
                try socket.readSome(into: UnsafeMutableRawBufferPointer(rebasing: $0[filled...]))
            }
            if n == 0 { return nil }
            filled += n
        }
        return bytes
    }

    /// True when the server closes the connection (reads end of file) within the receive timeout;
    /// what it sends before that is discarded.
    public func serverClosed() -> Bool {
        readUntilClosed(timeout: .milliseconds(Int64(timeout * 1000))).closed
    }

    /// Reads until the server closes the connection or `timeout` passes. Returns the bytes read
    /// and whether the server closed (end of file, or a reset) in time.
    public func readUntilClosed(timeout: Duration) -> (bytes: [UInt8], closed: Bool) {
        let deadline = ContinuousClock.now + timeout
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let left = deadline - ContinuousClock.now
            if left <= .zero { return (received, false) }
            var poller = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            let millis = left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000 + 1
            if poll(&poller, 1, Int32(min(millis, 60_000))) <= 0 { continue }  // EINTR or not yet
            do {
                let n = try chunk.withUnsafeMutableBytes { try socket.readSome(into: $0) }
                if n == 0 { return (received, true) }
                received += chunk[0..<n]
            } catch {
                if let errno = error as? Errno, errno.code == EAGAIN { continue }
                return (received, true)  // ECONNRESET and the like: closed too
            }
        }
    }

    /// Reads the greeting and answers with `clientFlags`.
    @discardableResult
    public func greet(clientFlags: UInt32 = 3) throws -> [UInt8] {
        guard let greeting = try receive(18) else { throw ToolError(command: "greeting", status: -1, stderr: "closed") }
        var w = WireWriter()
        w.write(clientFlags)
        try send(w.bytes)
        return greeting
    }

    public func sendOption(_ option: OptionCode, _ payload: [UInt8] = []) throws {
        var w = WireWriter()
        OptionHeader(option: option, length: UInt32(payload.count)).encode(into: &w)
        w.write(payload)
        try send(w.bytes)
    }

    public func receiveOptionReply() throws -> OptionReply? {
        guard let head = try receive(20) else { return nil }
        let length = Int(UInt32(bigEndian: head[16..<20].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }))
        guard let payload = try receive(length) else { return nil }
        let all = head + payload
        return try all.withUnsafeBytes { raw in
            var r = WireReader(raw)
            return try OptionReply.decode(&r)
        }
    }

    /// Replies to one option, up to and including the ACK or an error.
    public func receiveOptionReplies() throws -> [OptionReply] {
        var replies: [OptionReply] = []
        while let reply = try receiveOptionReply() {
            replies.append(reply)
            if reply.type == .ack || reply.type.isError { break }
        }
        return replies
    }

    /// Negotiates into transmission with NBD_OPT_GO; returns the transmission flags.
    public func go(structuredReplies: Bool = false, extendedHeaders: Bool = false,
                   metaContexts: [String] = []) throws -> TransmissionFlags {
        try greet()
        if structuredReplies {
            try sendOption(.structuredReply)
            _ = try receiveOptionReplies()
        }
        if extendedHeaders {
            try sendOption(.extendedHeaders)
            guard try receiveOptionReplies().last?.type == .ack else {
                throw ToolError(command: "NBD_OPT_EXTENDED_HEADERS", status: -1, stderr: "refused")
            }
        }
        if !metaContexts.isEmpty {
            var w = WireWriter()
            MetaContextRequest(exportName: "", queries: metaContexts).encode(into: &w)
            try sendOption(.setMetaContext, w.bytes)
            _ = try receiveOptionReplies()
        }
        var w = WireWriter()
        InfoRequest(exportName: "", requests: []).encode(into: &w)
        try sendOption(.go, w.bytes)
        let replies = try receiveOptionReplies()
        guard replies.last?.type == .ack,
              let export = replies.first(where: { $0.type == .info && $0.payload.prefix(2) == [0, 0] })
        else { throw ToolError(command: "NBD_OPT_GO", status: -1, stderr: "\(replies)") }
        return TransmissionFlags(rawValue: UInt16(export.payload[10]) << 8 | UInt16(export.payload[11]))
    }

    public func sendRequest(_ request: Request, payload: [UInt8] = [], extended: Bool = false) throws {
        var w = WireWriter()
        request.encode(into: &w, extended: extended)
        w.write(payload)
        try send(w.bytes)
    }

    /// A simple reply's error and cookie.
    public func receiveSimpleReply() throws -> (error: NBDError, cookie: UInt64)? {
        guard let bytes = try receive(16) else { return nil }
        let magic = bytes[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        guard magic == Magic.simpleReply else { throw ToolError(command: "reply", status: -1, stderr: "bad magic") }
        let error = bytes[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let cookie = bytes[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return (NBDError(rawValue: error), cookie)
    }

    public struct Chunk {
        public var flags: UInt16
        public var type: ChunkType
        public var cookie: UInt64
        public var payload: [UInt8]
        /// The request's offset, repeated by extended reply headers.
        public var offset: UInt64? = nil
    }

    /// One extended reply chunk (32-byte header); throws on any other magic.
    public func receiveExtendedChunk() throws -> Chunk? {
        guard let head = try receive(32) else { return nil }
        let be = { (range: Range<Int>) in head[range].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        guard be(0..<4) == UInt64(Magic.extendedReply) else {
            throw ToolError(command: "extended chunk", status: -1, stderr: "magic 0x\(String(be(0..<4), radix: 16))")
        }
        guard be(24..<32) < 64 << 20, let payload = try receive(Int(be(24..<32))) else { return nil }
        return Chunk(flags: UInt16(be(4..<6)), type: ChunkType(rawValue: UInt16(be(6..<8))), cookie: be(8..<16),
                     payload: payload, offset: be(16..<24))
    }

    public func receiveChunk() throws -> Chunk? {
        guard let head = try receive(20) else { return nil }
        let be = { (range: Range<Int>) in head[range].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        guard be(0..<4) == UInt64(Magic.structuredReply) else {
            throw ToolError(command: "chunk", status: -1, stderr: "bad magic")
        }
        guard let payload = try receive(Int(be(16..<20))) else { return nil }
        return Chunk(flags: UInt16(be(4..<6)), type: ChunkType(rawValue: UInt16(be(6..<8))), cookie: be(8..<16),
                     payload: payload)
    }
}
