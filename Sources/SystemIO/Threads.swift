#if canImport(Glibc)
import Glibc
#endif
import CSystemShims

/// A condition variable bound to one `Lock`: wait with that lock held.
public final class Condition: @unchecked Sendable {
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    public let lock: Lock

    public init(_ lock: Lock) {
        self.lock = lock
        // CLOCK_MONOTONIC, so timed waits are not moved by the wall clock.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deallocate()
    }

    /// Releases the lock while waiting; it is held again on return.
    public func wait() { pthread_cond_wait(cond, lock.mutex) }

    /// Waits until signalled or until `deadline` (a `MonotonicClock.now()` value) passes.
    public func wait(until deadline: UInt64) {
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        _ = pthread_cond_timedwait(cond, lock.mutex, &ts)
    }

    public func signal() { pthread_cond_signal(cond) }
    public func broadcast() { pthread_cond_broadcast(cond) }
}

/// Nanoseconds on CLOCK_MONOTONIC.
public enum MonotonicClock {
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// Starts detached OS threads. The server uses these, not Dispatch workers,
/// wherever a thread may block for as long as a client likes (its socket),
/// so that no shared pool can be drained by slow clients.
public enum OSThread {
    private final class Start {
        let name: String
        let body: @Sendable () -> Void
        init(_ name: String, _ body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Runs `body` on a new detached thread named `name` (at most 15 bytes are kept).
    public static func detach(name: String, stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) {
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        pthread_attr_setstacksize(&attributes, stackSize)
        let start = Unmanaged.passRetained(Start(name, body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, &attributes, { context in
            let start = Unmanaged<Start>.fromOpaque(context!).takeRetainedValue()
            // Named from inside: for the calling thread glibc uses prctl, not a write to /proc.
            _ = String(decoding: start.name.utf8.prefix(15), as: UTF8.self).withCString {
                cshim_set_thread_name(pthread_self(), $0)
            }
            start.body()
            return nil
        }, start)
        // Out of threads is out of memory: nothing sensible can go on.
        precondition(result == 0, "pthread_create failed: \(Errno(result))")
    }

    /// The number of processors this process may run on.
    public static var processorCount: Int { Int(cshim_available_processors()) }
}

/// Whole pages straight from the kernel, for large I/O buffers: unlike
/// malloc's heap, unmapping gives the memory back at once.
public enum PageMemory {
    public static func allocate(_ count: Int) -> UnsafeMutableRawBufferPointer? {
        let p = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { return nil }
        return UnsafeMutableRawBufferPointer(start: p, count: count)
    }

    public static func deallocate(_ buffer: UnsafeMutableRawBufferPointer) {
        _ = munmap(buffer.baseAddress, buffer.count)
    }
}
