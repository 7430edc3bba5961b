import Foundation
import Glibc

/// A `qemu-nbd` started for a test as the reference server, on a Unix socket in its own scratch
/// directory (no port to race other tests for, and nothing listens beyond this machine); stopped
/// by PID. Started through `SpawnedProcess` for the same reasons as `ServerProcess`.
public final class QemuNBDProcess: @unchecked Sendable {
    public let process: SpawnedProcess
    public let socket: String
    public var pid: Int32 { process.pid }
    public var uri: String { "nbd+unix:///?socket=\(socket)" }
    private let scratch: TemporaryDirectory

    /// Starts `qemu-nbd -k SOCKET ARGS`. It is ready once a client gets through: use `connect`.
    public init(_ arguments: [String]) throws {
        scratch = try TemporaryDirectory("qemu-nbd")
        socket = scratch.file("nbd.sock")
        // env execs qemu-nbd in place (PATH lookup, same PID), so signals reach qemu-nbd itself.
        process = try SpawnedProcess("/usr/bin/env", ["qemu-nbd", "-k", socket] + arguments,
                                     logPath: scratch.file("output.log"))
    }

    /// The first client: connects, retrying while qemu-nbd is still creating its socket.
    public func connect(within window: Duration = .seconds(30)) throws -> NBDClient {
        do {
            return try NBDClient.connect(uri, retryingFor: window)
        } catch {
            throw ToolError(command: "qemu-nbd (\(error))", status: process.exited?.status ?? -1, stderr: log)
        }
    }

    /// Everything qemu-nbd has written to stdout and stderr so far.
    public var log: String { process.log }

    /// Sends SIGTERM and waits (at most 30 s, then SIGKILL) for the exit status.
    @discardableResult
    public func stop() -> Int32 {
        process.send(SIGTERM)
        if let ended = process.waitForExit(timeout: .seconds(30)) { return ended.status }
        process.stop()
        return process.exited?.status ?? SIGKILL
    }
}
