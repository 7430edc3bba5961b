import Foundation
import Testing
import TestSupport

/// The units in systemd/ load cleanly in systemd's own checker, against the built binary
/// and the shipped man page.
@Suite struct UnitFileTests {
    /// Copies the shipped units to a scratch folder with ExecStart pointing at `binary`, and
    /// the man page to scratch/man/man1, so `Documentation=man:swiftnbd(1)` resolves too.
    static func stage(binary: String = Paths.serverBinary) throws -> TemporaryDirectory {
        let scratch = try TemporaryDirectory("swiftnbd-units")
        for name in Paths.unitNames {
            let text = try String(contentsOfFile: Paths.repo("systemd/\(name)"), encoding: .utf8)
            try text.replacingOccurrences(of: Paths.shippedBinaryPath, with: binary)
                .write(toFile: scratch.file(name), atomically: true, encoding: .utf8)
        }
        try FileManager.default.createDirectory(atPath: scratch.file("man/man1"), withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Paths.repo("man/swiftnbd.1"), toPath: scratch.file("man/man1/swiftnbd.1"))
        return scratch
    }

    static func verify(_ units: [String], manPath: String) throws -> Tools.Result {
        try Tools.run("systemd-analyze", ["verify"] + units, environment: ["MANPATH": manPath])
    }

