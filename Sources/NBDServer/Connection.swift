import BlockDevice
import Logging
import NBDProtocol
import Synchronization
import SystemIO

/// Per-connection limits.
public struct ConnectionLimits: Sendable {
    /// Reply bytes a connection may have queued or in flight; at the cap it
    /// reads no more requests and TCP pushes back on the client. 4 MiB keeps
    /// 16 requests of 256 KiB going (nbdkit and qemu-nbd serve 16 at a time);
    /// nbdcopy over 4 connections peaked at 41-46 MiB of RSS with 64 MiB here
    /// and at 22 MiB with 4, at the same speed. A larger request runs alone.
    public var maxQueuedBytes: Int = 4 << 20

    public init(maxQueuedBytes: Int = 4 << 20) {
        self.maxQueuedBytes = maxQueuedBytes
    }
}

/// One client, from accept to close. Its own thread runs the handshake and
/// then the transmission reader; device threads run its requests
/// (`perform`); its `ReplyWriter` sends the replies. The connection owns its
/// socket: only it closes the descriptor, and shutdowns from other threads
/// go through it, so none can hit a number the kernel has since reused.
final class Connection: @unchecked Sendable {
    /// Where the connection is; it only moves forward.
    enum Status: UInt8, Comparable {
        case negotiating
        /// In transmission, reading requests.
        case active
        /// Reading no more; answering what was received (NBD_CMD_DISC, a
        /// protocol violation, or the server stopping), then closing.
        case draining
        /// The client is gone or was cut off: requests not started are
        /// dropped, those under way finish without a reply.
        case dead

        static func < (a: Status, b: Status) -> Bool { a.rawValue < b.rawValue }
    }

    let id: Int
    let peer: String
    private let socket: Socket
    private let exports: [Export]
    private let buffers: BufferPool
    private let devices: DevicePool
    private let deviceQueue = DeviceQueue()
    private let limits: ConnectionLimits
    private let handshakeTimeout: Double?
    private let tls: TLSConfiguration
    private let sendfileToLocalPeers: Bool
    private let observer: (any ServerObserver)?
    private var logger: Logger
    let counters = TransferCounters()

    private let lock = Lock()
    private let changed: Condition
    private let currentStatus = Atomic<UInt8>(Status.negotiating.rawValue)
    // Guarded by lock.
    private var socketOpen = true
    // The budget is counted without the lock (the reader adds, device and
    // writer threads subtract); the lock and `changed` are only for waiting.
    private let reservedBytes = Atomic<Int>(0)
    /// Requests read and not yet answered or dropped.
    private let pending = Atomic<Int>(0)
    /// Someone waits on `changed` for the budget or for `pending` to reach zero.
    private let waiting = Atomic<Bool>(false)
    private var endReason: String?

    // Set once on the connection's thread before the first request is
    // submitted; the device pool's lock orders that before any use.
    private var handler: RequestHandler!
    private var writer: ReplyWriter!

    init(socket: Socket, peer: String, id: Int, exports: [Export], buffers: BufferPool, devices: DevicePool,
         limits: ConnectionLimits, handshakeTimeout: Double?, tls: TLSConfiguration = .off,
         sendfileToLocalPeers: Bool = false, logger: Logger, observer: (any ServerObserver)? = nil) {
        self.socket = socket
        self.peer = peer
        self.id = id
        self.exports = exports
        self.buffers = buffers
        self.devices = devices
        self.limits = limits
        self.handshakeTimeout = handshakeTimeout
        self.tls = tls
        self.sendfileToLocalPeers = sendfileToLocalPeers
        self.observer = observer
        self.logger = logger
        self.logger[metadataKey: "nbd.conn"] = "\(id)"
        self.logger[metadataKey: "nbd.peer"] = "\(peer)"
        changed = Condition(lock)
    }

    var status: Status { Status(rawValue: currentStatus.load(ordering: .acquiring))! }

