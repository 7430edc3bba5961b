import CSystemShims
import Glibc

/// `--fork` without fork(2), which is unsafe once Dispatch has threads:
/// the parent starts a copy of itself and exits when the copy says it is
/// listening, or with 1 if the copy exits first.
struct Daemon {
    private static let variable = "SWIFTNBD_DAEMON_READY_FD"
    private let readyFD: Int32

    /// The daemon side, when this process was started by `spawnAndWait`.
    static var current: Daemon? {
        guard let text = getenv(variable), let fd = Int32(String(cString: text)) else { return nil }
        unsetenv(variable)
        setsid()
        return Daemon(readyFD: fd)
    }

    /// Starts the daemon copy and waits for its word; returns the exit code for the parent.
    static func spawnAndWait() throws -> Int32 {
        var fds: (Int32, Int32) = (-1, -1)
        let piped = withUnsafeMutablePointer(to: &fds) { $0.withMemoryRebound(to: Int32.self, capacity: 2) { pipe($0) } }
        guard piped == 0 else { throw StartupFailure("cannot make a pipe: \(String(cString: strerror(errno)))") }
        let (readEnd, writeEnd) = fds
        // Neither end may stay open in the copy beyond its standard output.
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC)
        // The copy writes its readiness on its standard output, the pipe; the parent exits
        // right after, so changing its own environment is the simplest way to pass the variable.
        setenv(variable, "1", 1)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, STDOUT_FILENO)
        // Nothing else the caller handed down may stay open in the daemon (a pipe would keep
        // `$(swiftnbd --fork ...)` waiting).
        cshim_spawn_close_from(&actions, STDERR_FILENO + 1)
        let arguments = CommandLine.arguments.map { strdup($0) } + [nil]
        defer { for argument in arguments { free(argument) } }
        var child: pid_t = 0
        let spawned = posix_spawn(&child, "/proc/self/exe", &actions, nil, arguments, environ)
        close(writeEnd)
        defer { close(readEnd) }
        guard spawned == 0 else { throw StartupFailure("cannot start the daemon: \(String(cString: strerror(spawned)))") }
        var word: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            word += chunk[..<n]
        }
        return word.starts(with: Array("ready".utf8)) ? 0 : 1
    }

    /// Tells the parent the server is listening, then lets go of the terminal.
    func reportReady(keepStderr: Bool) {
        _ = "ready\n".withCString { write(readyFD, $0, strlen($0)) }
        let null = open("/dev/null", O_RDWR)
        dup2(null, readyFD)
        if !keepStderr { dup2(null, STDERR_FILENO) }
        close(null)
    }
}
