import Foundation
import NBDProtocol
import SystemIO
import TestSupport
import Testing

/// The client address allow-list, without TLS, over IPv4 and IPv6 loopback; and credentials
/// that stop the server at start.
@Suite struct AccessTests {
    /// The server closes `socket` without a greeting, and logs one refusal naming the address.
    func expectRefused(_ server: ServerProcess, _ socket: Socket, address: String, refusalsBefore: Int,
                       sourceLocation: SourceLocation = #_sourceLocation) {
        let raw = RawClient(socket: socket)
        let (bytes, closed) = raw.readUntilClosed(timeout: .seconds(10))
        #expect(closed && bytes.isEmpty, "got \(bytes.count) bytes", sourceLocation: sourceLocation)
        let lines = server.waitForLog("Connection refused", count: refusalsBefore + 1)
        #expect(lines.count == refusalsBefore + 1, sourceLocation: sourceLocation)
        #expect(lines.last?.contains("address \(address) is not on the allow-list") == true, "\(lines)",
                sourceLocation: sourceLocation)
    }

    /// A client that completes the handshake and enters transmission.
    func expectServed(_ socket: Socket, sourceLocation: SourceLocation = #_sourceLocation) {
        let raw = RawClient(socket: socket)
        #expect(throws: Never.self, sourceLocation: sourceLocation) { _ = try raw.go() }
    }

    @Test func ipv4ClientsOutsideTheListAreRefusedBeforeTheHandshake() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", "-e", "2", "--allow-address", "127.0.0.2/32,10.0.0.0/8,fd00::/8",
                                        fixture.image])
        expectRefused(server, try Socket.connectTCP(host: "127.0.0.1", port: server.port), address: "127.0.0.1",
                      refusalsBefore: 0)
        expectServed(try LoopbackTCP.connect(port: server.port, from: "127.0.0.2"))
        expectRefused(server, try Socket.connectTCP(host: "127.0.0.1", port: server.port), address: "127.0.0.1",
                      refusalsBefore: 1)
        expectServed(try LoopbackTCP.connect(port: server.port, from: "127.0.0.2"))
        // Refused clients never got a connection (no handshake work): only 127.0.0.2's were opened.
        let opened = server.log.split(separator: "\n").filter { $0.contains("Connection opened") }
        #expect(opened.count == 2 && opened.allSatisfy { $0.contains("nbd.peer=127.0.0.2:") }, "\(opened)")
    }

    /// ::1 is the only IPv6 loopback source, so the refusal and the served client need two servers.
    @Test(.enabled(if: LoopbackTCP.hasIPv6Loopback, "no IPv6 loopback here"))
    func ipv6ClientsAreCheckedToo() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let refusing = try ServerProcess(["-t", "-e", "2", "-b", "::1", "--allow-address", "127.0.0.0/8",
                                          fixture.image])
        expectRefused(refusing, try Socket.connectTCP(host: "::1", port: refusing.port), address: "::1",
                      refusalsBefore: 0)
        expectRefused(refusing, try Socket.connectTCP(host: "::1", port: refusing.port), address: "::1",
                      refusalsBefore: 1)
        let serving = try ServerProcess(["-t", "-e", "2", "-b", "::1", "--allow-address", "::1/128", fixture.image])
        try Tools.check("nbdinfo", ["nbd://[::1]:\(serving.port)"])
    }

    @Test func missingCredentialsStopTheServerWithOneLine() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let result = try Tools.run(ServerProcess.binary, ["-p", "0", "--tls-certificates", "/nonexistent/pki",
                                                          fixture.image])
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.contains("/nonexistent/pki/server-cert.pem"), "\(result.stderr)")
    }

    @Test func badKeysStopTheServerWithOneLine() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let tls = TLSFixture.shared
        let dir = fixture.scratch.file("pki")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for name in ["ca-cert.pem", "server-cert.pem"] {
            try FileManager.default.copyItem(atPath: tls.x509 + "/" + name, toPath: dir + "/" + name)
        }
        try "not a key\n".write(toFile: dir + "/server-key.pem", atomically: true, encoding: .utf8)
        let psk = fixture.scratch.file("bad.psk")
        try "alice:not-hex\n".write(toFile: psk, atomically: true, encoding: .utf8)
        for arguments in [["--tls-certificates", dir],
                          ["--object", "tls-creds-x509,id=t,dir=\(dir),endpoint=server", "--tls-creds", "t"],
                          ["--tls-psk", psk]] {
            let result = try Tools.run(ServerProcess.binary, ["-p", "0"] + arguments + [fixture.image])
            #expect(result.status == 1, "\(arguments)")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(arguments.contains(psk) ? psk : dir), "\(result.stderr)")
        }
    }

    @Test func contradictoryOptionsAreUsageErrors() throws {
        let fixture = try RawFixture(size: 1 << 20)
        for arguments in [["--tls=require"], ["--tls-authz", "a"],
                          ["--object", "tls-creds-x509,id=t,dir=/d,endpoint=client", "--tls-creds", "t"],
                          ["--allow-address", "127.0.0.1/40"]] {
            let result = try Tools.run(ServerProcess.binary, ["-p", "0"] + arguments + [fixture.image])
            #expect(result.status == 64, "\(arguments): \(result.stderr)")
        }
    }
}
