import Foundation
import TestSupport
import Testing

/// The seed's use case end to end: a qcow2 guest disk on the server, and
/// virt-df and guestfish on the client side reading it as a raw disk over nbd://.
@Suite struct LibguestfsTests {
    /// libguestfs's appliance, run by qemu directly; TCG because nested KVM is not dependable here.
    static let environment = ["LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"]

    /// A qcow2 image holding an ext4 file system with /etc/motd, made without libguestfs.
    static func guestDisk(in scratch: TemporaryDirectory) throws -> String {
        let tree = scratch.file("tree")
        try FileManager.default.createDirectory(atPath: tree + "/etc", withIntermediateDirectories: true)
        try "hello from swiftnbd\n".write(toFile: tree + "/etc/motd", atomically: true, encoding: .utf8)
        let raw = scratch.file("fs.raw")
        try Tools.check("truncate", ["-s", "64M", raw])
        try Tools.check("mkfs.ext4", ["-q", "-d", tree, "-L", "guestroot", raw])
        let image = scratch.file("guest.qcow2")
        try Tools.check("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, image])
        return image
    }

    @Test(.timeLimit(.minutes(15)))
    func virtDfReadsAndGuestfishEditsTheGuestOverNBD() throws {
        let scratch = try TemporaryDirectory()
        let image = try Self.guestDisk(in: scratch)
        let server = try ServerProcess(["-t", "-e", "2", image])

        let df = try Tools.check("virt-df", ["--format=raw", "-a", server.uri], environment: Self.environment)
        let line = try #require(df.split(separator: "\n").first { $0.contains("/dev/sda") }, "\(df)")
        let columns = line.split(separator: " ")
        #expect(columns.count == 5)
        #expect(Int(columns[1]) ?? 0 > 50_000, "a 64 MiB ext4 has over 50000 1K-blocks: \(line)")

        // One appliance run: read a file, then edit the guest's file system.
        let output = try Tools.check("guestfish", ["--format=raw", "-a", server.uri, "-m", "/dev/sda",
                                                   "cat", "/etc/motd", ":",
                                                   "write", "/etc/hostname", "edited-over-nbd", ":",
                                                   "mkdir", "/srv"], environment: Self.environment)
        #expect(output.trimmingCharacters(in: .whitespacesAndNewlines) == "hello from swiftnbd", "\(output.debugDescription)")
        #expect(server.stop() == 0)

        // The qcow2 is clean for qemu, and the edit is in it.
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", image])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let raw = scratch.file("after.raw")
        try Tools.check("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw])
        let hostname = try Tools.check("debugfs", ["-R", "cat /etc/hostname", raw])
        #expect(hostname == "edited-over-nbd")
        try Tools.check("e2fsck", ["-fn", raw])
    }
}
