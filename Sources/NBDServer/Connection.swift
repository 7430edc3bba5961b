import BlockDevice
import Dispatch
import Logging
import NBDProtocol
import Synchronization
import SystemIO

/// One client: negotiation, then the transmission loop. Requests are read
/// on the connection's own thread and run concurrently on the shared I/O
/// queue; replies go out under `sendLock` in whatever order they finish.
final class Connection: @unchecked Sendable {
    let socket: Socket
    let peer: String
    private let export: Export
    private var logger: Logger
    private let pool: BufferPool
    private let ioQueue: DispatchQueue
    private let handshakeTimeout: Double?

    private let sendLock = Lock()
    private let inFlight = DispatchGroup()
    /// Bounds requests in flight per connection, and so the memory a client can pin.
    private let slots = DispatchSemaphore(value: 64)
    private let largeSlots = DispatchSemaphore(value: 8)
    private static let largeRequest: UInt32 = 1 << 20

    let bytesRead = Atomic<UInt64>(0)
    let bytesWritten = Atomic<UInt64>(0)
    private var session = Session()

    init(socket: Socket, peer: String, id: Int, export: Export, pool: BufferPool, ioQueue: DispatchQueue,
         handshakeTimeout: Double?, logger: Logger) {
        self.socket = socket
        self.peer = peer
        self.export = export
        self.pool = pool
        self.ioQueue = ioQueue
        self.handshakeTimeout = handshakeTimeout
        self.logger = logger
        self.logger[metadataKey: "nbd.conn"] = "\(id)"
        self.logger[metadataKey: "nbd.peer"] = "\(peer)"
    }

    enum End: Error {
        case clientDone
        case violation(String)
    }

    /// Serves the client until it leaves; blocks the calling thread.
    func run() {
        var reader = SocketReader(socket: socket)
        let reason: String
        do {
            try negotiate(&reader)
            logger.debug("Transmission started", metadata: [
                "nbd.export": "\(export.name)", "nbd.structured": "\(session.structuredReplies)",
                "nbd.flags": "0x\(String(session.flags.rawValue, radix: 16))",
            ])
            try transmit(&reader)
            reason = "client disconnected"
        } catch End.clientDone {
            reason = "client disconnected"
        } catch End.violation(let why) {
            reason = why
        } catch SocketReader.Failure.closed(atBoundary: true) {
            reason = "client closed the connection"
        } catch SocketReader.Failure.closed(atBoundary: false) {
            reason = "client closed the connection mid-message"
        } catch SocketReader.Failure.system(let errno) {
            reason = errno == .wouldBlock ? "handshake timed out" : "read failed: \(errno)"
        } catch {
            reason = "\(error)"
        }
        // Everything already received is answered before the socket closes.
        inFlight.wait()
        socket.close()
        logger.info("Connection closed", metadata: [
            "nbd.reason": "\(reason)",
            "nbd.bytes_read": "\(bytesRead.load(ordering: .relaxed))",
            "nbd.bytes_written": "\(bytesWritten.load(ordering: .relaxed))",
        ])
    }

    // MARK: - Negotiation

