import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Backing files outside the allowed directories, or that are not regular
/// files, are refused at open; the chain is reported.
@Suite struct BackingPolicyTests {
    static func image(_ dir: TemporaryDirectory, backing: String, format: String = "raw") throws -> String {
        let path = dir.file("top.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format, path, "1M"])
        return path
    }

    @Test(arguments: ["/etc/passwd", "../../../../../../etc/passwd"])
    func outsideAllowedDirectoryRefused(_ backing: String) throws {
        let dir = try TemporaryDirectory("qcow2-backing-dir")
        let path = try Self.image(dir, backing: backing)
        // Without the option, qemu-nbd's behaviour: the file is served.
        let open = try QCOW2Device(path: path, readOnly: true)
        #expect(open.backingChain.count == 1)
        open.close()
        let error = #expect(throws: QCOW2Error.self) {
            try QCOW2Device(path: path, readOnly: true, options: QCOW2Options(allowedDirectories: [dir.path])).close()
        }
        guard case .backingFileUnavailable(_, let reason)? = error else {
            Issue.record("unexpected \(String(describing: error))")
            return
        }
        #expect(reason.contains("outside the allowed directories"))
    }

    @Test func insideAllowedDirectoryServed() throws {
        let dir = try TemporaryDirectory("qcow2-backing-dir-ok")
        let base = dir.file("base.raw")
        try Data(repeating: 0x5A, count: 1 << 20).write(to: URL(fileURLWithPath: base))
        let path = try Self.image(dir, backing: "base.raw")
        let device = try QCOW2Device(path: path, readOnly: true, options: QCOW2Options(allowedDirectories: [dir.path]))
        #expect(device.backingChain == [base])
        #expect(try Q.readAll(device) == [UInt8](repeating: 0x5A, count: 1 << 20))
        device.close()
    }

    @Test(arguments: ["/dev/zero", "/proc/self/environ", "fifo"])
    func nonRegularBackingRefused(_ backing: String) throws {
        let dir = try TemporaryDirectory("qcow2-backing-kind")
        var target = backing
        if backing == "fifo" {
            target = dir.file("fifo")
            #expect(mkfifo(target, 0o600) == 0)
        }
        let path = try Self.image(dir, backing: target)
        let error = #expect(throws: QCOW2Error.self) { try QCOW2Device(path: path, readOnly: true).close() }
        guard case .backingFileUnavailable(_, let reason)? = error else {
            Issue.record("unexpected \(String(describing: error))")
            return
        }
        #expect(reason.contains("regular file") || reason.contains("/proc"))
    }
}
