import Foundation
import Glibc

/// A program started in the background for a test, with stdin from /dev/null and stdout and
/// stderr in a log file. `stop()` (also run on release) kills it if it still runs, so a
/// failing test never leaves a server behind.
///
/// This uses posix_spawn rather than Foundation's Process for two reasons:
/// - The child starts with no blocked signals and default dispositions, as under systemd.
///   Process hands on the spawning thread's mask, and the test runner's worker threads block
///   nearly every signal, so SIGTERM would never reach the server.
/// - Process on Linux notices an exit through a descriptor the child inherits; a `--fork`ed
///   daemon inherits it too, so the launcher would seem to run until the daemon stops.
public final class SpawnedProcess: @unchecked Sendable {
    public let pid: pid_t
    public let logPath: String
    private var termination: Termination?

    public struct SpawnError: Error, CustomStringConvertible {
        public var program: String
        public var errno: Int32
        public var description: String { "posix_spawn \(program): \(String(cString: strerror(errno)))" }
    }

    /// Starts `executable` (a path; PATH is not searched) with `arguments`.
    public init(_ executable: String, _ arguments: [String], logPath: String) throws {
        self.logPath = logPath
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t(), allSignals = sigset_t()
        sigemptyset(&noSignals)
        sigfillset(&allSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        posix_spawnattr_setsigdefault(&attributes, &allSignals)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let error = posix_spawn(&child, executable, &actions, &attributes, argv, environ)
        guard error == 0 else { throw SpawnError(program: executable, errno: error) }
        pid = child
    }

    /// Everything the program wrote so far.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// How the program ended, if it has; reaps it.
    public var exited: Termination? {
        if termination == nil {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                let signal = status & 0x7f
                termination = signal == 0 ? .exited((status >> 8) & 0xff) : .killed(signal)
            }
        }
        return termination
    }

    /// Waits at most `timeout` for the program to exit. Returns how it ended, or nil if it is
    /// still running.
    public func waitForExit(timeout: Duration) -> Termination? {
        let deadline = ContinuousClock.now + timeout
        while exited == nil {
            if ContinuousClock.now >= deadline { return nil }
            usleep(10_000)
        }
        return exited
    }

    public func send(_ signal: Int32) { if exited == nil { kill(pid, signal) } }

    /// Kills the program (SIGKILL) if it still runs and reaps it.
    public func stop() {
        guard exited == nil else { return }
        kill(pid, SIGKILL)
        _ = waitForExit(timeout: .seconds(10))
    }

    deinit { stop() }

    public enum Termination: Equatable, Sendable, CustomStringConvertible {
        case exited(Int32)
        case killed(Int32)
        /// The exit status, or the signal number for a killed program (as Foundation's
        /// `Process.terminationStatus` reports it).
        public var status: Int32 {
            switch self {
            case .exited(let status), .killed(let status): status
            }
        }

        public var description: String {
            switch self {
            case .exited(let status): "exit \(status)"
            case .killed(let signal): "killed by signal \(signal)"
            }
        }
    }
}

/// Processes that are not our children (a `--fork`ed daemon) are watched through /proc.
public enum ProcessTable {
    /// The state letter in /proc/PID/stat (or /proc/PID/task/TID/stat): R, S, T, Z, ...
    static func state(_ statPath: String) -> Character? {
        guard let stat = try? String(contentsOfFile: statPath, encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(close, offsetBy: 2)...].first
    }

    /// True while `pid` exists and is not a zombie (an exited daemon nobody has reaped yet).
    public static func isRunning(_ pid: pid_t) -> Bool {
        guard let state = state("/proc/\(pid)/stat") else { return false }
        return state != "Z" && state != "X"
    }

    /// Waits at most `timeout` until every thread of `pid` is stopped (SIGSTOP). kill() returns
    /// before a multi-threaded process has stopped: one thread takes the signal and stops the
    /// others, so until then another thread may still serve a request.
    public static func waitUntilStopped(_ pid: pid_t, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while true {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
            if !tasks.isEmpty, tasks.allSatisfy({ state("/proc/\(pid)/task/\($0)/stat") == "T" }) { return true }
            if ContinuousClock.now >= deadline { return false }
            usleep(10_000)
        }
    }

    /// Waits at most `timeout` for `pid` to go away; true if it did.
    public static func waitUntilGone(_ pid: pid_t, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while isRunning(pid) {
            if ContinuousClock.now >= deadline { return false }
            usleep(10_000)
        }
        return true
    }

    /// The program `pid` is running, as /proc/PID/exe names it.
    public static func executable(of pid: pid_t) -> String? {
        try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")
    }
}
