import Foundation
import Glibc

/// A real `swiftnbd` process started for a test, on a loopback port the
/// kernel chose; stopped by PID. Started through `SpawnedProcess`, so it
/// gets a clean signal mask whichever test-runner thread starts it.
public final class ServerProcess: @unchecked Sendable {
    public let process: SpawnedProcess
    public let port: Int
    public var pid: Int32 { process.pid }
    public var uri: String { "nbd://127.0.0.1:\(port)" }
    /// Holds the server's stdout and stderr (`output.log`) until the server is released.
    private let scratch: TemporaryDirectory

    /// The built binary, next to the test bundle.
    public static var binary: String { Paths.serverBinary }

    /// Starts `swiftnbd -b 127.0.0.1 -p 0 -v ARGS` and waits until it says which port it listens on,
    /// on stderr or, with `portFromLog`, in that log file.
    public init(_ arguments: [String], portFromLog logFile: String? = nil, timeout: TimeInterval = 30) throws {
        scratch = try TemporaryDirectory("swiftnbd-server")
        process = try SpawnedProcess(Self.binary, ["-b", "127.0.0.1", "-p", "0", "-v"] + arguments,
                                     logPath: scratch.file("output.log"))
        let source = logFile ?? process.logPath
        guard let line = Self.waitForLine(in: source, containing: "port=", while: process, timeout: timeout),
              let range = line.range(of: #"port=(\d+)"#, options: .regularExpression),
              let port = Int(line[range].dropFirst(5))
        else {
            process.stop()
            throw ToolError(command: "swiftnbd \(arguments.joined(separator: " "))",
                            status: process.exited?.status ?? -1, stderr: process.log)
        }
        self.port = port
    }

    /// Polls `file` for a line holding `needle` until `timeout`, or until `process` has exited
    /// without writing it.
    private static func waitForLine(in file: String, containing needle: String, while process: SpawnedProcess,
                                    timeout: TimeInterval) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let gone = process.exited != nil  // read before the file, so a last line isn't missed
            if let text = try? String(contentsOfFile: file, encoding: .utf8),
               let line = text.split(separator: "\n").first(where: { $0.contains(needle) }) {
                return String(line)
            }
            if gone || Date() >= deadline { return nil }
            usleep(10_000)
        }
    }

    /// Waits (bounded) until the log has `count` lines containing `needle`; returns those seen.
    @discardableResult
    public func waitForLog(_ needle: String, count: Int = 1, timeout: TimeInterval = 10) -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let lines = log.split(separator: "\n").filter { $0.contains(needle) }.map(String.init)
            if lines.count >= count || Date() >= deadline { return lines }
            usleep(10_000)
        }
    }

    /// Everything the server has written to stdout and stderr so far.
    public var log: String { process.log }

    public var isRunning: Bool { process.exited == nil }

    /// Sends SIGTERM and waits (at most 30 s, then SIGKILL) for the exit status; a signal
    /// number if the server was killed.
    @discardableResult
    public func stop() -> Int32 {
        process.send(SIGTERM)
        if let ended = process.waitForExit(timeout: .seconds(30)) { return ended.status }
        process.stop()
        return process.exited?.status ?? SIGKILL
    }

    /// Waits (bounded) for the server to exit on its own; nil if it is still running.
    public func waitForExit(timeout: TimeInterval) -> Int32? {
        process.waitForExit(timeout: .milliseconds(Int64(timeout * 1000)))?.status
    }

    // SpawnedProcess's deinit kills the server if it still runs.
}