    private func negotiate(_ reader: inout SocketReader) throws {
        // The timeout bounds the whole negotiation, so a client trickling
        // options can't hold a slot longer than a silent one.
        let deadline = handshakeTimeout.map { DispatchTime.now() + $0 }
        func armTimeout() throws {
            guard let deadline else { return }
            let left = Double(Int64(deadline.uptimeNanoseconds) - Int64(DispatchTime.now().uptimeNanoseconds)) / 1e9
            guard left > 0 else { throw End.violation("handshake timed out") }
            socket.setReceiveTimeout(seconds: left)
        }
        try armTimeout()
        try send(encodeGreeting(flags: [.fixedNewstyle, .noZeroes]))
        var flagBytes = (UInt32(0))
        try withUnsafeMutableBytes(of: &flagBytes) { try reader.readExactly(into: $0) }
        let clientFlags = UInt32(bigEndian: flagBytes)
        if let problem = Negotiation.validate(clientFlags: clientFlags) { throw End.violation(problem) }
        var negotiation = Negotiation(export: export, clientFlags: ClientFlags(rawValue: clientFlags))
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
                throw End.violation("bad option header: \(error)")
            }
            var payload = [UInt8](repeating: 0, count: Int(option.length))
            try payload.withUnsafeMutableBytes { try reader.readExactly(into: $0) }
            logger.trace("Option", metadata: ["nbd.option": "\(option.option)", "nbd.length": "\(option.length)"])
            let action = payload.withUnsafeBytes { negotiation.received(option.option, payload: $0) }
            switch action {
            case .reply(let replies):
                try send(replies)
            case .transmit(let replies, let agreed):
                try send(replies)
                session = agreed
                socket.setReceiveTimeout(seconds: nil)
                return
            case .transmitAfterExportName(let bytes, let agreed):
                try send(bytes)
                session = agreed
                socket.setReceiveTimeout(seconds: nil)
                return
            case .close(let replies, let reason):
                try? send(replies)
                throw End.violation(reason)
            }
        }
    }

    private func send(_ replies: [OptionReply]) throws {
        var w = WireWriter()
        for r in replies { r.encode(into: &w) }
        try send(w.bytes)
    }

    private func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in try sendLock.withLock { () throws(Errno) in try socket.writeAll(raw) } }
    }

    // MARK: - Transmission

    private func transmit(_ reader: inout SocketReader) throws {
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: Request.wireSize, alignment: 8)
        defer { header.deallocate() }
        while true {
            try reader.readExactly(into: header)
            var r = WireReader(UnsafeRawBufferPointer(header))
            let request: Request
            do {
                request = try Request.decode(&r)!
            } catch {
                throw End.violation("bad request: \(error)")
            }
            if request.command == .disconnect { throw End.clientDone }
            let invalid = validate(request, size: export.device.size, session: session)
            if request.command.hasPayload {
                if let (error, why) = invalid {
                    // The payload is on the wire either way; drain it to stay in sync.
                    try reader.skip(UInt64(request.length))
                    reject(request, error, why)
                    continue
                }
                let payload = pool.take(Int(request.length))
                do {
                    try reader.readExactly(into: payload)
                } catch {
                    pool.give(payload)
                    throw error
                }
                dispatch(request, payload: payload)
            } else if let (error, why) = invalid {
                reject(request, error, why)
            } else {
                dispatch(request, payload: nil)
            }
        }
    }

    private func reject(_ request: Request, _ error: NBDError, _ why: String) {
        logger.debug("Invalid request", metadata: [
            "nbd.cmd": "\(request.command)", "nbd.error": "\(error)", "nbd.reason": "\(why)",
        ])
        replyError(request, error, why)
    }

    private func dispatch(_ request: Request, payload: UnsafeMutableRawBufferPointer?) {
        let large = request.length >= Self.largeRequest && (request.command == .read || request.command == .write)
        slots.wait()
        if large { largeSlots.wait() }
        inFlight.enter()
        let owned = PayloadBuffer(bytes: payload)
        ioQueue.async { [self] in
            handle(request, payload: owned.bytes)
            if let payload = owned.bytes { pool.give(payload) }
            if large { largeSlots.signal() }
            slots.signal()
            inFlight.leave()
        }
    }

    private func handle(_ request: Request, payload: UnsafeMutableRawBufferPointer?) {
        logger.trace("Request", metadata: [
            "nbd.cmd": "\(request.command)", "nbd.offset": "\(request.offset)", "nbd.length": "\(request.length)",
        ])
        let device = export.device
        let fua = request.flags.contains(.fua)
        do throws(DeviceError) {
            switch request.command {
            case .read:
                try handleRead(request)
                return
            case .write:
                try device.write(UnsafeRawBufferPointer(payload!), at: request.offset, fua: fua)
                bytesWritten.add(UInt64(request.length), ordering: .relaxed)
            case .flush:
                try device.flush()
            case .trim:
                try device.trim(at: request.offset, length: UInt64(request.length), fua: fua)
            case .writeZeroes:
                try device.writeZeroes(at: request.offset, length: UInt64(request.length),
                                       mayDeallocate: !request.flags.contains(.noHole),
                                       fast: request.flags.contains(.fastZero), fua: fua)
            case .cache:
                try device.cache(at: request.offset, length: UInt64(request.length))
            case .blockStatus:
                try handleBlockStatus(request)
                return
            default:
                preconditionFailure("validated request with command \(request.command)")
            }
            replySimple(cookie: request.cookie, error: .ok)
        } catch {
            logger.debug("Request failed", metadata: ["nbd.cmd": "\(request.command)", "nbd.reason": "\(error)"])
            replyError(request, nbdError(for: error), error.reason)
        }
    }

    private func handleRead(_ request: Request) throws(DeviceError) {
        let data = pool.take(Int(request.length))
        defer { pool.give(data) }
        try export.device.read(into: data, at: request.offset)
        bytesRead.add(UInt64(request.length), ordering: .relaxed)
        withUnsafeTemporaryAllocation(byteCount: 32, alignment: 8) { header in
            if !session.structuredReplies {
                ReplyHeader.writeSimple(header, error: .ok, cookie: request.cookie)
                sendReply(UnsafeRawBufferPointer(rebasing: header[..<ReplyHeader.simpleSize]),
                          UnsafeRawBufferPointer(data))
            } else if isAllZero(UnsafeRawBufferPointer(data)) {
                // A hole chunk tells the client it reads as zeros, without sending them.
                let n = ReplyHeader.writeOffsetHole(header, flags: .done, cookie: request.cookie,
                                                    offset: request.offset, holeLength: request.length)
                sendReply(UnsafeRawBufferPointer(rebasing: header[..<n]), UnsafeRawBufferPointer(start: nil, count: 0))
            } else {
                let n = ReplyHeader.writeOffsetData(header, flags: .done, cookie: request.cookie,
                                                    offset: request.offset, dataLength: request.length)
                sendReply(UnsafeRawBufferPointer(rebasing: header[..<n]), UnsafeRawBufferPointer(data))
            }
        }
    }

    private func handleBlockStatus(_ request: Request) throws(DeviceError) {
        let device = export.device
        let length = UInt64(request.length)
        let one = request.flags.contains(.requestOne)
        var chunks: [[UInt8]] = []
        for (index, context) in session.metaContexts.enumerated() {
            var descriptors: [BlockStatusDescriptor]
            switch context {
            case .baseAllocation:
                descriptors = try device.extents(at: request.offset, length: length).map {
                    var flags: AllocationFlags = []
                    if $0.flags.contains(.hole) { flags.insert(.hole) }
                    if $0.flags.contains(.zero) { flags.insert(.zero) }
                    return BlockStatusDescriptor(length: UInt32(min($0.length, length)), flags: flags.rawValue)
                }
            case .allocationDepth:
                descriptors = try device.allocationDepth(at: request.offset, length: length).map {
                    BlockStatusDescriptor(length: UInt32(min($0.length, length)), flags: $0.depth)
                }
            }
            descriptors = clip(descriptors, to: request.length)
            if one { descriptors = Array(descriptors.prefix(1)) }
            guard !descriptors.isEmpty else { throw DeviceError(.io, "device reported no extents") }
            chunks.append(encodeBlockStatusChunk(cookie: request.cookie, final: index == session.metaContexts.count - 1,
                                                 contextID: context.rawValue, descriptors: descriptors))
        }
        let buffers = chunks.map { $0.withUnsafeBytes { $0 } }
        withExtendedLifetime(chunks) { sendReply(buffers) }
    }

    /// Descriptors must not run past the requested length (spec: BLOCK_STATUS).
    private func clip(_ descriptors: [BlockStatusDescriptor], to length: UInt32) -> [BlockStatusDescriptor] {
        var left = length
        var result: [BlockStatusDescriptor] = []
        for var d in descriptors where left > 0 && d.length > 0 {
            d.length = min(d.length, left)
            left -= d.length
            result.append(d)
        }
        return result
    }

    // MARK: - Replies

    private func replySimple(cookie: UInt64, error: NBDError) {
        withUnsafeTemporaryAllocation(byteCount: ReplyHeader.simpleSize, alignment: 8) { header in
            ReplyHeader.writeSimple(header, error: error, cookie: cookie)
            sendReply(UnsafeRawBufferPointer(header), UnsafeRawBufferPointer(start: nil, count: 0))
        }
    }

    /// Reads and block status errors carry a message when structured replies are on.
    private func replyError(_ request: Request, _ error: NBDError, _ message: String) {
        if session.structuredReplies && (request.command == .read || request.command == .blockStatus) {
            let chunk = encodeErrorChunk(cookie: request.cookie, error: error, message: message)
            chunk.withUnsafeBytes { sendReply([$0]) }
        } else {
            replySimple(cookie: request.cookie, error: error)
        }
    }

    /// Sends one whole reply; a failure means the client is gone, and the
    /// reading side will notice and end the connection.
    private func sendReply(_ buffers: [UnsafeRawBufferPointer]) {
        sending { () throws(Errno) in try socket.writeAll(buffers) }
    }

    private func sendReply(_ header: UnsafeRawBufferPointer, _ data: UnsafeRawBufferPointer) {
        sending { () throws(Errno) in try socket.writeAll(header, data) }
    }

    private func sending(_ write: () throws(Errno) -> Void) {
        do {
            try sendLock.withLock(write)
        } catch {
            logger.debug("Reply not sent", metadata: ["nbd.reason": "\(error)"])
            socket.shutdown()
        }
    }
}

/// A request's payload, owned by exactly one request at a time.
private struct PayloadBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer?
}
