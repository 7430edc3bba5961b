import CLibNBD
import Foundation
import TestSupport
import Testing

/// qcow2 images written through the server end up as qemu would have
/// written them, and stay clean under `qemu-img check`, crashes included.
@Suite struct QCOW2WriteTests {
    typealias Spec = QCOW2ExportTests.Spec

    static let kinds: [Spec] = QCOW2ExportTests.matrix.filter { !$0.snapshot && $0.name != "v3 2M" }

    /// A qemu-io script of unaligned writes, zeroing (with and without unmap) and FUA writes.
    static func script(seed: UInt64, size: Int) -> [String] {
        var rng = SplitMix(seed: seed)
        var commands: [String] = []
        for i in 0..<40 {
            let length = Int.random(in: 1...(200 << 10), using: &rng)
            let offset = Int.random(in: 0...(size - length), using: &rng)
            switch i % 5 {
            case 3: commands.append("write -z \(offset) \(length)")
            case 4: commands.append("write -z -u \(offset) \(length)")
            case 2: commands.append("write -f -P \(i + 1) \(offset) \(length)")
            default: commands.append("write -P \(i + 1) \(offset) \(length)")
            }
        }
        return commands + ["flush"]
    }

    /// `qemu-img check` finds neither errors nor leaks.
    static func expectClean(_ image: String, _ spec: Spec) throws {
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", image])
        #expect(check.status == 0, "\(spec): qemu-img check: \(check.stdout)\(check.stderr)")
        #expect(!check.stdout.contains("leaked"), "\(spec): \(check.stdout)")
    }

    @Test(arguments: kinds)
    func qemuIoWorkloadThroughNBDMatchesTheModel(_ spec: Spec) throws {
        let scratch = try TemporaryDirectory()
        let (image, _) = try QCOW2ExportTests.build(spec, in: scratch)
        let model = scratch.file("model.raw")
        try Tools.check("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, model])
        let commands = Self.script(seed: spec.name.utf8.reduce(UInt64(7)) { $0 &* 31 &+ UInt64($1) },
                                   size: QCOW2ExportTests.size)

        let server = try ServerProcess(["-t", image])
        try ImageFactory.io(server.uri, format: "raw", commands)
        try ImageFactory.io(model, format: "raw", commands)
        let live = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", model, server.uri])
        #expect(live.status == 0, "\(spec): through NBD: \(live.stdout)\(live.stderr)")
        #expect(server.stop() == 0)

        try Self.expectClean(image, spec)
        let closed = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", model, image])
        #expect(closed.status == 0, "\(spec): qemu reading the image: \(closed.stdout)\(closed.stderr)")
    }

    @Test func discardAndZeroWithUnmapLeaveACleanImage() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("disk.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "8M", options: ["cluster_size=4096"])
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x31 0 8M"])
        try Tools.check("qemu-img", ["snapshot", "-c", "s1", image])  // every cluster now shared
        let server = try ServerProcess(["-t", "--discard", "unmap", image])
        try ImageFactory.io(server.uri, format: "raw", ["discard 1M 1M", "write -z -u 3M 512k", "write -P 0x32 5M 4k",
                                                        "discard 6M 100k", "flush"])
        #expect(server.stop() == 0)
        try Self.expectClean(image, Spec(name: "discard"))
        try ImageFactory.io(image, format: "qcow2", ["read -P 0 3M 512k", "read -P 0x32 5M 4k", "read -P 0x31 0 1M"])
        // The snapshot still holds the original data.
        let snapshot = scratch.file("s1.raw")
        try Tools.check("qemu-img", ["convert", "-l", "snapshot.name=s1", "-f", "qcow2", "-O", "raw", image, snapshot])
        try ImageFactory.io(snapshot, format: "raw", ["read -P 0x31 0 8M"])
    }

    @Test func refcountTableGrowsPastItsFirstBlock() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("small-clusters.qcow2")
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters (32 KiB).
        try ImageFactory.create(image, format: "qcow2", size: "16M", options: ["cluster_size=512", "refcount_bits=64"])
        let server = try ServerProcess(["-t", image])
        try ImageFactory.io(server.uri, format: "raw", ["write -P 0x5c 0 6M", "flush"])
        #expect(server.stop() == 0)
        try Self.expectClean(image, Spec(name: "refcount growth"))
        try ImageFactory.io(image, format: "qcow2", ["read -P 0x5c 0 6M"])
    }

