import DequeModule
import NBDProtocol
import SystemIO

/// A request read off a connection and waiting for a device thread.
struct DeviceJob: @unchecked Sendable {
    let connection: Connection
    let request: Request
    /// A WRITE's payload, from the buffer pool.
    let payload: UnsafeMutableRawBufferPointer?
    /// The metadata contexts a BLOCK_STATUS answers.
    let contexts: ContextSelection
    /// Budget reserved for the request until its reply is sent or dropped.
    let cost: Int
    /// When the request was read (`MonotonicClock`), for its latency; 0 without an observer.
    var received: UInt64 = 0
}

/// One connection's requests waiting for a device thread. Owned by the
/// connection, guarded by the pool's lock.
final class DeviceQueue: @unchecked Sendable {
    fileprivate var jobs = Deque<DeviceJob>()
    /// In the pool's turn order.
    fileprivate var scheduled = false
    /// Jobs of this queue on device threads now.
    fileprivate var running = 0
}

/// A fixed set of threads that run device operations for every connection.
/// They never touch a socket (replies go to each connection's `ReplyWriter`,
/// which does not block them), so their number bounds device concurrency and
/// nothing a client does can use them up. Connections take turns, one
/// request each, and none may occupy more than half of the threads, so a
/// client with a deep queue of slow requests (block status over a badly
/// fragmented file) always leaves threads free for the others.
final class DevicePool: @unchecked Sendable {
    /// Enough threads to keep storage busy while some wait on it, few enough to stay cheap.
    static var defaultThreadCount: Int { min(64, max(8, 4 * OSThread.processorCount)) }

    private let lock = Lock()
    private let wake: Condition
    private let idle: Condition
    // Guarded by lock.
    /// Connections with jobs waiting, in turn order.
    private var turns = Deque<DeviceQueue>()
    private var live = 0
    private var stopping = false
    private let perQueueLimit: Int

    init(threads: Int = DevicePool.defaultThreadCount) {
        wake = Condition(lock)
        idle = Condition(lock)
        live = threads
        perQueueLimit = max(1, threads / 2)
        for i in 0..<threads {
            OSThread.detach(name: "nbd-device-\(i)", stackSize: 4 << 20) { [self] in work() }
        }
    }

    func submit(_ job: DeviceJob, to queue: DeviceQueue) {
        let scheduled = lock.withLock {
            queue.jobs.append(job)
            return scheduleIfReady(queue)
        }
        // Signalled after unlocking, so the woken thread does not at once block on the lock we hold.
        if scheduled { wake.signal() }
    }

    /// Ends the threads once every queue is empty and waits for them.
    func shutdown() {
        lock.withLock {
            stopping = true
            wake.broadcast()
            while live > 0 { idle.wait() }
        }
    }

    /// Puts `queue` at the back of the turn order if it has work it may start; whether it did. Lock held.
    @discardableResult
    private func scheduleIfReady(_ queue: DeviceQueue) -> Bool {
        guard !queue.scheduled, !queue.jobs.isEmpty, queue.running < perQueueLimit else { return false }
        queue.scheduled = true
        turns.append(queue)
        return true
    }

    private func work() {
        lock.lock()
        while true {
            while turns.isEmpty && !stopping { wake.wait() }
            guard let queue = turns.popFirst() else { break }
            let job = queue.jobs.removeFirst()
            queue.scheduled = false
            queue.running += 1
            // More of this queue may run at once: another thread may start on it.
            let more = scheduleIfReady(queue)
            lock.unlock()
            if more { wake.signal() }
            job.connection.perform(job)
            lock.lock()
            queue.running -= 1
            // No wake-up: this thread looks at the turns next itself.
            scheduleIfReady(queue)
        }
        live -= 1
        idle.broadcast()
        lock.unlock()
    }
}
