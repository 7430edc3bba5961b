import BlockDevice
import Dispatch
import Foundation
@testable import QCOW2
import Synchronization
import TestSupport
import Testing

/// Rough device-level throughput, printed for comparison with qemu-io on
/// the same images. Off by default: run with QCOW2_PERF=1, in release mode
/// (`swift test -c release --filter PerformanceTests`).
@Suite(.enabled(if: ProcessInfo.processInfo.environment["QCOW2_PERF"] != nil))
struct PerformanceTests {
    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = DispatchTime.now().uptimeNanoseconds
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }

    static func qemuIOSeconds(_ path: String, _ commands: [String]) throws -> Double {
        try seconds { try Q.io(path, commands) }
    }

    @Test func figures() throws {
        let dir = try TemporaryDirectory("qcow2-perf")
        let total = 256 << 20, chunk = 2 << 20
        let buffer = [UInt8](repeating: 0x5A, count: chunk)

        // Sequential allocating writes into an empty image.
        let ours = dir.file("seq-ours.qcow2"), theirs = dir.file("seq-qemu.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", ours, "1G"])
        try Q.img(["create", "-q", "-f", "qcow2", theirs, "1G"])
        let device = try QCOW2Device(path: ours, readOnly: false)
        let seqOurs = try Self.seconds {
            for offset in stride(from: 0, to: total, by: chunk) {
                try buffer.withUnsafeBytes { try device.write($0, at: UInt64(offset), fua: false) }
            }
            try device.flush()
        }
        device.close()
        var commands: [String] = []
        for offset in stride(from: 0, to: total, by: chunk) { commands.append("write -P 0x5a \(offset) \(chunk)") }
        let seqQemu = try Self.qemuIOSeconds(theirs, commands + ["flush"])
        print("sequential allocating write 256 MiB: swiftnbd \(Int(256 / seqOurs)) MiB/s, qemu-io \(Int(256 / seqQemu)) MiB/s")

        // Sequential read of what was written.
        let reader = try QCOW2Device(path: ours, readOnly: true)
        var out = [UInt8](repeating: 0, count: chunk)
        let readOurs = try Self.seconds {
            for offset in stride(from: 0, to: total, by: chunk) {
                try out.withUnsafeMutableBytes { try reader.read(into: $0, at: UInt64(offset)) }
            }
        }
        reader.close()
        let readQemu = try Self.qemuIOSeconds(theirs, ["read 0 256M"])
        print("sequential read 256 MiB: swiftnbd \(Int(256 / readOurs)) MiB/s, qemu-io \(Int(256 / readQemu)) MiB/s")

        // 4 KiB random writes from 4 threads, on the empty and on the written image.
        let overlay = dir.file("overlay.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-b", ours, "-F", "qcow2", overlay, "1G"])
        for (name, path) in [("empty", dir.file("rand.qcow2")), ("allocated", ours), ("over a backing file", overlay)] {
            if name == "empty" { try Q.img(["create", "-q", "-f", "qcow2", path, "1G"]) }
            let device = try QCOW2Device(path: path, readOnly: false)
            let span = UInt64(name == "allocated" ? total : 1 << 30) / 4096
            let count = 20000
            let time = Self.seconds {
                DispatchQueue.concurrentPerform(iterations: 4) { t in
                    var rng = SplitMix(seed: UInt64(t + 1))
                    let block = [UInt8](repeating: UInt8(t), count: 4096)
                    for _ in 0..<count / 4 {
                        let at = UInt64.random(in: 0..<span, using: &rng) * 4096
                        try? block.withUnsafeBytes { try device.write($0, at: at, fua: false) }
                    }
                }
            }
            device.close()
            print("4k random writes, \(name): swiftnbd \(Int(Double(count) / time)) IOPS (4 threads)")
        }
    }
}
