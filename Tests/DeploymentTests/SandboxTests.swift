import Foundation
import Glibc
import Testing
import TestSupport

/// The sandbox in swiftnbd@.service can't be run here (no systemd as PID 1), so this checks
/// it from the other side: a serve session under strace makes only system calls that the
/// unit's SystemCallFilter= lines allow and opens only socket families that
/// RestrictAddressFamilies= allows. A call outside them would fail with EPERM under systemd.
@Suite struct SandboxTests {
    /// The unit's `KEY=` values, in order (a key may repeat).
    static func settings(_ key: String, in unit: String) throws -> [String] {
        try String(contentsOfFile: Paths.repo("systemd/\(unit)"), encoding: .utf8)
            .split(separator: "\n").filter { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
    }

    /// `systemd-analyze syscall-filter`: every group (`@name`) and the calls and groups it lists.
    static func syscallGroups() throws -> [String: [String]] {
        var groups: [String: [String]] = [:]
        var current: String?
        for line in try Tools.check("systemd-analyze", ["syscall-filter"]).split(separator: "\n") {
            if line.hasPrefix("@") { current = String(line); groups[String(line)] = []; continue }
            guard let group = current, line.hasPrefix("    ") else { current = nil; continue }
            let name = line.trimmingCharacters(in: .whitespaces)
            if !name.hasPrefix("#") { groups[group, default: []].append(name) }
        }
        return groups
    }

    static func expand(_ item: String, _ groups: [String: [String]]) -> Set<String> {
        guard item.hasPrefix("@") else { return [item] }
        return (groups[item] ?? []).reduce(into: Set<String>()) { $0.formUnion(expand($1, groups)) }
    }

    /// The calls a unit's SystemCallFilter= lines allow: allow lists add up, `~` lines take away.
    static func allowedSyscalls(unit: String) throws -> Set<String> {
        let groups = try syscallGroups()
        var allowed: Set<String> = []
        var denied: Set<String> = []
        for value in try settings("SystemCallFilter", in: unit) {
            let deny = value.hasPrefix("~")
            let items = (deny ? value.dropFirst() : Substring(value)).split(separator: " ").map(String.init)
            for item in items {
                if deny { denied.formUnion(expand(item, groups)) } else { allowed.formUnion(expand(item, groups)) }
            }
        }
        #expect(allowed.count > 100, "could not read systemd's syscall groups")
        return allowed.subtracting(denied)
    }

    /// Serves a qcow2 image the way swiftnbd@.service runs it, under `strace -f`: reads,
    /// writes into new clusters, a flush, a read over TLS, a client dropped by the handshake
    /// timeout, SIGTERM, with the metrics file rewritten all along.
    /// Returns the trace.
    static func traceServeSession(scratch: TemporaryDirectory, image: String) throws -> String {
        try ImageFactory.create(image, format: "qcow2", size: "64M")
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x5a 0 2M"])
        let port = try LoopbackTCP.freePort()
        let trace = scratch.file("strace.log")
        let strace = try SpawnedProcess(
            "/usr/bin/strace",
            ["-f", "-qq", "-o", trace, Paths.serverBinary,
             "-t", "-v", "-p", "\(port)", "-b", "127.0.0.1", "--handshake-timeout", "1",
             "--tls=on", "--tls-certificates", TLSFixture.shared.x509,
             "--metrics-file", scratch.file("swiftnbd.prom"), "--metrics-interval", "0.1", image],
            logPath: scratch.file("server.log"))
        defer { strace.stop() }

        let client = try NBDClient.connect("nbd://127.0.0.1:\(port)", retryingFor: .seconds(30))
        #expect(try client.pread(count: 65536, offset: 0) == [UInt8](repeating: 0x5a, count: 65536))
        try client.pwrite([UInt8](repeating: 0xa5, count: 1 << 20), offset: 32 << 20)
        try client.flush()
        try client.disconnect()
        let overTLS = try NBDClient(uri: TLSFixture.shared.x509URI(port: Int(port)))
        #expect(try overTLS.pread(count: 65536, offset: 0) == [UInt8](repeating: 0x5a, count: 65536))
        try overTLS.disconnect()
        let silent = try RawClient(port: Int(port))
        #expect(silent.readUntilClosed(timeout: .seconds(10)).closed)

        // strace's child is the server; stop it as systemd would, and strace ends with it.
        let children = try String(contentsOfFile: "/proc/\(strace.pid)/task/\(strace.pid)/children", encoding: .utf8)
        let server = try #require(children.split(separator: " ").first.flatMap { pid_t($0) })
        kill(server, SIGTERM)
        #expect(strace.waitForExit(timeout: .seconds(20)) == .exited(0), "\(strace.log)")
        return try String(contentsOfFile: trace, encoding: .utf8)
    }

    @Test(.timeLimit(.minutes(10))) func serveSessionStaysInsideTheUnitsSandbox() throws {
        let scratch = try TemporaryDirectory("swiftnbd-sandbox")
        let image = scratch.file("disk.qcow2")
        let trace = try Self.traceServeSession(scratch: scratch, image: image)

        // Lines look like `1234  openat(AT_FDCWD, ...) = 3` or `1234  <... read resumed>...`.
        let call = /^\d+\s+([a-z0-9_]+)\(/
        let used = Set(trace.split(separator: "\n").compactMap { line in
            (try? call.firstMatch(in: line)).map { String($0.output.1) }
        })
        #expect(used.contains("accept4") && (used.contains("pwrite64") || used.contains("pwritev")),
                "the trace does not show a serve session: \(used.sorted())")
        for unit in ["swiftnbd@.service", "swiftnbd.service"] {
            let outside = used.subtracting(try Self.allowedSyscalls(unit: unit))
            #expect(outside.isEmpty, "\(unit) would refuse: \(outside.sorted())")
        }

        let families = Set(trace.split(separator: "\n").compactMap { line in
            (try? /socket\((AF_[A-Z0-9]+)/.firstMatch(in: line)).map { String($0.output.1) }
        })
        #expect(!families.isEmpty)
        let permitted = Set(try Self.settings("RestrictAddressFamilies", in: "swiftnbd@.service")
            .flatMap { $0.split(separator: " ").map(String.init) })
        #expect(families.isSubset(of: permitted), "sockets of \(families.subtracting(permitted).sorted())")

        // ProtectSystem=strict leaves only ReadWritePaths= (the image folder, the textfile
        // collector's) writable: the server may open nothing but the image and the metrics file.
        let writable = /openat\([^,]+, "([^"]+)", [^)]*(O_WRONLY|O_RDWR|O_CREAT)/
        let written = Set(trace.split(separator: "\n").compactMap { line in
            (try? writable.firstMatch(in: line)).map { String($0.output.1) }
        })
        #expect(written == [image, scratch.file("swiftnbd.prom.tmp")], "opened for writing: \(written.sorted())")
        #expect(used.contains("rename") || used.contains("renameat") || used.contains("renameat2"),
                "the metrics file was never renamed into place")
        let folders = try Self.settings("ReadWritePaths", in: "swiftnbd@.service")
        #expect(folders.contains("-/var/lib/prometheus/node-exporter"))
    }
}
