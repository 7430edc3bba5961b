import Foundation
import Testing
import TestSupport

/// `make install` puts every file where systemd, firewalld and man look, and `make uninstall`
/// takes exactly those away. BINARY= installs the debug build, so no release build is needed.
@Suite struct InstallTests {
    /// Every file `make install` creates, relative to DESTDIR, with the default PREFIX.
    static let installedFiles: Set<String> = [
        "usr/local/bin/swiftnbd",
        "usr/local/lib/systemd/system/swiftnbd@.service",
        "usr/local/lib/systemd/system/swiftnbd.service",
        "usr/local/lib/systemd/system/swiftnbd.socket",
        "usr/local/lib/sysusers.d/swiftnbd.conf",
        "usr/local/lib/tmpfiles.d/swiftnbd.conf",
        "usr/local/share/man/man1/swiftnbd.1",
        "usr/local/share/bash-completion/completions/swiftnbd",
        "usr/local/share/zsh/site-functions/_swiftnbd",
        "usr/local/share/fish/vendor_completions.d/swiftnbd.fish",
        "etc/firewalld/services/swiftnbd.xml",
        "etc/swiftnbd/example.conf",
        "etc/swiftnbd/tls.conf",
    ]

    static func make(_ arguments: [String]) throws {
        try Tools.check("make", ["-C", Paths.repoRoot, "--no-print-directory"] + arguments)
    }

