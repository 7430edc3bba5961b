import SystemIO

/// Host ranges with I/O in flight outside the metadata lock: reads of data
/// clusters and in-place writes pin their range until the I/O ends.
/// The allocator never hands out a pinned cluster, even one freed
/// meanwhile, and a writer that must see every byte of a range (a
/// read-modify-write of subclusters) waits for its pins to go, on a
/// condition variable. While a writer waits, new pins of its range wait
/// too, so a stream of reads cannot starve it.
final class HostRangeGuard: @unchecked Sendable {
    private let lock = ConditionLock()
    /// Guarded by `lock`.
    private var pinned: [Range<UInt64>] = []
    /// Ranges writers are waiting on. Guarded by `lock`.
    private var awaited: [Range<UInt64>] = []

    func pin(_ range: Range<UInt64>) {
        lock.withLock {
            while awaited.contains(where: { $0.overlaps(range) }) { lock.wait() }
            pinned.append(range)
        }
    }

    /// Pins `range` unless a writer is waiting on it; never waits, for
    /// readers that must not block (`readIfCached`).
    func tryPin(_ range: Range<UInt64>) -> Bool {
        lock.withLock {
            guard !awaited.contains(where: { $0.overlaps(range) }) else { return false }
            pinned.append(range)
            return true
        }
    }

    func unpin(_ range: Range<UInt64>) {
        lock.withLock {
            if let i = pinned.firstIndex(of: range) { pinned.remove(at: i) }
            lock.broadcast()
        }
    }

    func isPinned(_ range: Range<UInt64>) -> Bool {
        lock.withLock { pinned.contains { $0.overlaps(range) } }
    }

    /// Returns once nothing pinned overlaps `range`.
    func waitUntilUnpinned(_ range: Range<UInt64>) {
        lock.withLock {
            guard pinned.contains(where: { $0.overlaps(range) }) else { return }
            awaited.append(range)
            while pinned.contains(where: { $0.overlaps(range) }) { lock.wait() }
            awaited.remove(at: awaited.firstIndex(of: range)!)
            lock.broadcast()
        }
    }
}
