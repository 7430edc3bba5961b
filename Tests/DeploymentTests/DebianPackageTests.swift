import Foundation
import Testing
import TestSupport

/// `make deb` packages what `make install` installs, with Debian's paths, and the package
/// installs into an empty root with dpkg. Built from the debug binary (BINARY=), as a release
/// build would take minutes: that binary finds the Swift runtime through a RUNPATH into the
/// toolchain, so dpkg-shlibdeps is shown the toolchain's libraries, and lintian's
/// custom-library-search-path is the one error expected of it (a release build, which links
/// the runtime in, has none).
@Suite struct DebianPackageTests {
    /// Every path in the package, as `dpkg-deb -c` lists files.
    static let packagedFiles: Set<String> = [
        "usr/bin/swiftnbd",
        "lib/systemd/system/swiftnbd@.service",
        "lib/systemd/system/swiftnbd.service",
        "lib/systemd/system/swiftnbd.socket",
        "usr/lib/sysusers.d/swiftnbd.conf",
        "usr/lib/tmpfiles.d/swiftnbd.conf",
        "usr/lib/firewalld/services/swiftnbd.xml",
        "usr/share/man/man1/swiftnbd.1.gz",
        "usr/share/bash-completion/completions/swiftnbd",
        "usr/share/zsh/vendor-completions/_swiftnbd",
        "usr/share/fish/vendor_completions.d/swiftnbd.fish",
        "usr/share/doc/swiftnbd/copyright",
        "etc/swiftnbd/tls.conf",
        "usr/share/doc/swiftnbd/changelog.gz",
        "etc/swiftnbd/example.conf",
    ]

    /// The debug binary's RUNPATH entries that are absolute folders (the toolchain's runtime).
    static func toolchainLibraryFolders() throws -> [String] {
        let dynamic = try Tools.check("readelf", ["-d", Paths.serverBinary])
        guard let match = try /RUNPATH\)\s+Library runpath: \[([^\]]*)\]/.firstMatch(in: dynamic) else { return [] }
        return match.output.1.split(separator: ":").map(String.init).filter { $0.hasPrefix("/") }
    }

    /// `make deb` into `scratch`; returns the package's path.
    static func build(in scratch: TemporaryDirectory) throws -> String {
        let shlibdeps = try toolchainLibraryFolders().map { "-l\($0)" } + ["--ignore-missing-info"]
        try Tools.check("make", ["-C", Paths.repoRoot, "--no-print-directory", "deb", "SCRATCH=\(scratch.path)",
                                 "BINARY=\(Paths.serverBinary)", "DEBFLAGS=-Zgzip -z1",
                                 "SHLIBDEPSFLAGS=\(shlibdeps.joined(separator: " "))"])
        let debs = try FileManager.default.contentsOfDirectory(atPath: scratch.path).filter { $0.hasSuffix(".deb") }
        #expect(debs == ["swiftnbd_0.1.0_amd64.deb"])
        return scratch.file(try #require(debs.first))
    }

    /// One package, built once (it takes a while), then listed, installed and linted.
    @Test func packageBuildsInstallsAndPassesLintian() throws {
        let scratch = try TemporaryDirectory("swiftnbd-deb")
        let deb = try Self.build(in: scratch)
        try checkContents(deb)
        try checkInstall(deb)
        try checkLintian(deb)
    }

    /// The installed files with Debian's paths, owned by root; Depends names the libraries linked.
    func checkContents(_ deb: String) throws {
        let listing = try Tools.check("dpkg-deb", ["-c", deb])
        var files: Set<String> = []
        for line in listing.split(separator: "\n") where line.hasPrefix("-") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            #expect(fields[1] == "root/root", "\(line)")
            files.insert(String(fields.last!.dropFirst(2)))  // "./usr/bin/swiftnbd"
        }
        #expect(files == Self.packagedFiles)

        let depends = try Tools.check("dpkg-deb", ["-f", deb, "Depends"])
        for library in ["libc6", "zlib1g", "libzstd1", "libgnutls30"] {
            #expect(depends.contains(library), "Depends: \(depends)")
        }
        let conffiles = try Tools.check("sh", ["-c", "dpkg-deb --ctrl-tarfile '\(deb)' | tar -xO ./conffiles"])
        #expect(conffiles == "/etc/swiftnbd/example.conf\n/etc/swiftnbd/tls.conf\n")
    }

    /// Unpacked and configured by dpkg into an empty root: the units name /usr/bin/swiftnbd,
    /// and postinst (run chrootless, with DPKG_ROOT) makes the swiftnbd user and its folder there.
    func checkInstall(_ deb: String) throws {
        let root = try TemporaryDirectory("swiftnbd-dpkg-root")
        for folder in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            try FileManager.default.createDirectory(atPath: root.file(folder), withIntermediateDirectories: true)
        }
        FileManager.default.createFile(atPath: root.file("var/lib/dpkg/status"), contents: nil)
        // Only the package's own dependencies are missing from the empty root.
        try Tools.check("dpkg", ["--root=\(root.path)", "--force-depends", "--force-script-chrootless", "-i", deb])
        let status = try Tools.check("dpkg", ["--root=\(root.path)", "-s", "swiftnbd"])
        #expect(status.contains("Status: install ok installed"))
        let unit = try String(contentsOfFile: root.file("lib/systemd/system/swiftnbd@.service"), encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/bin/swiftnbd --backing-dir /var/lib/swiftnbd $SWIFTNBD_OPTS $SWIFTNBD_TLS_OPTS ${IMAGE}\n"))
        let passwd = try String(contentsOfFile: root.file("etc/passwd"), encoding: .utf8)
        #expect(passwd.contains("swiftnbd:x:"), "\(passwd)")
        #expect(FileManager.default.fileExists(atPath: root.file("var/lib/swiftnbd")))
        let installed = root.file("usr/bin/swiftnbd")
        #expect(try Tools.check(installed, ["--version"]) == "0.1.0\n")
    }

    func checkLintian(_ deb: String) throws {
        let result = try Tools.run("lintian", ["--allow-root", deb])
        let errors = result.stdout.split(separator: "\n").filter { $0.hasPrefix("E:") }
        let unexpected = errors.filter { !$0.contains("custom-library-search-path") }
        #expect(unexpected.isEmpty, "\(result.stdout)")
        // The expected error is there exactly when the binary has a toolchain RUNPATH: lintian did look.
        let linksToolchain = try !Self.toolchainLibraryFolders().isEmpty
        #expect(errors.contains { $0.contains("custom-library-search-path") } == linksToolchain, "\(result.stdout)")
        #expect(result.stderr.isEmpty || !result.stderr.contains("internal error"), "\(result.stderr)")
    }
}
