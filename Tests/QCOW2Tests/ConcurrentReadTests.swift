import BlockDevice
import Dispatch
import Foundation
@testable import QCOW2
import SystemIO
import TestSupport
import Testing

/// Many threads reading one device at once, with an L2 cache far smaller
/// than the image so tables are evicted and reloaded under contention.
@Suite struct ConcurrentReadTests {
    @Test func parallelRandomReads() throws {
        let dir = try TemporaryDirectory("qcow2-concurrent")
        let top = try ChainAndFeatureTests.makeChain(dir, cluster: 512, topOptions: ["compression_type=zstd"])
        try Q.io(top, ["write -c -P 0x42 2560k 32k"])
        let expected = try Q.qemuRaw(top, scratch: dir)
        let device = try QCOW2Device(path: top, readOnly: true, options: QCOW2Options(cacheBytes: 4 * 512))
        defer { device.close() }
        let failures = Locked(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var rng = SplitMix(seed: UInt64(worker) + 99)
            var buffer = [UInt8](repeating: 0, count: 128 * 1024)
            for _ in 0..<100 {
                let length = Int.random(in: 1...buffer.count, using: &rng)
                let offset = Int.random(in: 0...(expected.count - length), using: &rng)
                let ok = buffer.withUnsafeMutableBytes { raw in
                    (try? device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]),
                                      at: UInt64(offset))) != nil
                }
                if !ok || buffer[0..<length] != expected[offset..<offset + length] {
                    failures.withLock { $0 += 1 }
                }
            }
        }
        #expect(failures.withLock { $0 } == 0)
    }
}

import Synchronization

/// Reads racing with trims and allocations never return another range's
/// data: a cluster freed under a reader is not reused until the read ends.
@Suite struct ReadWriteRaceTests {
    @Test func readsNeverSeeReusedClusters() throws {
        let dir = try TemporaryDirectory("qcow2-race")
        let path = dir.file("race.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "2M"])
        let device = try QCOW2Device(path: path, readOnly: false)
        defer { device.close() }
        let cluster = 4096, watched = 0..<(256 * 1024), other = (1 << 20)..<(2 << 20)
        let stop = Atomic(false), bad = Atomic(0), reads = Atomic(0)
        runTogether(4) { role in
            var rng = SplitMix(seed: UInt64(role) + 1)
            var round = 0
            while !stop.load(ordering: .relaxed) {
                round += 1
                switch role {
                case 0:  // rewrite and trim the watched range; its values all have the high bit set
                    let at = Int.random(in: 0..<(watched.count / cluster), using: &rng) * cluster
                    let bytes = [UInt8](repeating: 0x80 | UInt8(round % 127), count: 4 * cluster)
                    try? bytes.withUnsafeBytes { try device.write($0, at: UInt64(at), fua: false) }
                    try? device.trim(at: UInt64(at), length: UInt64(4 * cluster), fua: false)
                    if round > 1000 { stop.store(true, ordering: .relaxed) }
                case 1:  // allocate elsewhere with 0x11, reusing whatever was freed
                    let at = other.lowerBound + Int.random(in: 0..<(other.count / cluster), using: &rng) * cluster
                    let bytes = [UInt8](repeating: 0x11, count: cluster)
                    try? bytes.withUnsafeBytes { try device.write($0, at: UInt64(at), fua: false) }
                    if round % 50 == 0 { try? device.trim(at: UInt64(other.lowerBound), length: UInt64(other.count), fua: false) }
                default:  // read the watched range: zeros or a high-bit pattern, never 0x11
                    var buffer = [UInt8](repeating: 0, count: 4 * cluster)
                    let at = Int.random(in: 0..<(watched.count / cluster - 4), using: &rng) * cluster
                    let ok = buffer.withUnsafeMutableBytes { (try? device.read(into: $0, at: UInt64(at))) != nil }
                    if !ok || buffer.contains(0x11) { bad.add(1, ordering: .relaxed) }
                    reads.add(1, ordering: .relaxed)
                }
            }
        }
        #expect(bad.load(ordering: .relaxed) == 0)
        #expect(reads.load(ordering: .relaxed) > 0, "the readers ran while the writers did")
    }
}

/// The same race made certain: between a read's pin and its data read
/// (a read hook on the image file), the range is trimmed, the trim made
/// durable (the cluster's refcount drops to 0), and enough is allocated to
/// refill the allocator. The pinned cluster must not be handed out: the
/// read returns the old bytes or zeros, never the new allocation's.
@Suite struct ReadRetryTests {
    @Test func pinnedClusterIsNotReused() throws {
        let dir = try TemporaryDirectory("qcow2-retry")
        let path = dir.file("retry.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4M"])
        let faults = FileFaults()
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: faults.opener))
        defer { device.close() }
        try [UInt8](repeating: 0xAA, count: 4096).withUnsafeBytes { try device.write($0, at: 0, fua: false) }
        let fired = Atomic(false)
        let fill = [UInt8](repeating: 0x11, count: 1 << 20)
        faults.beforeRead.withLock {
            $0 = { [unowned device] _, _ in
                guard !fired.exchange(true, ordering: .relaxed) else { return }
                try? device.trim(at: 0, length: 4096, fua: true)
                try? fill.withUnsafeBytes { try device.write($0, at: 65536, fua: false) }
            }
        }
        var buffer = [UInt8](repeating: 0xEE, count: 4096)
        try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        faults.beforeRead.withLock { $0 = nil }
        let hookRan = fired.load(ordering: .relaxed)
        #expect(hookRan)
        #expect(buffer.allSatisfy { $0 == 0xAA } || buffer.allSatisfy { $0 == 0 },
                "the read returned another range's data")
        var other = [UInt8](repeating: 0, count: 1 << 20)
        try other.withUnsafeMutableBytes { try device.read(into: $0, at: 65536) }
        #expect(other == fill)
        var again = [UInt8](repeating: 0xEE, count: 4096)
        try again.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        #expect(again.allSatisfy { $0 == 0 })
    }
}
