import DequeModule
import NBDProtocol
import SystemIO

/// A request read off a connection and waiting for a device thread.
struct DeviceJob: @unchecked Sendable {
    let connection: Connection
    let request: Request
    /// A WRITE's payload, from the buffer pool.
    let payload: UnsafeMutableRawBufferPointer?
    /// Budget reserved for the request until its reply is sent or dropped.
    let cost: Int
    /// When the request was read (`MonotonicClock`), for its latency; 0 without an observer.
    var received: UInt64 = 0
}

/// One connection's requests waiting for a device thread. Owned by the
/// connection, guarded by the pool's lock.
final class DeviceQueue: @unchecked Sendable {
    fileprivate var jobs = Deque<DeviceJob>()
    fileprivate var scheduled = false
}

/// A fixed set of threads that run device operations for every connection.
/// They never touch a socket (replies go to each connection's `ReplyWriter`,
/// which does not block them), so their number bounds device concurrency and
/// nothing a client does can use them up. Connections take turns, one
/// request each, so a client with a deep queue of slow requests delays
/// another client by at most one request per thread.
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

    init(threads: Int = DevicePool.defaultThreadCount) {
        wake = Condition(lock)
        idle = Condition(lock)
        live = threads
        for i in 0..<threads {
            OSThread.detach(name: "nbd-device-\(i)", stackSize: 4 << 20) { [self] in work() }
        }
    }

    func submit(_ job: DeviceJob, to queue: DeviceQueue) {
        lock.withLock {
            queue.jobs.append(job)
            if !queue.scheduled {
                queue.scheduled = true
                turns.append(queue)
            }
            wake.signal()
        }
    }

    /// Ends the threads once every queue is empty and waits for them.
    func shutdown() {
        lock.withLock {
            stopping = true
            wake.broadcast()
            while live > 0 { idle.wait() }
        }
    }

    private func work() {
        lock.lock()
        while true {
            while turns.isEmpty && !stopping { wake.wait() }
            guard let queue = turns.popFirst() else { break }
            let job = queue.jobs.removeFirst()
            if queue.jobs.isEmpty {
                queue.scheduled = false
            } else {
                turns.append(queue)
            }
            lock.unlock()
            job.connection.perform(job)
            lock.lock()
        }
        live -= 1
        idle.broadcast()
        lock.unlock()
    }
}