    /// Regular files and links under `root`, as paths relative to it.
    static func files(under root: String) -> Set<String> {
        let enumerator = FileManager.default.enumerator(atPath: root)
        var found: Set<String> = []
        while let path = enumerator?.nextObject() as? String {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: root + "/" + path, isDirectory: &isDirectory), !isDirectory.boolValue {
                found.insert(path)
            }
        }
        return found
    }

    @Test func installIntoDestdirThenUninstallLeavesNothing() throws {
        let destdir = try TemporaryDirectory("swiftnbd-destdir")
        try Self.make(["install", "DESTDIR=\(destdir.path)", "BINARY=\(Paths.serverBinary)"])

        #expect(Self.files(under: destdir.path) == Self.installedFiles)
        let installed = destdir.file("usr/local/bin/swiftnbd")
        #expect(FileManager.default.isExecutableFile(atPath: installed))
        #expect(FileManager.default.contentsEqual(atPath: installed, andPath: Paths.serverBinary))
        for unit in Paths.unitNames {
            let shipped = try String(contentsOfFile: Paths.repo("systemd/\(unit)"), encoding: .utf8)
            let text = try String(contentsOfFile: destdir.file("usr/local/lib/systemd/system/\(unit)"), encoding: .utf8)
            #expect(text == shipped, "\(unit): the default PREFIX needs no rewriting")
        }
        let permissions = try FileManager.default.attributesOfItem(
            atPath: destdir.file("usr/local/lib/systemd/system/swiftnbd.socket"))[.posixPermissions] as? Int
        #expect(permissions == 0o644)

        // An admin's export config is not ours to remove.
        try "IMAGE=/var/lib/swiftnbd/centos6.img\n".write(toFile: destdir.file("etc/swiftnbd/centos6.conf"),
                                                            atomically: true, encoding: .utf8)
        try Self.make(["uninstall", "DESTDIR=\(destdir.path)"])
        #expect(Self.files(under: destdir.path) == ["etc/swiftnbd/centos6.conf"])

        try FileManager.default.removeItem(atPath: destdir.file("etc/swiftnbd/centos6.conf"))
        try Self.make(["install", "DESTDIR=\(destdir.path)", "BINARY=\(Paths.serverBinary)"])
        try Self.make(["uninstall", "DESTDIR=\(destdir.path)"])
        #expect(Self.files(under: destdir.path).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: destdir.file("etc/swiftnbd")), "its own config folder goes too")
    }

    /// Installed under another PREFIX and SYSCONFDIR, the units name the installed binary and
    /// config folder, and verify against the installed man page.
    @Test func unitsInstalledUnderAnotherPrefixVerify() throws {
        let root = try TemporaryDirectory("swiftnbd-prefix")
        let variables = ["PREFIX=\(root.file("usr"))", "SYSCONFDIR=\(root.file("etc"))",
                         "BINARY=\(Paths.serverBinary)"]
        try Self.make(["install"] + variables)

        let unitDir = root.file("usr/lib/systemd/system")
        let template = try String(contentsOfFile: unitDir + "/swiftnbd@.service", encoding: .utf8)
        #expect(template.contains(
            "ExecStart=\(root.file("usr/bin/swiftnbd")) --backing-dir /var/lib/swiftnbd $SWIFTNBD_OPTS $SWIFTNBD_TLS_OPTS ${IMAGE}\n"))
        #expect(template.contains("EnvironmentFile=\(root.file("etc/swiftnbd"))/%i.conf\n"))
        // The TLS drop-in reads its keys from the installed config folder.
        let dropIn = try String(contentsOfFile: root.file("etc/swiftnbd/tls.conf"), encoding: .utf8)
        #expect(dropIn.contains("LoadCredential=server-key.pem:\(root.file("etc/swiftnbd"))/tls/server-key.pem\n"))
        #expect(FileManager.default.fileExists(atPath: root.file("etc/firewalld/services/swiftnbd.xml")))

        try FileManager.default.copyItem(atPath: unitDir + "/swiftnbd@.service",
                                         toPath: root.file("swiftnbd@centos6.service"))
        let units = Paths.unitNames.map { unitDir + "/" + $0 } + [root.file("swiftnbd@centos6.service")]
        let result = try Tools.run("systemd-analyze", ["verify"] + units,
                                   environment: ["MANPATH": root.file("usr/share/man")])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stderr.isEmpty, "\(result.stderr)")

        try Self.make(["uninstall"] + variables)
        #expect(Self.files(under: root.path) == ["swiftnbd@centos6.service"])
    }

    /// The installed sysusers.d and tmpfiles.d entries make the unprivileged user and the one
    /// folder the units may write, owned by it (checked offline with --root=DESTDIR).
    @Test func installedSysusersAndTmpfilesCreateTheUserAndItsFolder() throws {
        let root = try TemporaryDirectory("swiftnbd-sysroot")
        try Self.make(["install", "DESTDIR=\(root.path)", "BINARY=\(Paths.serverBinary)"])
        try Tools.check("systemd-sysusers", ["--root=\(root.path)"])
        try Tools.check("systemd-tmpfiles", ["--root=\(root.path)", "--create", "swiftnbd.conf"])

        let passwd = try String(contentsOfFile: root.file("etc/passwd"), encoding: .utf8)
        let entry = try #require(passwd.split(separator: "\n").first { $0.hasPrefix("swiftnbd:") }, "\(passwd)")
        let fields = entry.split(separator: ":", omittingEmptySubsequences: false)
        #expect(fields.count == 7)
        let uid = try #require(Int(fields[2]))
        #expect(uid > 0 && uid < 1000, "a system user, not root or a login user: \(entry)")
        #expect(fields[5] == "/var/lib/swiftnbd")
        #expect(fields[6].hasSuffix("nologin"))

        let folder = try FileManager.default.attributesOfItem(atPath: root.file("var/lib/swiftnbd"))
        #expect(folder[.ownerAccountID] as? Int == uid)
        #expect(folder[.posixPermissions] as? Int == 0o750)
    }

    @Test func manPageRendersWithoutWarnings() throws {
        let result = try Tools.run("man", ["--warnings", "-l", Paths.repo("man/swiftnbd.1")],
                                   environment: ["MANWIDTH": "80", "LC_ALL": "C"])
        #expect(result.status == 0)
        #expect(result.stderr.isEmpty, "\(result.stderr)")
        for topic in ["LISTEN_FDS", "EXIT STATUS", "SIGTERM", "SIGHUP", "--format=raw"] {
            #expect(result.stdout.contains(topic), "swiftnbd(1) does not mention \(topic)")
        }
    }

    /// The options of the built CLI, each as its names (`-t`, `--persistent`), from argument-parser's own dump.
    static func cliOptions() throws -> [[(kind: String, name: String)]] {
        struct Help: Decodable {
            struct Command: Decodable { var arguments: [Argument] }
            struct Argument: Decodable { var names: [Name]? }
            struct Name: Decodable { var kind: String; var name: String }
            var command: Command
        }
        let json = try Tools.check(Paths.serverBinary, ["--experimental-dump-help"])
        let help = try JSONDecoder().decode(Help.self, from: Data(json.utf8))
        return help.command.arguments.compactMap(\.names).filter { !$0.isEmpty }.map { $0.map { ($0.kind, $0.name) } }
    }

    static func renderedManPage() throws -> String {
        try Tools.check("man", ["-l", Paths.repo("man/swiftnbd.1")], environment: ["MANWIDTH": "200", "LC_ALL": "C"])
    }

    /// The hand-written page lists every option the built CLI has, spelled as `-s, --long`,
    /// so the two cannot drift apart unnoticed.
    @Test func manPageCoversEveryOptionOfTheCLI() throws {
        let page = try Self.renderedManPage()
        let names = try Self.cliOptions()
        #expect(names.count >= 20, "dump-help listed only \(names.count) options")
        for name in names {
            let short = name.first { $0.kind == "short" }.map { "-\($0.name)" }
            let long = name.first { $0.kind == "long" }.map { "--\($0.name)" }
            let spelled = [short, long].compactMap { $0 }.joined(separator: ", ")
            #expect(page.contains(spelled), "swiftnbd(1) lacks \(spelled)")
        }
    }

    /// And the other way round: every option the page's OPTIONS section describes is one the CLI takes.
    @Test func manPageDescribesNoOptionTheCLILacks() throws {
        let page = try Self.renderedManPage()
        let start = try #require(page.range(of: "\nOPTIONS\n"))
        let end = try #require(page.range(of: "\n[A-Z][A-Z ]+\n", options: .regularExpression,
                                          range: start.upperBound..<page.endIndex))
        // Option tags are the lines indented once (7 columns); their descriptions are indented further.
        let tags = page[start.upperBound..<end.lowerBound].split(separator: "\n")
            .filter { $0.hasPrefix("       -") }
        var described: Set<String> = []
        for tag in tags {
            for match in tag.matches(of: /(?:^|[ ,])(--?[A-Za-z][A-Za-z-]*)/) { described.insert(String(match.1)) }
        }
        let known = Set(try Self.cliOptions().flatMap { $0 }.map { $0.kind == "long" ? "--\($0.name)" : "-\($0.name)" })
        #expect(described.count >= 25, "found only \(described.sorted()) in OPTIONS")
        #expect(described.contains("--metrics-file"))
        #expect(described.subtracting(known).isEmpty,
                "swiftnbd(1) describes options the CLI lacks: \(described.subtracting(known).sorted())")
    }

    /// The completions argument-parser generates are installed and load: bash registers one for
    /// swiftnbd, and the zsh and fish scripts know the newest options.
    @Test func installedCompletionsLoad() throws {
        let destdir = try TemporaryDirectory("swiftnbd-completions")
        try Self.make(["install", "DESTDIR=\(destdir.path)", "BINARY=\(Paths.serverBinary)"])
        let bash = destdir.file("usr/local/share/bash-completion/completions/swiftnbd")
        let registered = try Tools.check("bash", ["-c", "source '\(bash)' && complete -p swiftnbd"])
        #expect(registered.contains("swiftnbd"), "\(registered)")
        for script in [bash, destdir.file("usr/local/share/zsh/site-functions/_swiftnbd"),
                       destdir.file("usr/local/share/fish/vendor_completions.d/swiftnbd.fish")] {
            let text = try String(contentsOfFile: script, encoding: .utf8)
            #expect(text.contains("metrics-file") && text.contains("read-only"), "\(script)")
        }
    }
}
