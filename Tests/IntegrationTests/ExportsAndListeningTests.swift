import Foundation
import TestSupport
import Testing

/// Several exports in one process, listening on both address families, and
/// qemu-nbd 10's spellings, through the real binary and real clients.
@Suite struct ExportsAndListeningTests {
    @Test func severalExportsAreListedAndEachServesItsFile() throws {
        let raw = try RawFixture(size: 4 << 20)
        let qcow2 = raw.scratch.file("disk.qcow2")
        try ImageFactory.create(qcow2, format: "qcow2", size: "8M")
        try ImageFactory.io(qcow2, format: "qcow2", ["write -P 0x3c 1M 64k"])
        let server = try ServerProcess([
            "-t", "-e", "0",
            "--export", "name=plain,file=\(raw.image),description=the raw disk",
            "--export", "name=guest,file=\(qcow2),format=qcow2,readonly=on,description=a qcow2,, read-only",
        ])
        let listing = try Tools.check("nbdinfo", ["--list", "--json", server.uri])
        let exports = try #require((try jsonObject(listing) as? [String: Any])?["exports"] as? [[String: Any]])
        #expect(exports.map { $0["export-name"] as? String } == ["plain", "guest"])
        #expect(exports.map { $0["description"] as? String } == ["the raw disk", "a qcow2, read-only"])

        let plain = try NBDClient(uri: server.uri + "/plain")
        #expect(Data(try plain.readAll()) == (try raw.contents))
        let guest = try NBDClient(uri: server.uri + "/guest")
        let expected = try ImageFactory.rawContents(of: qcow2, format: "qcow2", scratch: raw.scratch)
        #expect(Data(try guest.readAll()) == expected)
        #expect(guest.isReadOnly && !plain.isReadOnly)
        #expect(throws: NBDClientError.self) { try guest.pwrite([1, 2, 3], offset: 0) }
        // The empty name is the first export.
        #expect(try NBDClient(uri: server.uri).size == Int64(raw.size))
        #expect(throws: (any Error).self) { _ = try NBDClient(uri: server.uri + "/nope") }
    }

    @Test func thePositionalImageComesFirstAndExportsFollow() throws {
        let raw = try RawFixture(size: 1 << 20)
        let other = try RawFixture(size: 2 << 20)
        let server = try ServerProcess(["-t", "-e", "2", "-x", "main", raw.image,
                                        "--export", "name=second,file=\(other.image)"])
        #expect(try NBDClient(uri: server.uri).size == 1 << 20)
        #expect(try NBDClient(uri: server.uri + "/second").size == 2 << 20)
    }

    @Test(arguments: [
        (["--export", "name=x"], "name= and file= are required"),
        (["--export", "name=x,file=/nonexistent/disk.raw"], "/nonexistent/disk.raw"),
        (["--export", "name=x,file=/dev/null,colour=red"], "unknown key 'colour'"),
    ])
    func badExportsStopTheServerWithOneLine(arguments: [String], message: String) throws {
        let result = try Tools.run(ServerProcess.binary, ["-p", "0", "-b", "127.0.0.1"] + arguments)
        #expect(result.status == 1)
        #expect(result.stderr.contains(message), "stderr: \(result.stderr)")
    }

    @Test func withoutBindBothFamiliesAreServed() throws {
        // In a network namespace of its own only loopback exists, so listening everywhere stays local.
        let raw = try RawFixture(size: 1 << 20)
        let script = """
            set -e
            ip link set lo up
            '\(ServerProcess.binary)' -t -p 10809 '\(raw.image)' &
            server=$!
            for i in $(seq 200); do nbdinfo --size nbd://127.0.0.1:10809 >/dev/null 2>&1 && break; sleep 0.05; done
            v4=$(nbdinfo --size nbd://127.0.0.1:10809)
            v6=$(nbdinfo --size 'nbd://[::1]:10809')
            kill $server
            wait $server || true
            echo "$v4 $v6"
            """
        let result = try Tools.run("unshare", ["-n", "sh", "-c", script])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1048576 1048576")
    }

    @Test func ipv6LiteralsBindWithOrWithoutBrackets() throws {
        let raw = try RawFixture(size: 1 << 20)
        for literal in ["::1", "[::1]"] {
            let result = try Tools.run("unshare", ["-n", "sh", "-c", """
                ip link set lo up
                '\(ServerProcess.binary)' -t -b '\(literal)' -p 10809 '\(raw.image)' &
                for i in $(seq 200); do nbdinfo --size 'nbd://[::1]:10809' 2>/dev/null && break; sleep 0.05; done
                kill $!
                """])
            #expect(result.stdout.contains("1048576"), "-b \(literal): \(result.stderr)")
        }
    }

    @Test func qemuNBD10SpellingsAreAccepted() throws {
        let raw = try RawFixture(size: 1 << 20)
        let server = try ServerProcess(["-t", "-n", "--handshake-limit", "1", raw.image])
        let silent = try RawClient(port: server.port)
        _ = try silent.receive(18)
        let dropped = silent.readUntilClosed(timeout: .seconds(5))
        #expect(dropped.closed, "--handshake-limit 1 drops a silent client")
        #expect(try NBDClient(uri: server.uri).size == 1 << 20)
    }
}
