import Foundation
import Testing
import TestSupport

/// firewall/swiftnbd.xml is a service firewalld accepts, for 10809/tcp.
///
/// firewall-offline-cmd writes to /etc/firewalld/services; the test removes what it added.
@Suite(.serialized) struct FirewallServiceTests {
    static let servicesDir = "/etc/firewalld/services"

    @Test func firewalldAcceptsTheServiceFile() throws {
        let fm = FileManager.default
        let leftovers = ["swiftnbd.xml", "swiftnbd.xml.old"].map { Self.servicesDir + "/" + $0 }
        let existedBefore = leftovers.filter { fm.fileExists(atPath: $0) }
        try #require(existedBefore.isEmpty, "a swiftnbd service is already installed: \(existedBefore)")
        defer {
            _ = try? Tools.run("firewall-offline-cmd", ["--delete-service=swiftnbd"])
            for path in leftovers { try? fm.removeItem(atPath: path) }   // --delete-service keeps a .old copy
        }

        try Tools.check("firewall-offline-cmd",
                        ["--new-service-from-file=\(Paths.repo("firewall/swiftnbd.xml"))", "--name=swiftnbd"])
        let info = try Tools.check("firewall-offline-cmd", ["--info-service=swiftnbd"])
        let ports = info.split(separator: "\n").first { $0.trimmingCharacters(in: .whitespaces).hasPrefix("ports:") }
        #expect(ports?.trimmingCharacters(in: .whitespaces) == "ports: 10809/tcp", "\(info)")

        let short = try Tools.check("firewall-offline-cmd", ["--service=swiftnbd", "--get-short"])
        #expect(short.trimmingCharacters(in: .whitespacesAndNewlines) == "swiftnbd")
        let description = try Tools.check("firewall-offline-cmd", ["--service=swiftnbd", "--get-description"])
        #expect(description.contains("Network Block Device"), "\(description)")

        try Tools.check("firewall-offline-cmd", ["--delete-service=swiftnbd"])
        let gone = try Tools.run("firewall-offline-cmd", ["--info-service=swiftnbd"])
        #expect(!gone.succeeded)
    }
}
