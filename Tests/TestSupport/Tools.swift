import Foundation
import class SystemIO.Lock

/// Runs external programs the way a user would, for tests.
public enum Tools {
    public struct Result: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var succeeded: Bool { status == 0 }
    }

    /// Runs `program` (looked up in PATH) with `arguments` and waits for it.
    ///
    /// This uses Foundation's `Process`, fine for clients that run to completion (qemu-img,
    /// nbdinfo, guestfish). It is not for servers a test must signal: the child inherits the
    /// calling test-runner thread's blocked signals, so it may never see SIGTERM, and a
    /// `--fork` launcher's exit can go unnoticed while its daemon runs. Start those with
    /// `SpawnedProcess` (or `ServerProcess` for swiftnbd itself).
    @discardableResult
    public static func run(_ program: String, _ arguments: [String], environment: [String: String] = [:])
        throws -> Result
    {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [program] + arguments
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        process.environment = env
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Drain both pipes concurrently so a chatty program can't fill one and block.
        // The reader hands its bytes over under a lock: polling Thread.isFinished
        // orders nothing, and ThreadSanitizer reported the read racing the write.
        let handoff = SystemIO.Lock()
        nonisolated(unsafe) var errData: Data?
        let errReader = Thread {
            let data = err.fileHandleForReading.readDataToEndOfFile()
            handoff.withLock { errData = data }
        }
        errReader.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        var stderr: Data?
        while stderr == nil {
            stderr = handoff.withLock { errData }
            if stderr == nil { usleep(1000) }
        }
        return Result(status: process.terminationStatus,
                      stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: stderr!, as: UTF8.self))
    }

    /// Runs a program and throws, with its stderr, unless it exits 0.
    @discardableResult
    public static func check(_ program: String, _ arguments: [String], environment: [String: String] = [:])
        throws -> String
    {
        let result = try run(program, arguments, environment: environment)
        guard result.succeeded else {
            throw ToolError(command: ([program] + arguments).joined(separator: " "),
                            status: result.status, stderr: result.stderr)
        }
        return result.stdout
    }
}

public struct ToolError: Error, CustomStringConvertible {
    public var command: String
    public var status: Int32
    public var stderr: String
    public var description: String { "`\(command)` exited \(status): \(stderr)" }
}

/// A scratch directory removed when the value is released.
public final class TemporaryDirectory: @unchecked Sendable {
    public let path: String

    public init(_ prefix: String = "swiftnbd-test") throws {
        let template = NSTemporaryDirectory() + "/\(prefix).XXXXXX"
        var bytes = Array(template.utf8CString)
        guard mkdtemp(&bytes) != nil else { throw CocoaError(.fileWriteUnknown) }
        path = String(cString: bytes)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Makes test images with qemu-img and qemu-io.
public enum ImageFactory {
    /// `qemu-img create -f FORMAT [-o OPTIONS] PATH SIZE`.
    public static func create(_ path: String, format: String, size: String, options: [String] = []) throws {
        var args = ["create", "-q", "-f", format]
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        try Tools.check("qemu-img", args + [path, size])
    }

    /// Runs qemu-io commands (e.g. "write -P 0xab 0 64k") against an image.
    public static func io(_ path: String, format: String, _ commands: [String]) throws {
        var args = ["-f", format]
        for c in commands { args += ["-c", c] }
        try Tools.check("qemu-io", args + [path])
    }

    /// The image's virtual disk as raw bytes, as qemu-img sees it.
    public static func rawContents(of path: String, format: String, scratch: TemporaryDirectory) throws -> Data {
        let out = scratch.file("converted-\(UUID().uuidString).raw")
        try Tools.check("qemu-img", ["convert", "-f", format, "-O", "raw", path, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    /// Writes a file of `size` bytes with a recognisable pattern, with holes
    /// where `holes` says (every other MiB by default).
    public static func patternedRaw(_ path: String, size: Int, seed: UInt64 = 1) throws {
        FileManager.default.createFile(atPath: path, contents: nil)
        let handle = try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        var state = seed
        let mib = 1 << 20
        var offset = 0
        while offset < size {
            let n = min(mib, size - offset)
            if (offset / mib) % 2 == 0 {
                var chunk = Data(count: n)
                chunk.withUnsafeMutableBytes { raw in
                    let words = raw.bindMemory(to: UInt64.self)
                    for i in 0..<words.count {
                        state = state &* 6364136223846793005 &+ 1442695040888963407
                        words[i] = state
                    }
                }
                try handle.seek(toOffset: UInt64(offset))
                handle.write(chunk)
            }
            offset += n
        }
        try handle.truncate(atOffset: UInt64(size))
    }
}
