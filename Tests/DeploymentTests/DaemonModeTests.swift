import Foundation
import Glibc
import Testing
import TestSupport

/// `--fork --pid-file` behaves as qemu-nbd's: the command returns 0 only once the server
/// accepts connections, the pid file names the live server, and SIGTERM stops it cleanly,
/// leaving the image intact (qcow2: `qemu-img check` finds nothing).
@Suite struct DaemonModeTests {
    /// Runs `swiftnbd --fork --pid-file ... -t -p PORT -b 127.0.0.1 ARGS IMAGE`, waits for the
    /// command itself to return, and checks what it promised. Returns the daemon's pid.
    static func startDaemon(image: String, extraArguments: [String] = [], port: UInt16,
                            scratch: TemporaryDirectory) throws -> pid_t {
        let pidFile = scratch.file("swiftnbd.pid")
        let launcher = try SpawnedProcess(
            Paths.serverBinary,
            ["--fork", "--pid-file", pidFile, "-t", "-p", "\(port)", "-b", "127.0.0.1"] + extraArguments + [image],
            logPath: scratch.file("launcher.log"))
        do {
            let ended = launcher.waitForExit(timeout: .seconds(30))
            try #require(ended == .exited(0),
                         "swiftnbd --fork: \(ended.map(String.init(describing:)) ?? "still running after 30 s")\n\(launcher.log)")

            // Listening already: one attempt, no retry.
            _ = try RawClient(port: Int(port))

            let pid = try #require(readPid(pidFile), "pid file: \((try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? "missing")")
            #expect(pid != launcher.pid, "the pid file names the process that returned, not the server")
            #expect(ProcessTable.isRunning(pid))
            let running = ProcessTable.executable(of: pid).map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path }
            #expect(running == URL(fileURLWithPath: Paths.serverBinary).resolvingSymlinksInPath().path)
            return pid
        } catch {
            if let pid = readPid(pidFile) { stop(pid) }
            throw error
        }
    }

    static func readPid(_ path: String) -> pid_t? {
        (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    static func stop(_ pid: pid_t) {
        guard ProcessTable.isRunning(pid) else { return }
        kill(pid, SIGKILL)
        _ = ProcessTable.waitUntilGone(pid, timeout: .seconds(5))
    }

    @Test(.timeLimit(.minutes(10)), arguments: [SIGTERM, SIGINT])
    func forkedServerServesRawImageAndStopsOnSignal(_ signal: Int32) throws {
        let scratch = try TemporaryDirectory("swiftnbd-fork")
        let image = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(image, size: 4 << 20, seed: 3)
        let original = try Data(contentsOf: URL(fileURLWithPath: image))
        let port = try LoopbackTCP.freePort()

        let pid = try Self.startDaemon(image: image, extraArguments: ["-r"], port: port, scratch: scratch)
        defer { Self.stop(pid) }

        let client = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(5))
        #expect(try client.readAll() == Array(original))
        try client.disconnect()

        kill(pid, signal)
        // Gone is what counts: a port probe could meet another test's server that got the same port since.
        #expect(ProcessTable.waitUntilGone(pid, timeout: .seconds(10)), "still running 10 s after signal \(signal)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: image)) == original, "the image changed")
    }

    @Test(.timeLimit(.minutes(10))) func qcow2WrittenThroughForkedServerIsCleanAfterSIGTERM() throws {
        let scratch = try TemporaryDirectory("swiftnbd-fork-qcow2")
        let image = scratch.file("disk.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "64M")
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x11 0 1M"])
        let port = try LoopbackTCP.freePort()

        let pid = try Self.startDaemon(image: image, port: port, scratch: scratch)
        defer { Self.stop(pid) }

        // Overwrite an allocated cluster and allocate new ones, far apart, then flush; the
        // client stays connected when SIGTERM arrives.
        let client = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(5))
        #expect(client.size == 64 << 20)
        let patch = [UInt8](repeating: 0xcd, count: 64 << 10)
        try client.pwrite(patch, offset: 512 << 10)
        try client.pwrite(patch, offset: 40 << 20)
        try client.flush()
        #expect(try client.pread(count: patch.count, offset: 40 << 20) == patch)

        kill(pid, SIGTERM)
        #expect(ProcessTable.waitUntilGone(pid, timeout: .seconds(10)), "still running 10 s after SIGTERM")

        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", image])
        #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        #expect(check.stdout.contains("No errors were found"), "\(check.stdout)")

        var expected = [UInt8](repeating: 0, count: 64 << 20)
        for i in 0..<(1 << 20) { expected[i] = 0x11 }
        expected.replaceSubrange((512 << 10)..<((512 << 10) + patch.count), with: patch)
        expected.replaceSubrange((40 << 20)..<((40 << 20) + patch.count), with: patch)
        let contents = try ImageFactory.rawContents(of: image, format: "qcow2", scratch: scratch)
        #expect(Array(contents) == expected, "the image does not hold what the client wrote")
    }

    /// The exit status of `--fork` reports whether the server started: 1, and no server left
    /// behind, when the image can't be opened or the port is taken.
    @Test(.timeLimit(.minutes(10))) func forkReportsAFailedStart() throws {
        let scratch = try TemporaryDirectory("swiftnbd-fork-fail")
        let image = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(image, size: 1 << 20)
        let busy = try LoopbackTCP.listen()
        defer { busy.close() }
        let freePort = try LoopbackTCP.freePort()

        let cases: [(what: String, port: UInt16, image: String)] = [
            ("missing image", freePort, scratch.file("missing.raw")),
            ("port in use", busy.port, image),
        ]
        for (what, port, path) in cases {
            let pidFile = scratch.file("\(port).pid")
            let launcher = try SpawnedProcess(
                Paths.serverBinary, ["--fork", "--pid-file", pidFile, "-t", "-p", "\(port)", "-b", "127.0.0.1", path],
                logPath: scratch.file("\(port).log"))
            let ended = launcher.waitForExit(timeout: .seconds(30))
            #expect(ended == .exited(1), "\(what): \(ended.map(String.init(describing:)) ?? "still running")\n\(launcher.log)")
            #expect(!launcher.log.isEmpty, "\(what): no message says why")
            if let pid = Self.readPid(pidFile) {
                #expect(!ProcessTable.isRunning(pid), "\(what): a server is left running")
                Self.stop(pid)
            }
        }
    }

    /// The daemon lets go of the caller's stdout and stderr, so `$(swiftnbd --fork ...)` and
    /// `ssh host swiftnbd --fork ...` return instead of waiting for the server to stop.
    @Test(.timeLimit(.minutes(10))) func forkedServerLetsGoOfTheCallersOutput() throws {
        let scratch = try TemporaryDirectory("swiftnbd-fork-pipe")
        let image = scratch.file("disk.raw")
        try ImageFactory.patternedRaw(image, size: 1 << 20)
        let port = try LoopbackTCP.freePort()
        let pidFile = scratch.file("swiftnbd.pid")
        defer { if let pid = Self.readPid(pidFile) { Self.stop(pid) } }

        // `cat` ends only when every writer of the pipe has closed it; timeout(1) exits 124
        // if that takes 20 s.
        let result = try Tools.run("timeout", [
            "20", "sh", "-c", #""$0" --fork --pid-file "$1" -t -r -p "$2" -b 127.0.0.1 "$3" 2>&1 | cat"#,
            Paths.serverBinary, pidFile, "\(port)", image,
        ])
        #expect(result.status == 0, "the pipe stayed open (status \(result.status)): \(result.stdout)")
        let pid = try #require(Self.readPid(pidFile))
        #expect(ProcessTable.isRunning(pid))
        kill(pid, SIGTERM)
        #expect(ProcessTable.waitUntilGone(pid, timeout: .seconds(10)))
    }
}
