import Synchronization
import SystemIO

/// A test hook that simulates the process dying: once `remaining` writes
/// have been made, every later write to the image fails, as if nothing
/// more reached the disk. Crash tests stop a device at every point of a
/// workload this way and check that the image is still consistent.
/// Unused (and free: one relaxed atomic per write) outside tests.
final class CrashSimulator: Sendable {
    let remaining = Atomic<Int>(.max)

    /// Throws once the budget of writes is spent.
    func permitWrite() throws(Errno) {
        if remaining.wrappingSubtract(1, ordering: .relaxed).oldValue <= 0 { throw Errno.io }
    }
}
