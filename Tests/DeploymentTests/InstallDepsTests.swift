import Foundation
import Testing
import TestSupport

/// `scripts/install-deps.sh SET...`: serve.sh's sets (runtime, build, demo) hold what building
/// and serving need and nothing only the tests need; the test set holds everything.
@Suite struct InstallDepsTests {
    static func packages(_ sets: String...) throws -> Set<String> {
        let listing = try Tools.check(Paths.repo("scripts/install-deps.sh"), ["--list"] + sets)
        return Set(listing.split(separator: "\n").map(String.init))
    }

    /// The Debian package owning `path`, trying the other spelling under merged /usr.
    static func owner(of path: String) throws -> String? {
        let other = path.hasPrefix("/usr/") ? String(path.dropFirst(4)) : "/usr" + path
        for candidate in [path, other] {
            let result = try Tools.run("dpkg", ["-S", candidate])
            if result.succeeded, let line = result.stdout.split(separator: "\n").first,
               let colon = line.firstIndex(of: ":") {
                return String(line[..<colon])
            }
        }
        return nil
    }

    @Test func serveSetsHoldNoTestOnlyPackage() throws {
        let serve = try Self.packages("runtime", "build", "demo")
        let test = try Self.packages("test")
        #expect(serve.isSubset(of: test), "test lacks \(serve.subtracting(test).sorted())")
        #expect(try Self.packages() == test, "no set means the test set")
        // The heavy and test-only tools: clients, reference servers, the guest kernel, packaging checks.
        let testOnly: Set = ["libnbd-dev", "libnbd-bin", "python3-libnbd", "nbdkit", "fio", "libguestfs-tools",
                             "linux-image-amd64", "strace", "firewalld", "lintian", "python3-prometheus-client"]
        #expect(testOnly.isSubset(of: test))
        #expect(serve.isDisjoint(with: testOnly), "serve.sh would install \(serve.intersection(testOnly).sorted())")
        #expect(serve.count <= 8, "\(serve.sorted())")
    }

    /// Every library the server links comes from a runtime package (or from the base system
    /// every Debian has); the toolchain's own libraries of a debug build don't count.
    @Test func runtimeSetHoldsTheLibrariesTheServerLinks() throws {
        let runtime = try Self.packages("runtime")
        let base: Set = ["libc6", "libgcc-s1", "libstdc++6"]
        // The libraries the binary names itself (DT_NEEDED); theirs come with their packages.
        let needed = Set(try Tools.check("readelf", ["-d", Paths.serverBinary]).split(separator: "\n").compactMap {
            try? /\(NEEDED\).*\[(\S+)\]/.firstMatch(in: $0).map { String($0.output.1) }
        })
        var owners: Set<String> = []
        for line in try Tools.check("ldd", [Paths.serverBinary]).split(separator: "\n") {
            guard let name = line.split(separator: " ").first.map({ String($0.trimmingCharacters(in: .whitespaces)) }),
                  needed.contains(name),
                  let match = try /=> (\/\S+)/.firstMatch(in: line) else { continue }
            let path = String(match.output.1)
            if let owner = try Self.owner(of: path) { owners.insert(owner.split(separator: ":").first.map(String.init)!) }
        }
        #expect(owners.isSuperset(of: ["zlib1g", "libzstd1"]), "ldd showed \(owners.sorted())")
        // GnuTLS is loaded with dlopen when TLS is set up, so ldd doesn't show it.
        #expect(!owners.contains("libgnutls30"), "ldd showed \(owners.sorted())")
        #expect(runtime.contains("libgnutls30"))
        #expect(owners.subtracting(base).isSubset(of: runtime), "runtime lacks \(owners.subtracting(base).subtracting(runtime).sorted())")
    }

    /// The build set holds the pkg-config files Package.swift asks for to build the server
    /// (zlib, libzstd); libnbd, which only the tests link, is in the test set alone.
    @Test func buildSetHoldsThePkgConfigModulesOfTheServer() throws {
        let build = try Self.packages("build")
        let test = try Self.packages("test")
        #expect(build.contains("pkg-config"))
        for (module, inBuild) in [("zlib", true), ("libzstd", true), ("libnbd", false)] {
            let folder = try Tools.check("pkg-config", ["--variable=pcfiledir", module])
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let owner = try #require(try Self.owner(of: "\(folder)/\(module).pc"), "\(module).pc")
            #expect(build.contains(owner) == inBuild, "\(module): \(owner)")
            #expect(test.contains(owner), "\(module): \(owner)")
        }
    }

    @Test func anUnknownSetIsAUsageError() throws {
        let result = try Tools.run(Paths.repo("scripts/install-deps.sh"), ["--list", "runtime", "everything"])
        #expect(result.status == 64)
        #expect(result.stderr.contains("unknown set 'everything'"))
    }
}