    @Test func shippedUnitsNameTheBinaryTheMakefileInstalls() throws {
        for name in Paths.unitNames where name.hasSuffix(".service") {
            let text = try String(contentsOfFile: Paths.repo("systemd/\(name)"), encoding: .utf8)
            #expect(text.contains(
                "ExecStart=\(Paths.shippedBinaryPath) --backing-dir /var/lib/swiftnbd $SWIFTNBD_OPTS $SWIFTNBD_TLS_OPTS ${IMAGE}\n"),
                    "\(name)")
        }
    }

    @Test func everyUnitVerifiesWithoutWarnings() throws {
        #expect(FileManager.default.isExecutableFile(atPath: Paths.serverBinary), "\(Paths.serverBinary)")
        let scratch = try Self.stage()
        // The template is checked as an instance, the way `systemctl enable swiftnbd@centos6` loads it.
        try FileManager.default.copyItem(atPath: scratch.file("swiftnbd@.service"),
                                         toPath: scratch.file("swiftnbd@centos6.service"))
        let units = ["swiftnbd@.service", "swiftnbd@centos6.service", "swiftnbd.service", "swiftnbd.socket"]
        let result = try Self.verify(units.map(scratch.file), manPath: scratch.file("man"))
        #expect(result.status == 0, "\(result.stderr)")
        // verify exits 0 on unknown keys and bad values; they only show up as warnings.
        #expect(result.stderr.isEmpty, "\(result.stderr)")
        #expect(result.stdout.isEmpty, "\(result.stdout)")
    }

    /// The TLS drop-in loads cleanly on an instance, next to the units (as under /etc/systemd/system).
    @Test func tlsDropInVerifiesWithoutWarnings() throws {
        let scratch = try Self.stage()
        try FileManager.default.copyItem(atPath: scratch.file("swiftnbd@.service"),
                                         toPath: scratch.file("swiftnbd@centos6.service"))
        try FileManager.default.createDirectory(atPath: scratch.file("swiftnbd@centos6.service.d"),
                                                withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Paths.repo("systemd/tls.conf"),
                                         toPath: scratch.file("swiftnbd@centos6.service.d/tls.conf"))
        let result = try Self.verify([scratch.file("swiftnbd@centos6.service")], manPath: scratch.file("man"))
        #expect(result.status == 0 && result.stderr.isEmpty && result.stdout.isEmpty, "\(result.stderr)")
    }

    /// What systemd does with the drop-in, done by hand: each LoadCredential=ID:PATH file is copied
    /// to the credentials directory as ID, %d becomes that directory, and the server started with
    /// $SWIFTNBD_TLS_OPTS serves a TLS client. So the credential names are the files the server reads.
    @Test func tlsDropInCredentialsServeATLSClient() throws {
        let tls = TLSFixture.shared
        let scratch = try TemporaryDirectory("swiftnbd-credentials")
        let credentials = scratch.file("credentials")
        try FileManager.default.createDirectory(atPath: credentials, withIntermediateDirectories: true)
        let lines = try String(contentsOfFile: Paths.repo("systemd/tls.conf"), encoding: .utf8).split(separator: "\n")
        let loads = lines.filter { $0.hasPrefix("LoadCredential=") }.map { $0.dropFirst("LoadCredential=".count) }
        #expect(loads.count == 3)
        for load in loads {
            let parts = load.split(separator: ":", maxSplits: 1).map(String.init)
            #expect(parts[1].hasPrefix("/etc/swiftnbd/tls/"), "keys live in /etc/swiftnbd/tls: \(load)")
            let source = tls.x509 + "/" + URL(fileURLWithPath: parts[1]).lastPathComponent
            try FileManager.default.copyItem(atPath: source, toPath: credentials + "/" + parts[0])
        }
        let environment = try #require(lines.first { $0.hasPrefix("Environment=SWIFTNBD_TLS_OPTS=") })
        let options = environment.dropFirst("Environment=SWIFTNBD_TLS_OPTS=".count)
            .replacingOccurrences(of: "%d", with: credentials).split(separator: " ").map(String.init)
        let image = scratch.file("disk.raw")
        try ImageFactory.create(image, format: "raw", size: "1M")
        let server = try ServerProcess(["-t"] + options + [image])
        let plain = try Tools.run("nbdinfo", [server.uri])
        #expect(!plain.succeeded, "the drop-in makes TLS required")
        let info = try Tools.check("nbdinfo", ["--json", "nbds://127.0.0.1:\(server.port)/?tls-certificates=\(tls.x509)"])
        #expect(info.contains("\"TLS\": true"))
    }

    /// The check above has teeth: a missing binary or man page fails it.
    @Test func verifyFailsWithoutTheBinaryOrTheManPage() throws {
        let scratch = try Self.stage(binary: "/nonexistent/swiftnbd")
        let noBinary = try Self.verify([scratch.file("swiftnbd.service")], manPath: scratch.file("man"))
        #expect(noBinary.status != 0)
        #expect(noBinary.stderr.contains("/nonexistent/swiftnbd"), "\(noBinary.stderr)")

        let withBinary = try Self.stage()
        let noMan = try Self.verify([withBinary.file("swiftnbd.service")], manPath: withBinary.file("nowhere"))
        #expect(noMan.status != 0)
        #expect(noMan.stderr.contains("swiftnbd(1)"), "\(noMan.stderr)")
    }

    /// `systemd-analyze security` rates the sandbox; 2.0 or less is its "OK" band.
    @Test(arguments: ["swiftnbd@.service", "swiftnbd.service"])
    func servicesAreHardened(unit: String) throws {
        let scratch = try Self.stage()
        let result = try Tools.run("systemd-analyze",
                                   ["security", "--offline=yes", "--threshold=20", scratch.file(unit)],
                                   environment: ["MANPATH": scratch.file("man")])
        let summary = result.stdout.split(separator: "\n").last(where: { $0.contains("Overall exposure") }) ?? ""
        #expect(result.status == 0, "\(summary)\n\(result.stderr)")
        #expect(summary.contains("OK"), "\(summary)")
    }

    /// The settings the deployment promises, present in both services.
    @Test(arguments: ["swiftnbd@.service", "swiftnbd.service"])
    func servicesCarryThePromisedSettings(unit: String) throws {
        let lines = Set(try String(contentsOfFile: Paths.repo("systemd/\(unit)"), encoding: .utf8)
            .split(separator: "\n").map(String.init))
        for required in ["User=swiftnbd", "ProtectSystem=strict", "ReadWritePaths=-/var/lib/swiftnbd",
                         "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
                         "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet=",
                         "SystemCallFilter=@system-service", "Restart=on-failure",
                         "StandardError=journal"] {
            #expect(lines.contains(required), "\(unit) lacks \(required)")
        }
    }

    @Test func socketListensOnTheNBDPortAndHandsOverOneListener() throws {
        let lines = Set(try String(contentsOfFile: Paths.repo("systemd/swiftnbd.socket"), encoding: .utf8)
            .split(separator: "\n").map(String.init))
        #expect(lines.contains("ListenStream=10809"))
        #expect(lines.contains("Accept=no"))
    }
}