    /// Serves the client until the connection ends; blocks the calling thread,
    /// which must be the connection's own.
    func run() {
        var reader = SocketReader(transport: .plain(socket))
        let deadline = handshakeTimeout.map { MonotonicClock.now() + UInt64($0 * 1e9) }
        let handshake = Handshake(socket: socket, exports: exports, tls: tls, logger: logger, deadline: deadline)
        let session: Session
        do {
            session = try handshake.run(&reader)
        } catch {
            if case Handshake.Failure.denied(let why) = error {
                finish(reason: why, transport: reader.transport, refused: true)
            } else {
                finish(reason: Self.describe(handshakeFailure: error), transport: reader.transport)
            }
            observer?.handshakeFailed(Self.classify(handshakeFailure: error))
            return
        }
        let export = exports[session.exportIndex]
        logger[metadataKey: "nbd.export"] = "\(export.name)"
        let transport = reader.transport
        handler = RequestHandler(device: export.device, session: session, buffers: buffers, counters: counters,
                                 logger: logger)
        handler.sendsFileRanges = transport.sendsWithoutBlocking && (sendfileToLocalPeers || !socket.peerIsThisMachine)
        writer = ReplyWriter(transport: transport, name: "nbd-send-\(id)", finished: { [unowned self] reply in
            if case .pooled(let data) = reply.body { buffers.give(data) }
            release(reply.cost)
        }, failed: { [unowned self] error in
            end(.dead, reason: "reply not sent: \(error)")
        })
        guard lock.withLock({ () -> Bool in
            guard status == .negotiating else { return false }
            setStatus(.active)
            return true
        }) else {
            finish(reason: "server stopping", transport: transport)
            return
        }
        logger.debug("Transmission started", metadata: [
            "nbd.structured": "\(session.structuredReplies)", "nbd.extended": "\(session.extendedHeaders)",
            "nbd.flags": "0x\(String(session.flags.rawValue, radix: 16))",
        ])
        var transmission = TransmissionReader(connection: self, session: session, exportSize: export.device.size,
                                              logger: logger)
        let ending = transmission.run(&reader)
        end(ending.status, reason: ending.reason)
        lock.withLock {
            waiting.store(true, ordering: .sequentiallyConsistent)
            while pending.load(ordering: .sequentiallyConsistent) > 0 { changed.wait() }
        }
        writer.stop()
        finish(reason: nil, transport: transport)
    }

    /// Closes the socket (after TLS's close_notify, if TLS runs) and logs why:
    /// one warning line for a refused client, else an info line.
    private func finish(reason: String?, transport: Transport, refused: Bool = false) {
        if case .tls(let session) = transport {
            // Only this thread closes the socket, and nothing else sends now; the
            // timeout keeps a client that stopped reading from holding it long.
            socket.setSendTimeout(seconds: 1)
            session.close()
        }
        let why = lock.withLock { () -> String in
            if socketOpen {
                socketOpen = false
                socket.close()
            }
            return endReason ?? reason ?? "closed"
        }
        if refused {
            logger.warning("Connection refused", metadata: ["nbd.reason": "\(why)"])
            return
        }
        logger.info("Connection closed", metadata: [
            "nbd.reason": "\(why)",
            "nbd.bytes_read": "\(counters.read.load(ordering: .relaxed))",
            "nbd.bytes_written": "\(counters.written.load(ordering: .relaxed))",
        ])
    }

    private static func describe(handshakeFailure error: any Error) -> String {
        switch error {
        case Handshake.Failure.timedOut: "handshake timed out"
        case SocketReader.Failure.failed(let failure) where failure.isTimeout: "handshake timed out"
        case Handshake.Failure.refused(let why), Handshake.Failure.denied(let why),
             Handshake.Failure.aborted(let why): why
        case SocketReader.Failure.closed: "client closed the connection during the handshake"
        case SocketReader.Failure.failed(let failure): "handshake failed: \(failure)"
        default: "handshake failed: \(error)"
        }
    }

    private static func classify(handshakeFailure error: any Error) -> HandshakeFailureReason {
        switch error {
        case Handshake.Failure.timedOut: .timeout
        case SocketReader.Failure.failed(let failure) where failure.isTimeout: .timeout
        case Handshake.Failure.aborted: .clientAborted
        case Handshake.Failure.refused, Handshake.Failure.denied: .refused
        case SocketReader.Failure.closed: .clientClosed
        default: .ioError
        }
    }

    // MARK: - Status changes (from any thread)

    /// Called with the lock held.
    private func setStatus(_ new: Status) {
        currentStatus.store(new.rawValue, ordering: .releasing)
        changed.broadcast()
    }

