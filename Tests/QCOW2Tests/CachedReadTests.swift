import BlockDevice
import Dispatch
import Foundation
@testable import QCOW2
import Synchronization
import TestSupport
import Testing

/// `readIfCached`, the reader thread's path: the bytes qemu-img sees for every
/// cluster kind it takes, false (never wrong data) for the kinds it leaves to
/// device threads, and no stale data under concurrent writes.
@Suite struct CachedReadTests {
    /// Each 4 KiB block of `device` read by `readIfCached` after a warming
    /// `read`; returns the offsets it refused, checking every block it took.
    static func refusedBlocks(_ device: QCOW2Device, _ expected: [UInt8],
                              sourceLocation: SourceLocation = #_sourceLocation) throws -> Set<Int> {
        _ = try Q.readAll(device)
        var refused = Set<Int>()
        var buffer = [UInt8](repeating: 0xEE, count: 4096)
        for offset in stride(from: 0, to: expected.count, by: buffer.count) {
            let ok = buffer.withUnsafeMutableBytes { device.readIfCached(into: $0, at: UInt64(offset)) }
            if !ok {
                refused.insert(offset)
            } else if buffer[...] != expected[offset..<offset + buffer.count] {
                Issue.record("readIfCached at \(offset) differs from qemu-img convert", sourceLocation: sourceLocation)
            }
        }
        return refused
    }

    @Test func everyClusterKindMatchesQemu() throws {
        let dir = try TemporaryDirectory("qcow2-cached")
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", base, "4M"])
        try Q.io(base, ["write -P 0x77 1M 1M"])
        try Q.img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top, "4M"])
        try Q.io(top, [
            "write -P 0x11 0 64k",            // allocated
            "write -z 128k 64k",              // zero flag (the backing file lies below)
            "write -P 0x22 1536k 64k",        // allocated over backing data
            "write -c -P 0x42 2560k 64k",     // compressed
        ])
        let expected = try Q.qemuRaw(top, scratch: dir)
        let device = try QCOW2Device(path: top, readOnly: false)
        defer { device.close() }
        // A fresh open has no L2 table cached: refused, not read from disk or guessed.
        var probe = [UInt8](repeating: 0, count: 4096)
        #expect(!probe.withUnsafeMutableBytes { device.readIfCached(into: $0, at: 0) })
        let compressed = Set(stride(from: 2560 * 1024, to: 2624 * 1024, by: 4096))
        #expect(try Self.refusedBlocks(device, expected) == compressed)
        // Unallocated with no backing file reads zeros, and reads may span kinds.
        let plain = dir.file("plain.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", plain, "1M"])
        try Q.io(plain, ["write -P 0x33 60k 8k"])
        let plainDevice = try QCOW2Device(path: plain, readOnly: true)
        defer { plainDevice.close() }
        #expect(try Self.refusedBlocks(plainDevice, try Q.qemuRaw(plain, scratch: dir)).isEmpty)
        var span = [UInt8](repeating: 0xEE, count: 200 * 1024)
        #expect(span.withUnsafeMutableBytes { plainDevice.readIfCached(into: $0, at: 0) })
        #expect(span[...] == (try Q.qemuRaw(plain, scratch: dir))[0..<span.count])
    }

    @Test func extendedL2Subclusters() throws {
        let dir = try TemporaryDirectory("qcow2-cached-ext")
        let base = dir.file("base.raw"), top = dir.file("top.qcow2")
        try Q.img(["create", "-q", "-f", "raw", base, "2M"])
        try Q.io(base, ["write -P 0x5A 0 2M"], format: "raw")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
                   "-F", "raw", "-b", base, top, "2M"])
        try Q.io(top, [
            "write -P 0x61 4k 2k",     // one allocated subcluster, the rest from the backing file
            "write -z 8k 2k",          // a zero subcluster
            "write -P 0x62 70k 5k",    // partial subclusters of another cluster
            "write -z 1M 64k",         // a whole zero cluster
        ])
        let expected = try Q.qemuRaw(top, scratch: dir)
        let device = try QCOW2Device(path: top, readOnly: true)
        defer { device.close() }
        #expect(try Self.refusedBlocks(device, expected).isEmpty)
    }

    /// Which rounds of one slot's writes have started and completed.
    final class SlotRounds: Sendable {
        let started = Atomic<UInt64>(0)
        let completed = Atomic<UInt64>(0)
    }

    /// The racing test's shared counters: writers finished, bad reads, reads answered, those with data.
    final class RaceState: Sendable {
        let done = Atomic(0)
        let bad = Atomic(0)
        let answered = Atomic(0)
        let answeredData = Atomic(0)
    }

    /// A word of the racing test's data: which round of a slot wrote it.
    static func word(_ round: UInt64) -> UInt64 { 0xA5 << 56 | round }

    /// Writers trim then rewrite their slots (so clusters move and freed ones
    /// are reused); readers note the last completed round of a slot before
    /// reading it. Every word read must be that round's or a later one's (or
    /// zeros from a trim that started meanwhile), and exactly that round's
    /// when no later round started by the time the read ended.
    @Test func racingWritesNeverGiveStaleData() throws {
        let dir = try TemporaryDirectory("qcow2-cached-race")
        let path = dir.file("race.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "2M"])
        let device = try QCOW2Device(path: path, readOnly: false)
        defer { device.close() }
        let slots = 8, slotBytes = 16 * 1024, lastRound: UInt64 = 200
        let rounds = (0..<slots).map { _ in SlotRounds() }
        let state = RaceState()
        runTogether(4) { role in
            Self.race(role: role, device: device, rounds: rounds, slotBytes: slotBytes, lastRound: lastRound,
                      state: state)
        }
        #expect(state.bad.load(ordering: .relaxed) == 0)
        #expect(state.answeredData.load(ordering: .relaxed) > 0)
    }

    static func race(role: Int, device: QCOW2Device, rounds: [SlotRounds], slotBytes: Int, lastRound: UInt64,
                     state: RaceState) {
        let slots = rounds.count
        switch role {
        case 0, 1:  // writers, each owning every other slot
            for round in 1...lastRound {
                for slot in stride(from: role, to: slots, by: 2) {
                    rounds[slot].started.store(round, ordering: .sequentiallyConsistent)
                    let at = UInt64(slot * slotBytes)
                    try? device.trim(at: at, length: UInt64(slotBytes), fua: false)
                    let words = [UInt64](repeating: Self.word(round), count: slotBytes / 8)
                    try? words.withUnsafeBytes { try device.write($0, at: at, fua: false) }
                    rounds[slot].completed.store(round, ordering: .sequentiallyConsistent)
                }
            }
            state.done.add(1, ordering: .sequentiallyConsistent)
        case 2:  // allocate elsewhere, reusing whatever the trims freed
            var rng = SplitMix(seed: 7)
            let bytes = [UInt8](repeating: 0x11, count: 4096)
            while state.done.load(ordering: .relaxed) < 2 {
                let at = UInt64(1 << 20) + UInt64(Int.random(in: 0..<256, using: &rng) * 4096)
                try? bytes.withUnsafeBytes { try device.write($0, at: at, fua: false) }
                try? device.trim(at: at, length: 4096, fua: false)
            }
        default:
            var rng = SplitMix(seed: 3)
            var words = [UInt64](repeating: 0, count: slotBytes / 8)
            while state.done.load(ordering: .relaxed) < 2 {
                let slot = Int.random(in: 0..<slots, using: &rng)
                let before = rounds[slot].completed.load(ordering: .sequentiallyConsistent)
                let ok = words.withUnsafeMutableBytes {
                    device.readIfCached(into: $0, at: UInt64(slot * slotBytes))
                }
                guard ok else { continue }
                state.answered.add(1, ordering: .relaxed)
                let quiet = rounds[slot].started.load(ordering: .sequentiallyConsistent) == before
                let fresh = words.allSatisfy { word in
                    if quiet { return before == 0 ? word == 0 : word == Self.word(before) }
                    return word == 0 || (word >> 56 == 0xA5 && word & 0xFFFF_FFFF >= before)
                }
                if !fresh { state.bad.add(1, ordering: .relaxed) }
                if words[0] != 0 { state.answeredData.add(1, ordering: .relaxed) }
            }
        }
    }
}

