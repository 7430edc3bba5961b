import Foundation

/// `--fork` without fork(2), which is unsafe once Dispatch has threads:
/// the parent starts a copy of itself and exits when the copy says it is
/// listening, or with 1 if the copy exits first.
struct Daemon {
    private static let variable = "SWIFTNBD_DAEMON_READY_FD"
    private let readyFD: Int32

    /// The daemon side, when this process was started by `spawnAndWait`.
    static var current: Daemon? {
        guard let text = ProcessInfo.processInfo.environment[variable], let fd = Int32(text) else { return nil }
        unsetenv(variable)
        setsid()
        return Daemon(readyFD: fd)
    }

    /// Starts the daemon copy and waits for its word; returns the exit code for the parent.
    static func spawnAndWait() throws -> Int32 {
        let pipe = Pipe()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe")
        process.arguments = Array(CommandLine.arguments.dropFirst())
        var environment = ProcessInfo.processInfo.environment
        // The copy writes its readiness on its standard output, the pipe.
        environment[variable] = "1"
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = pipe
        try process.run()
        pipe.fileHandleForWriting.closeFile()
        let word = pipe.fileHandleForReading.readDataToEndOfFile()
        return word.starts(with: Data("ready".utf8)) ? 0 : 1
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
