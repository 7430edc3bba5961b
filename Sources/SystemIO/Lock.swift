#if canImport(Glibc)
import Glibc
#endif

/// A value only reachable under its lock, as `Synchronization.Mutex`, but on a
/// pthread mutex: on Linux `Synchronization.Mutex` waits on a futex by direct
/// syscall, which ThreadSanitizer cannot see, so accesses it orders were
/// reported as races whenever two threads contended (CI failed on one).
/// ThreadSanitizer knows pthread mutexes, so with this type its reports are real.
public final class Locked<Value: ~Copyable>: @unchecked Sendable {
    @usableFromInline let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    // Exclusive access is what the mutex provides; a dynamic check would only add cost.
    @usableFromInline @exclusivity(unchecked) var value: Value

    public init(_ value: consuming sending Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inlinable
    public func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

/// A plain mutex for state that can't move into a `Locked` value: several fields
/// of a class that a `Condition` waits on, or a stretch of code to serialise.
public final class Lock: @unchecked Sendable {
    let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init() { pthread_mutex_init(mutex, nil) }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inlinable
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A mutex with a condition variable, for threads that must wait for state
/// another thread changes (never by spinning).
public final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    @inlinable
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }
    /// Releases the lock until `broadcast`, then takes it again. Only while holding the lock.
    public func wait() { pthread_cond_wait(condition, mutex) }
    /// Wakes every waiter. Only while holding the lock.
    public func broadcast() { pthread_cond_broadcast(condition) }
}