/// `-s` over qcow2: cached reads pass through the overlay to the image's `readIfCached`.
@Suite struct SnapshotOverlayCachedReadTests {
    @Test func overlayAndBaseBlocksMatchRead() throws {
        let dir = try TemporaryDirectory("qcow2-cached-overlay")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", path, "1M"])
        try Q.io(path, ["write -P 0x31 0 256k"])
        let image = try QCOW2Device(path: path, readOnly: true)
        let device = try SnapshotOverlayDevice(base: image, directory: dir.path)
        defer { device.close() }
        let patch = [UInt8](repeating: 0x7C, count: 8192)
        try patch.withUnsafeBytes { try device.write($0, at: 64 * 1024 + 4096, fua: false) }
        let expected = try Q.readAll(device)
        #expect(expected[64 * 1024 + 4096] == 0x7C && expected[0] == 0x31)
        // A fresh image's L2 table is cached by now; every block, and a read across the overlay's edges.
        for (offset, length) in [(0, 4096), (64 * 1024, 64 * 1024), (60 * 1024, 72 * 1024), (512 * 1024, 4096)] {
            var buffer = [UInt8](repeating: 0xEE, count: length)
            #expect(buffer.withUnsafeMutableBytes { device.readIfCached(into: $0, at: UInt64(offset)) })
            #expect(buffer[...] == expected[offset..<offset + length])
        }
    }
}
