import Foundation
import NBDProtocol
import SystemIO
import TestSupport
import Testing

/// TLS with real clients (libnbd's nbdinfo and nbdcopy, qemu-img, qemu-io) reading and writing a
/// qcow2 export, and every refusal the issue lists; after each refusal a good client is still served.
@Suite struct TLSTests {
    let tls = TLSFixture.shared

    /// nbdinfo over `uri` succeeds and says TLS is on.
    func expectServedOverTLS(_ uri: String, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
        let result = try? Tools.run("nbdinfo", ["--json", uri])
        #expect(result?.succeeded == true && result?.stdout.contains("\"TLS\": true") == true,
                "\(comment?.description ?? "") \(result?.stderr ?? "")", sourceLocation: sourceLocation)
    }

    /// The client fails, and the server logs one more "Connection refused" line holding `reason`.
    func expectRefused(_ server: ServerProcess, _ program: String, _ arguments: [String], reason: String,
                       refusalsBefore: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try Tools.run(program, arguments)
        #expect(!result.succeeded, "\(program) got in: \(result.stdout)", sourceLocation: sourceLocation)
        let lines = server.waitForLog("Connection refused", count: refusalsBefore + 1)
        #expect(lines.count == refusalsBefore + 1, "\(server.log)", sourceLocation: sourceLocation)
        if let last = lines.last {
            #expect(last.contains("nbd.peer=127.0.0.1:") && last.contains(reason), "\(last)",
                    sourceLocation: sourceLocation)
        }
    }

    @Test func x509InQemuSpellingServesLibnbdAndQemuClientsAndRefusesTheRest() throws {
        let fixture = try QCOW2TLSFixture()
        let identity = tls.clientDN.replacingOccurrences(of: ",", with: ",,")
        let server = try ServerProcess(["-t", "-e", "4", "-f", "qcow2", "--handshake-timeout", "2",
                                        "--object", "tls-creds-x509,id=tls0,dir=\(tls.x509),endpoint=server",
                                        "--object", "authz-simple,id=auth0,identity=\(identity)",
                                        "--tls-creds", "tls0", "--tls-authz", "auth0", fixture.image])
        let good = tls.x509URI(port: server.port)
        expectServedOverTLS(good)

        // Reads through libnbd and qemu, byte for byte.
        let copy = fixture.scratch.file("copy.raw")
        try Tools.check("nbdcopy", [good, copy])
        #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == fixture.expected)
        let qemuCopy = fixture.scratch.file("qemu-copy.raw")
        try Tools.check("qemu-img", ["convert"] + QemuTLS.x509(tls.x509)
            + ["--image-opts", QemuTLS.imageOpts(port: server.port), "-O", "raw", qemuCopy])
        #expect(try Data(contentsOf: URL(fileURLWithPath: qemuCopy)) == fixture.expected)

        // Refusals, each followed by a good client.
        try expectRefused(server, "nbdinfo", [server.uri], reason: "TLS is required", refusalsBefore: 0)
        expectServedOverTLS(good, "after a plaintext client")
        try expectRefused(server, "nbdinfo", [tls.x509URI(port: server.port, directory: tls.untrustedClient)],
                          reason: "TLS handshake failed", refusalsBefore: 1)
        expectServedOverTLS(good, "after an untrusted certificate")
        try expectRefused(server, "nbdinfo", [tls.x509URI(port: server.port, directory: tls.otherClient)],
                          reason: "'\(tls.otherDN)' is not on the allow-list", refusalsBefore: 2)
        expectServedOverTLS(good, "after a DN not on the allow-list")
        let qemuPlain = try Tools.run("qemu-img", ["info", "-f", "raw", server.uri])
        #expect(!qemuPlain.succeeded, "qemu-img got in without TLS")
        #expect(server.waitForLog("Connection refused", count: 4).count == 4)

        // A client that stops after STARTTLS's ACK holds its connection until the handshake deadline only.
        let stalled = try RawClient(port: server.port)
        _ = try stalled.greet()
        try stalled.sendOption(.startTLS)
        #expect(try stalled.receiveOptionReplies().map(\.type) == [.ack])
        try stalled.send([0x16, 0x03, 0x01])  // the start of a ClientHello record, then nothing
        expectServedOverTLS(good, "while a client stalls mid-handshake")
        #expect(stalled.readUntilClosed(timeout: .seconds(10)).closed)
        expectServedOverTLS(good, "after a client stalled mid-handshake")

        // Writes through libnbd and qemu land in the image.
        try Tools.check("nbdcopy", [fixture.upload, good])
        try Tools.check("qemu-io", QemuTLS.x509(tls.x509)
            + ["--image-opts", QemuTLS.imageOpts(port: server.port), "-c", "write -P 0xc3 64k 192k"])
        #expect(server.stop() == 0)
        var want = try Data(contentsOf: URL(fileURLWithPath: fixture.upload))
        want.replaceSubrange((64 << 10)..<(256 << 10), with: Data(repeating: 0xc3, count: 192 << 10))
        #expect(try fixture.contents == want)
    }

    /// GnuTLS is loaded only by a server that sets up TLS: without it, none of its memory.
    @Test func gnutlsIsMappedOnlyWhenTLSIsSetUp() throws {
        let fixture = try QCOW2TLSFixture()
        // grep, not Foundation: /proc files report size 0, and Foundation may stop reading early.
        func mapsGnuTLS(_ server: ServerProcess) throws -> Bool {
            try Tools.run("grep", ["-q", "libgnutls", "/proc/\(server.pid)/maps"]).succeeded
        }
        let plain = try ServerProcess(["-t", "-r", fixture.image])
        #expect(try Tools.run("nbdinfo", ["--size", plain.uri]).succeeded)
        #expect(try !mapsGnuTLS(plain))
        let withTLS = try ServerProcess(["-t", "-r", "--tls-psk", tls.pskFile, fixture.image])
        expectServedOverTLS(tls.pskURI(port: withTLS.port))
        #expect(try mapsGnuTLS(withTLS))
    }

    @Test func pskServesLibnbdAndQemuClientsAndRefusesWrongKeys() throws {
        let fixture = try QCOW2TLSFixture()
        let server = try ServerProcess(["-t", "-e", "4", "--tls-psk", tls.pskFile, fixture.image])
        let good = tls.pskURI(port: server.port)
        expectServedOverTLS(good)
        let copy = fixture.scratch.file("copy.raw")
        try Tools.check("nbdcopy", [good, copy])
        #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == fixture.expected)
        let qemuCopy = fixture.scratch.file("qemu-copy.raw")
        try Tools.check("qemu-img", ["convert"] + QemuTLS.psk(tls.pskDirectory)
            + ["--image-opts", QemuTLS.imageOpts(port: server.port), "-O", "raw", qemuCopy])
        #expect(try Data(contentsOf: URL(fileURLWithPath: qemuCopy)) == fixture.expected)

        try expectRefused(server, "nbdinfo", [tls.pskURI(port: server.port, file: tls.wrongKey)],
                          reason: "TLS handshake failed", refusalsBefore: 0)
        expectServedOverTLS(good, "after a wrong key")
        try expectRefused(server, "nbdinfo", [tls.pskURI(port: server.port, user: "bob", file: tls.unknownUser)],
                          reason: "unknown PSK username 'bob'", refusalsBefore: 1)
        expectServedOverTLS(good, "after an unknown user")
        try expectRefused(server, "nbdinfo", [server.uri], reason: "TLS is required", refusalsBefore: 2)
        expectServedOverTLS(good, "after a plaintext client")

        try Tools.check("nbdcopy", [fixture.upload, good])
        try Tools.check("qemu-io", QemuTLS.psk(tls.pskDirectory)
            + ["--image-opts", QemuTLS.imageOpts(port: server.port), "-c", "write -P 0x3c 1M 4k"])
        #expect(server.stop() == 0)
        var want = try Data(contentsOf: URL(fileURLWithPath: fixture.upload))
        want.replaceSubrange((1 << 20)..<((1 << 20) + 4096), with: Data(repeating: 0x3c, count: 4096))
        #expect(try fixture.contents == want)
    }

    @Test func onModeOverAUnixSocketServesTLSAndPlaintextClients() throws {
        let fixture = try QCOW2TLSFixture()
        let socket = fixture.scratch.file("nbd.sock")
        // ServerProcess knows TCP ports only; a Unix socket server says where it listens in its log.
        let server = try SpawnedProcess(ServerProcess.binary, ["-t", "-v", "-e", "2", "-k", socket, "--tls=on",
                                                               "--tls-certificates", tls.x509, fixture.image],
                                        logPath: fixture.scratch.file("server.log"))
        let deadline = Date().addingTimeInterval(30)
        while !server.log.contains("Server listening") && server.exited == nil && Date() < deadline { usleep(10_000) }
        try #require(server.log.contains("Server listening"), "\(server.log)")
        let overTLS = try Tools.check("nbdinfo", ["--json",
            "nbds+unix:///?socket=\(socket)&tls-certificates=\(tls.x509)&tls-hostname=localhost"])
        #expect(overTLS.contains("\"TLS\": true"))
        let plain = try Tools.check("nbdinfo", ["--json", "nbd+unix:///?socket=\(socket)"])
        #expect(plain.contains("\"TLS\": false"))
        let copy = fixture.scratch.file("copy.raw")
        try Tools.check("nbdcopy", ["nbds+unix:///?socket=\(socket)&tls-certificates=\(tls.x509)&tls-hostname=localhost",
                                    copy])
        #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == fixture.expected)
        server.send(SIGTERM)
        #expect(server.waitForExit(timeout: .seconds(30)) == .exited(0))
    }
}
