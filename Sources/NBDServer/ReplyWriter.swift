import DequeModule
import SystemIO

/// The only code that sends on a connection in transmission. A device
/// thread hands over a finished reply with `enqueue`, which never waits for
/// the client: on a plain socket with nothing queued the reply is sent at
/// once without blocking; whatever the socket does not take, and over TLS
/// every reply, goes to a queue that the connection's own writer thread
/// drains with blocking sends. So a client that stops reading parks only its
/// writer thread.
///
/// Every reply given to the writer comes back exactly once through
/// `finished`, sent or dropped, so buffers and budget are always returned.
final class ReplyWriter: @unchecked Sendable {
    private let transport: Transport
    private let name: String
    private let finished: @Sendable (Reply) -> Void
    private let failed: @Sendable (Transport.Failure) -> Void

    private let lock = Lock()
    private let wake: Condition
    // Guarded by lock.
    /// Replies waiting, the first perhaps partly sent (`headSent` bytes).
    private var queue = Deque<Reply>()
    private var headSent = 0
    /// Someone (a device thread or the writer thread) is sending; others queue.
    private var sending = false
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

    /// Sends `reply` now if the socket takes it whole without blocking, else queues it.
    func enqueue(_ reply: Reply) {
        lock.lock()
        if broken {
            lock.unlock()
            finished(reply)
            return
        }
        guard transport.sendsWithoutBlocking && queue.isEmpty && !sending else {
            queue.append(reply)
            startThreadIfNeeded()
            wake.signal()
            lock.unlock()
            return
        }
        sending = true
        lock.unlock()

        var reply = reply
        let sent: Int
        do {
            sent = try reply.send(on: transport, alreadySent: 0, blocking: false)
        } catch {
            lock.withLock { sending = false }
            finished(reply)
            fail(error)
            return
        }
        lock.lock()
        sending = false
        let done = sent == reply.length
        if !done {
            queue.prepend(reply)
            headSent = sent
        }
        if !queue.isEmpty {
            startThreadIfNeeded()
            wake.signal()
        }
        lock.unlock()
        if done { finished(reply) }
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
        for reply in dropped { finished(reply) }
        failed(error)
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
            while (queue.isEmpty || sending) && !stopped && !broken { wake.wait() }
            if broken || queue.isEmpty { break }
            var reply = queue.removeFirst()
            let alreadySent = headSent
            headSent = 0
            sending = true
            lock.unlock()
            do {
                _ = try reply.send(on: transport, alreadySent: alreadySent, blocking: true)
            } catch {
                lock.withLock { sending = false }
                finished(reply)
                fail(error)
                lock.lock()
                continue
            }
            lock.withLock { sending = false }
            finished(reply)
            lock.lock()
        }
        threadRunning = false
        lock.unlock()
    }
}