    @Test func severalConnectionsWriteWhileOthersRead() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("shared.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "16M")
        try ImageFactory.io(image, format: "qcow2", ["write -P 0xee 12M 4M"])
        let server = try ServerProcess(["-t", "-e", "8", image])
        let block = 4096
        let failures = Failures()
        // Writers 0..3 each own 2 MiB in [0, 8M) and all fight over [8M, 10M); readers check [12M, 16M).
        DispatchQueue.concurrentPerform(iterations: 6) { worker in
            do {
                let client = try NBDClient(uri: server.uri)
                var rng = SplitMix(seed: UInt64(worker) + 1)
                for round in 0..<60 {
                    if worker < 4 {
                        let own = [UInt8](repeating: UInt8(worker + 1), count: 3 * block)
                        let slot = Int.random(in: 0..<(((2 << 20) - own.count) / block), using: &rng)
                        try client.pwrite(own, offset: UInt64((worker << 21) + slot * block))
                        let contested = [UInt8](repeating: UInt8(0x10 + worker), count: block)
                        try client.pwrite(contested, offset: UInt64((8 << 20) + Int.random(in: 0..<512, using: &rng) * block))
                        if round % 20 == 19 { try client.flush() }
                    } else if try client.pread(count: 256 << 10, offset: UInt64((12 << 20) + (round % 16) * (256 << 10)))
                        != [UInt8](repeating: 0xee, count: 256 << 10) {
                        failures.add("reader \(worker) saw a change in the untouched region")
                    }
                }
                try client.disconnect()
            } catch {
                failures.add("worker \(worker): \(error)")
            }
        }
        #expect(failures.messages.isEmpty, "\(failures.messages)")
        let client = try NBDClient(uri: server.uri)
        let all = try client.readAll()
        #expect(all.count == 16 << 20)
        for worker in 0..<4 {
            let mine = UInt8(worker + 1)
            let clean = all[(worker << 21)..<((worker + 1) << 21)].allSatisfy { $0 == 0 || $0 == mine }
            #expect(clean, "writer \(worker)'s own region")
        }
        let contestedOK = stride(from: 8 << 20, to: 10 << 20, by: block).allSatisfy { start in
            let first = all[start]
            return all[start..<(start + block)].allSatisfy { $0 == first } && (first == 0 || (0x10...0x13).contains(first))
        }
        #expect(contestedOK, "a contested block is torn or foreign")
        try client.disconnect()
        #expect(server.stop() == 0)
        try Self.expectClean(image, Spec(name: "concurrent"))
    }

    @Test(.timeLimit(.minutes(10)))
    func sigkillMidWriteLosesNothingAcknowledgedAsDurable() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("crash.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "64M", options: ["cluster_size=16384"])
        let server = try ServerProcess(["-t", "-e", "4", image])
        let slot = 48 << 10
        var durable: [(offset: UInt64, byte: UInt8)] = []
        var pending: [(offset: UInt64, byte: UInt8)] = []
        let stopLoad = Flag()
        // Background load on its own connection, in [32M, 64M), until the kill.
        let load = Thread {
            guard let client = try? NBDClient(uri: server.uri) else { return }
            var rng = SplitMix(seed: 99)
            while !stopLoad.isSet {
                let data = [UInt8](repeating: UInt8.random(in: 1...255, using: &rng), count: 100_000)
                guard (try? client.pwrite(data, offset: UInt64((32 << 20) + Int.random(in: 0..<300, using: &rng) * 100_000))) != nil
                else { return }
            }
        }
        load.start()
        let client = try NBDClient(uri: server.uri)
        // Each tracked write gets its own slot in [0, 32M), so a later write can't hide an earlier one.
        for index in 0..<240 {
            let byte = UInt8(index % 250 + 1)
            let offset = UInt64(index * (slot + 4096) + 1234)
            let fua = index % 7 == 0
            try client.pwrite([UInt8](repeating: byte, count: slot), offset: offset,
                              flags: fua ? UInt32(LIBNBD_CMD_FLAG_FUA) : 0)
            if fua { durable.append((offset, byte)) } else { pending.append((offset, byte)) }
            if index % 25 == 24 {
                try client.flush()
                durable += pending
                pending = []
            }
        }
        // Kill while the load connection still has writes in flight.
        kill(server.pid, SIGKILL)
        stopLoad.set()
        #expect(server.waitForExit(timeout: 10) != nil)

        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", image])
        #expect(check.status == 0 || check.status == 3, "qemu-img check after SIGKILL: \(check.stdout)\(check.stderr)")
        #expect(!check.stdout.contains("ERROR") && !check.stdout.contains("corruption"), "\(check.stdout)")

        let reopened = try ServerProcess(["-t", "-r", image])
        let reader = try NBDClient(uri: reopened.uri)
        for write in durable {
            #expect(try reader.pread(count: slot, offset: write.offset) == [UInt8](repeating: write.byte, count: slot),
                    "acknowledged durable write at \(write.offset) is missing")
        }
        try reader.disconnect()
        #expect(reopened.stop() == 0)
        #expect(durable.count > 200)
    }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
