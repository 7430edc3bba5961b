import Foundation

/// A real `swiftnbd` process started for a test, on a loopback port the
/// kernel chose; stopped by PID.
public final class ServerProcess: @unchecked Sendable {
    public let process: Process
    public let port: Int
    public var pid: Int32 { process.processIdentifier }
    public var uri: String { "nbd://127.0.0.1:\(port)" }
    private let stderrLines = StderrCollector()

    /// The built binary, next to the test bundle.
    public static var binary: String {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("swiftnbd").path
    }

    /// Starts `swiftnbd -b 127.0.0.1 -p 0 -v ARGS` and waits until it says which port it listens on,
    /// on stderr or, with `portFromLog`, in that log file.
    public init(_ arguments: [String], portFromLog logFile: String? = nil, timeout: TimeInterval = 30) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary)
        process.arguments = ["-b", "127.0.0.1", "-p", "0", "-v"] + arguments
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        stderrLines.drain(pipe.fileHandleForReading)
        let line = logFile.map { Self.waitForLine(in: $0, containing: "port=", timeout: timeout) }
            ?? stderrLines.waitForLine(containing: "port=", timeout: timeout)
        guard let line,
              let range = line.range(of: #"port=(\d+)"#, options: .regularExpression),
              let port = Int(line[range].dropFirst(5))
        else {
            process.terminate()
            throw ToolError(command: "swiftnbd \(arguments.joined(separator: " "))", status: -1,
                            stderr: stderrLines.text)
        }
        self.port = port
    }

    private static func waitForLine(in file: String, containing needle: String, timeout: TimeInterval) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: file, encoding: .utf8),
               let line = text.split(separator: "\n").first(where: { $0.contains(needle) }) {
                return String(line)
            }
            usleep(10_000)
        }
        return nil
    }

    /// Everything the server has logged so far.
    public var log: String { stderrLines.text }

    public var isRunning: Bool { process.isRunning }

    /// Sends SIGTERM and waits for the exit status.
    @discardableResult
    public func stop() -> Int32 {
        if process.isRunning { kill(pid, SIGTERM) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Waits (bounded) for the server to exit on its own; nil if it is still running.
    public func waitForExit(timeout: TimeInterval) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    deinit {
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// Reads a child's stderr on a background thread and lets a test wait for a line.
final class StderrCollector: @unchecked Sendable {
    private let condition = NSCondition()
    private var buffer = ""

    var text: String {
        condition.lock()
        defer { condition.unlock() }
        return buffer
    }

    func drain(_ handle: Foundation.FileHandle) {
        let thread = Thread { [self] in
            while true {
                let data = handle.availableData
                condition.lock()
                if data.isEmpty {
                    buffer += "\u{0}"  // marks EOF
                    condition.broadcast()
                    condition.unlock()
                    return
                }
                buffer += String(decoding: data, as: UTF8.self)
                condition.broadcast()
                condition.unlock()
            }
        }
        thread.start()
    }

    func waitForLine(containing needle: String, timeout: TimeInterval) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let line = buffer.split(separator: "\n").first(where: { $0.contains(needle) }) { return String(line) }
            if buffer.hasSuffix("\u{0}") { return nil }
            if !condition.wait(until: deadline) { return nil }
        }
    }
}
