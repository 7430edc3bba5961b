import DequeModule
import SystemIO

/// The only code that sends on a connection in transmission. A device
/// thread hands over a finished reply with `enqueue`, which never waits for
/// the client. Whoever finds no one sending becomes the sender and sends,
/// without blocking, everything queued, including what other device threads
/// queue meanwhile; when the socket's buffer fills, the connection's own
/// writer thread takes over with blocking sends until the queue is empty.
/// So replies go out with no thread switch while the client keeps up, and a
/// client that stops reading parks only its writer thread. Over TLS a record
/// the socket took in part must be finished by the same caller, so there the
/// writer thread sends everything.
///
/// Every reply given to the writer comes back exactly once through
/// `finished`, sent or dropped, so buffers and budget are always returned;
/// `failed` comes first, as the owner may be freed once all are back.
final class ReplyWriter: @unchecked Sendable {
    private let transport: Transport
    private let name: String
    private let finished: @Sendable (Reply) -> Void
    private let failed: @Sendable (Transport.Failure) -> Void

    private let lock = Lock()
    private let wake: Condition
    // Guarded by lock.
    /// Replies waiting, the first perhaps partly sent (`headSent` bytes); the one being sent is not here.
    private var queue = Deque<Reply>()
    private var headSent = 0
    /// Someone is sending; others only queue.
    private var sending = false
    /// The sender is the writer thread (the socket was full).
    private var writerOwns = false
    private var threadRunning = false
    private var stopped = false
    private var broken = false

    /// `finished` gets each reply once it is sent or dropped; `failed` is told
    /// once when a send fails (the client is gone).
    init(transport: Transport, name: String, finished: @escaping @Sendable (Reply) -> Void,
         failed: @escaping @Sendable (Transport.Failure) -> Void) {
        self.transport = transport
        self.name = name
        self.finished = finished
        self.failed = failed
        wake = Condition(lock)
    }

    /// Queues `reply` and, if no one is sending, sends the queue without blocking.
    func enqueue(_ reply: Reply) {
        lock.lock()
        if broken {
            lock.unlock()
            finished(reply)
            return
        }
        queue.append(reply)
        guard !sending else {
            lock.unlock()
            return
        }
        sending = true
        if transport.sendsWithoutBlocking {
            send(blocking: false)
        } else {
            handToWriter()
        }
        lock.unlock()
    }

    /// The writer thread becomes the sender. Called with the lock held.
    private func handToWriter() {
        writerOwns = true
        startThreadIfNeeded()
        wake.signal()
    }

    /// Sends the queue in order until it is empty, the socket is full (without
    /// blocking: then the writer thread takes over), or a send fails. Called
    /// with the lock held by the current sender; returns with it held.
    private func send(blocking: Bool) {
        // The reply being sent is out of the queue, so `fail` never drops it under the sender.
        while !broken, var head = queue.popFirst() {
            if !blocking && head.needsBlockingSend {
                queue.prepend(head)
                handToWriter()
                return
            }
            let alreadySent = headSent
            headSent = 0
            lock.unlock()
            let result = Result { () throws(Transport.Failure) in
                try head.send(on: transport, alreadySent: alreadySent, blocking: blocking)
            }
            lock.lock()
            switch result {
            case .success(let sent) where sent < head.length && !broken:
                // The socket is full: the writer thread goes on from here with blocking sends.
                queue.prepend(head)
                headSent = sent
                handToWriter()
                return
            case .success:
                lock.unlock()
                finished(head)
                lock.lock()
            case .failure(let error):
                lock.unlock()
                // `failed` before the last `finished`: once every reply is back the
                // connection may be gone, and `failed` reaches it.
                fail(error)
                finished(head)
                lock.lock()
            }
        }
        sending = false
        writerOwns = false
    }

    /// Drops everything queued and refuses what comes later (the client is gone).
    func fail(_ error: Transport.Failure) {
        let dropped = lock.withLock { () -> Deque<Reply>? in
            guard !broken else { return nil }
            broken = true
            let all = queue
            queue = []
            headSent = 0
            wake.broadcast()
            return all
        }
        guard let dropped else { return }
        failed(error)
        for reply in dropped { finished(reply) }
    }

    /// Lets the writer thread end; called once nothing more will be enqueued.
    func stop() {
        lock.withLock {
            stopped = true
            wake.broadcast()
        }
    }

    /// Called with the lock held.
    private func startThreadIfNeeded() {
        guard !threadRunning else { return }
        threadRunning = true
        OSThread.detach(name: name, stackSize: 256 << 10) { [self] in drain() }
    }

    private func drain() {
        lock.lock()
        while true {
            while !writerOwns && !stopped && !broken { wake.wait() }
            guard writerOwns && !broken else { break }
            send(blocking: true)
        }
        threadRunning = false
        lock.unlock()
    }
}
