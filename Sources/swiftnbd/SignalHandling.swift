import Glibc
import SystemIO

/// SIGTERM and SIGINT stop the server cleanly, SIGHUP reopens the log
/// file, and SIGPIPE is ignored so a vanished client is an error return,
/// not a dead server.
///
/// The three are blocked from the start (`blockEarly`, before any thread exists, so every
/// thread inherits the mask) and taken by one thread with sigwait: a signal that comes
/// before the handlers are ready waits for them instead of being lost or killing the process.
enum SignalHandling {
    private static var handled: sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for number in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&set, number) }
        return set
    }

    /// Call first thing in the main thread, before anything starts a thread.
    static func blockEarly() {
        signal(SIGPIPE, SIG_IGN)
        var set = handled
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Gives the three back their default actions (the `--fork` parent, which only waits, and its child).
    static func unblock() {
        var set = handled
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    static func install(stop: @escaping @Sendable (Int32) -> Void, reopenLog: @escaping @Sendable () -> Void) {
        OSThread.detach(name: "signals", stackSize: 64 << 10) {
            var set = handled
            while true {
                var number: Int32 = 0
                guard sigwait(&set, &number) == 0 else { continue }
                if number == SIGHUP { reopenLog() } else { stop(number) }
            }
        }
    }
}
