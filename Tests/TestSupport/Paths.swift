import Foundation

/// Where the files under test are: the checkout and the freshly built server.
public enum Paths {
    /// The package root: the nearest folder above this file holding Package.swift.
    public static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while url.path != "/" {
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) {
                return url.path
            }
            url.deleteLastPathComponent()
        }
        preconditionFailure("no Package.swift above \(#filePath)")
    }()

    public static func repo(_ relative: String) -> String { repoRoot + "/" + relative }

    /// The debug `swiftnbd` built with this test bundle: SwiftPM puts products next to the
    /// test runner, so it is `swiftnbd` in the directory of `/proc/self/exe`.
    public static let serverBinary: String = {
        let runner = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: runner).deletingLastPathComponent().appendingPathComponent("swiftnbd").path
    }()

    /// The units as shipped in systemd/.
    public static let unitNames = ["swiftnbd@.service", "swiftnbd.service", "swiftnbd.socket"]

    /// The path the shipped units give for the binary, which `make install` rewrites.
    public static let shippedBinaryPath = "/usr/local/bin/swiftnbd"
}
