import BlockDevice
import Dispatch
import Foundation
@testable import QCOW2
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
        let device = try QCOW2Device(path: top, readOnly: true, options: QCOW2Options(l2CacheBytes: 4 * 512))
        defer { device.close() }
        let failures = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var rng = FuzzTests.SeededGenerator(state: UInt64(worker) + 99)
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