    /// Moves to `target` if that is forward; the first reason given is the one logged.
    func end(_ target: Status, reason: String) {
        let becameDead = lock.withLock { () -> Bool in
            guard status < target else { return false }
            if endReason == nil { endReason = reason }
            switch target {
            case .dead:
                if socketOpen { socket.shutdown() }  // wakes our reader and writer
            case .draining where status == .negotiating:
                // Nothing to answer yet: the handshake is simply cut off.
                if socketOpen { socket.shutdown() }
            case .draining:
                if socketOpen { socket.shutdownRead() }  // the reader sees end of file; replies still go out
            default:
                break
            }
            setStatus(target)
            return target == .dead
        }
        if becameDead { writer?.fail(.system(.connectionReset)) }
    }

    // MARK: - Budget (the transmission reader's backpressure)

    /// Every request read so far has been answered (or dropped).
    var hasNothingInFlight: Bool { pending.load(ordering: .relaxed) == 0 }

    /// Reserves `cost` bytes for a request about to be read, waiting while the
    /// connection is over its cap. False when the connection has stopped reading.
    func reserve(_ cost: Int) -> Bool {
        func fits() -> Bool {
            let reserved = reservedBytes.load(ordering: .sequentiallyConsistent)
            return reserved == 0 || reserved + cost <= limits.maxQueuedBytes
        }
        if !(status == .active && fits()) {
            lock.withLock {
                waiting.store(true, ordering: .sequentiallyConsistent)
                while status == .active && !fits() { changed.wait() }
                waiting.store(false, ordering: .sequentiallyConsistent)
            }
            guard status == .active else { return false }
        }
        reservedBytes.add(cost, ordering: .sequentiallyConsistent)
        pending.add(1, ordering: .sequentiallyConsistent)
        return true
    }

    fileprivate func release(_ cost: Int) {
        reservedBytes.subtract(cost, ordering: .sequentiallyConsistent)
        pending.subtract(1, ordering: .sequentiallyConsistent)
        if waiting.load(ordering: .sequentiallyConsistent) { lock.withLock { changed.broadcast() } }
    }

    // MARK: - Requests

    /// Runs a request on a device thread; called for requests that passed validation.
    func submit(_ request: Request, payload: UnsafeMutableRawBufferPointer?, contexts: ContextSelection, cost: Int) {
        var job = DeviceJob(connection: self, request: request, payload: payload, contexts: contexts, cost: cost)
        if observer != nil { job.received = MonotonicClock.now() }
        // A cached read costs less than handing it to a device thread and back: answered here.
        if var reply = handler.readIfCached(request) {
            reply.cost = cost
            observer?.requestFinished(request.command, length: request.length, error: reply.error,
                                      nanoseconds: MonotonicClock.now() - job.received)
            writer.enqueue(reply)
            return
        }
        devices.submit(job, to: deviceQueue)
    }

    /// Answers a request that failed validation, without touching the device.
    func reject(_ request: Request, _ error: NBDError, _ why: String, cost: Int) {
        logger.debug("Invalid request", metadata: [
            "nbd.cmd": "\(request.command)", "nbd.error": "\(error)", "nbd.reason": "\(why)",
        ])
        let received = observer != nil ? MonotonicClock.now() : 0
        var reply = handler.errorReply(request, error, why)
        reply.cost = cost
        observer?.requestFinished(request.command, length: request.length, error: error,
                                  nanoseconds: MonotonicClock.now() - received)
        writer.enqueue(reply)
    }

    /// On a device thread.
    func perform(_ job: DeviceJob) {
        guard status != .dead else {
            if let payload = job.payload { buffers.give(payload) }
            release(job.cost)
            return
        }
        var reply = handler.handle(job.request, payload: job.payload, contexts: job.contexts)
        if let payload = job.payload { buffers.give(payload) }
        reply.cost = job.cost
        observer?.requestFinished(job.request.command, length: job.request.length, error: reply.error,
                                  nanoseconds: MonotonicClock.now() - job.received)
        // A client gone while this ran gets no reply (the writer drops it).
        writer.enqueue(reply)
    }
}

extension Connection {
    /// A buffer for a WRITE's payload.
    func takeBuffer(_ count: Int) -> UnsafeMutableRawBufferPointer? { buffers.take(count) }

    /// Gives back a payload buffer that was read and used up by the reader.
    func giveBack(_ payload: UnsafeMutableRawBufferPointer) { buffers.give(payload) }

    /// Gives back a payload that was never submitted, with its reservation.
    func dropPayload(_ payload: UnsafeMutableRawBufferPointer, cost: Int) {
        buffers.give(payload)
        release(cost)
    }
}
