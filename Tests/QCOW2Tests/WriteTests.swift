import BlockDevice
import Dispatch
import Foundation
@testable import QCOW2
import SystemIO
import TestSupport
import Testing

/// Random write, zero and trim workloads applied both to a writable
/// QCOW2Device and to a raw model; afterwards `qemu-img compare` finds
/// them equal and `qemu-img check` finds no errors and no leaks.
@Suite struct WriteTests {
    struct Kind: CustomTestStringConvertible, Sendable {
        var name: String
        var make: @Sendable (TemporaryDirectory) throws -> String
        var testDescription: String { name }
    }

    static func plain(_ options: String, size: String = Q.diskSize, script: [String] = Q.contentScript)
        -> @Sendable (TemporaryDirectory) throws -> String {
        { dir in
            let path = dir.file("image.qcow2")
            try Q.img(["create", "-q", "-f", "qcow2", "-o", options, path, size])
            try Q.io(path, script)
            return path
        }
    }

    static let kinds: [Kind] = [
        Kind(name: "v3 64k", make: plain("compat=1.1")),
        Kind(name: "v2 64k", make: plain("compat=0.10")),
        Kind(name: "v3 512", make: plain("compat=1.1,cluster_size=512")),
        Kind(name: "v3 2M", make: plain("compat=1.1,cluster_size=2M")),
        Kind(name: "v3 refcount_bits=1 512", make: plain("cluster_size=512,refcount_bits=1")),
        Kind(name: "v3 refcount_bits=2", make: plain("cluster_size=4k,refcount_bits=2")),
        Kind(name: "v3 refcount_bits=4", make: plain("cluster_size=4k,refcount_bits=4")),
        Kind(name: "v3 refcount_bits=8", make: plain("cluster_size=4k,refcount_bits=8")),
        Kind(name: "v3 refcount_bits=32", make: plain("cluster_size=4k,refcount_bits=32")),
        Kind(name: "v3 refcount_bits=64 512", make: plain("cluster_size=512,refcount_bits=64")),
        Kind(name: "backing chain v3", make: { try ChainAndFeatureTests.makeChain($0) }),
        Kind(name: "backing chain v2 4k", make: { try ChainAndFeatureTests.makeChain($0, compat: "0.10", cluster: 4096) }),
        Kind(name: "extended L2 over backing", make: { dir in
            let top = try ChainAndFeatureTests.makeChain(dir, topOptions: ["extended_l2=on"])
            try Q.io(top, ["write -P 0xa1 8k 2k", "write -z 30k 4k"])
            return top
        }),
        Kind(name: "compressed zstd", make: { dir in
            let source = try plain("compat=1.1")(dir)
            let path = dir.file("compressed.qcow2")
            try Q.img(["convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type=zstd", source, path])
            return path
        }),
        Kind(name: "compressed zlib 4k", make: { dir in
            let source = try plain("compat=1.1,cluster_size=4k")(dir)
            let path = dir.file("compressed.qcow2")
            try Q.img(["convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=4k", source, path])
            return path
        }),
        Kind(name: "external data file", make: { dir in
            try plain("data_file=\(dir.file("image.data"))")(dir)
        }),
        Kind(name: "external raw data file", make: { dir in
            try plain("data_file=\(dir.file("image.data")),data_file_raw=on")(dir)
        }),
        Kind(name: "preallocated metadata", make: plain("preallocation=metadata")),
    ]

    enum Op {
        case write(UInt64, [UInt8])
        case zero(UInt64, UInt64, mayDeallocate: Bool)
        case trim(UInt64, UInt64)
    }

    static func randomOps(count: Int, size: UInt64, cluster: UInt64, seed: UInt64) -> [Op] {
        var rng = SplitMix(seed: seed)
        var ops: [Op] = []
        for i in 0..<count {
            // Half the ranges start on a cluster boundary, to hit the whole-cluster paths.
            var offset = UInt64.random(in: 0..<size, using: &rng)
            if Bool.random(using: &rng) { offset &= ~(cluster - 1) }
            let maxLength = min(size - offset, Bool.random(using: &rng) ? 3 * cluster : 96 * 1024)
            let length = UInt64.random(in: 1...max(1, maxLength), using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0...5:
                let pattern = UInt8(truncatingIfNeeded: i &+ 1)
                ops.append(.write(offset, (0..<Int(length)).map { pattern &+ UInt8(truncatingIfNeeded: $0 / 512) }))
            case 6...7: ops.append(.zero(offset, length, mayDeallocate: Bool.random(using: &rng)))
            default: ops.append(.trim(offset, length))
            }
        }
        return ops
    }

    /// Applies `ops` to the device and to `model`, following the documented trim
    /// semantics: whole clusters read as zeros afterwards unless a v2 image
    /// would have to show its backing file (then they keep their data), and a
    /// raw external data file ignores trim.
    static func apply(_ ops: [Op], to device: QCOW2Device, model: inout [UInt8]) throws {
        let cluster = device.geometry.clusterSize
        for op in ops {
            switch op {
            case .write(let offset, let bytes):
                try bytes.withUnsafeBytes { try device.write($0, at: offset, fua: false) }
                model.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes)
            case .zero(let offset, let length, let mayDeallocate):
                try zero(device, at: offset, length: length, mayDeallocate: mayDeallocate)
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
            case .trim(let offset, let length):
                try device.trim(at: offset, length: length, fua: false)
                guard device.backing == nil || device.header.version >= 3 else { continue }
                let start = (offset + cluster - 1) & ~(cluster - 1)
                let end = offset + length == device.size ? device.size : (offset + length) & ~(cluster - 1)
                if start < end {
                    model.replaceSubrange(Int(start)..<Int(end), with: repeatElement(0, count: Int(end - start)))
                }
            }
        }
    }

    /// Zeroes the fast way first, as NBD clients do, falling back when that is refused.
    static func zero(_ device: QCOW2Device, at offset: UInt64, length: UInt64, mayDeallocate: Bool) throws(DeviceError) {
        do throws(DeviceError) {
            try device.writeZeroes(at: offset, length: length, mayDeallocate: mayDeallocate, fast: true, fua: false)
        } catch {
            guard error.kind == .notSupported else { throw error }
            try device.writeZeroes(at: offset, length: length, mayDeallocate: mayDeallocate, fast: false, fua: false)
        }
    }

    /// qemu-img compare against the model, then qemu-img check (exit 0: no errors, no leaks).
    static func expectConsistent(_ path: String, model: [UInt8], dir: TemporaryDirectory,
                                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        let raw = dir.file("model-\(UUID().uuidString.prefix(8)).raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        let compare = try Tools.run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", path, raw])
        #expect(compare.status == 0, "qemu-img compare: \(compare.stdout) \(compare.stderr)", sourceLocation: sourceLocation)
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
    }

    @Test(arguments: kinds)
    func randomWorkload(_ kind: Kind) throws {
        let dir = try TemporaryDirectory("qcow2-write")
        let path = try kind.make(dir)
        var model = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        #expect(device.capabilities.canWrite && device.capabilities.canTrim && device.capabilities.canZero)
        // 2 MiB clusters make every partial write copy 2 MiB: fewer operations keep the suite quick.
        let count = device.geometry.clusterSize >= 1 << 21 ? 50 : 120
        let ops = Self.randomOps(count: count, size: device.size, cluster: device.geometry.clusterSize, seed: 42)
        try Self.apply(ops, to: device, model: &model)
        // The device reads its own writes before close.
        try Q.expectSameContents(device, model)
        device.close()
        try Self.expectConsistent(path, model: model, dir: dir)
        // And a fresh open sees the same.
        let reopened = try QCOW2Device(path: path, readOnly: true)
        try Q.expectSameContents(reopened, model)
        reopened.close()
    }

    /// Writes to clusters shared with internal snapshots copy them; the snapshots keep their data.
    @Test(arguments: ["0.10", "1.1"])
    func snapshotSharedClusters(compat: String) throws {
        let dir = try TemporaryDirectory("qcow2-write-snap")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=4k", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        try Q.img(["snapshot", "-c", "before", path])
        let snapshotContents = try Q.qemuRaw(path, snapshot: "before", scratch: dir)
        var model = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        try Self.apply(Self.randomOps(count: 100, size: device.size, cluster: 4096, seed: 7), to: device, model: &model)
        device.close()
        try Self.expectConsistent(path, model: model, dir: dir)
        #expect(try Q.qemuRaw(path, snapshot: "before", scratch: dir) == snapshotContents)
    }

    /// 512-byte clusters with 64-bit refcounts: a refcount block covers 64
    /// clusters and the first table cluster 4096, so 3 MiB of writes needs
    /// dozens of new blocks and a larger refcount table.
    @Test func refcountTableGrowth() throws {
        let dir = try TemporaryDirectory("qcow2-refgrow")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path, "4M"])
        let before = try Self.header(path)
        var model = [UInt8](repeating: 0, count: 4 << 20)
        let device = try QCOW2Device(path: path, readOnly: false)
        var ops: [Op] = []
        for i in 0..<48 { ops.append(.write(UInt64(i) * 65536, [UInt8](repeating: UInt8(i + 1), count: 65536))) }
        try Self.apply(ops, to: device, model: &model)
        device.close()
        let after = try Self.header(path)
        #expect(after.refcountTableClusters > before.refcountTableClusters)
        try Self.expectConsistent(path, model: model, dir: dir)
    }

    /// Sequential whole-cluster writes into an empty image: a reserve refill
    /// writes its refcounts with one write per refcount block, not one per
    /// cluster (64 MiB is 1024 clusters; each refill is followed by a sync).
    @Test func sequentialAllocationWritesRefcountsPerRefill() throws {
        let dir = try TemporaryDirectory("qcow2-seqalloc")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", path, "256M"])
        let journal = WriteJournal()
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: journal.opener))
        let chunk = [UInt8](repeating: 0x5A, count: 256 << 10)
        for i in 0..<256 {
            try chunk.withUnsafeBytes { try device.write($0, at: UInt64(i * chunk.count), fua: false) }
        }
        device.close()
        let header = try Self.header(path)
        let file = try Q.fileBytes(path)
        let first = file[Int(header.refcountTableOffset)..<Int(header.refcountTableOffset) + 8]
        let block = first.reduce(UInt64(0)) { $0 << 8 | UInt64($1) } & EntryBits.offsetMask
        #expect(block != 0)
        var refcountWrites = 0, syncs = 0
        for event in journal.events {
            switch event {
            case .write(file: 0, offset: let offset, bytes: _) where offset >= block && offset < block + 65536:
                refcountWrites += 1
            case .sync(file: 0): syncs += 1
            default: break
            }
        }
        #expect(refcountWrites > 0 && refcountWrites <= syncs + 2, "\(refcountWrites) refcount writes, \(syncs) syncs")
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
        #expect(check.status == 0, "\(check.stdout)")
    }

    static func header(_ path: String) throws -> QCOW2Header {
        try QCOW2Header.parse(Array(try Q.fileBytes(path).prefix(65536)))
    }

    /// Threads write interleaved 4 KiB blocks of the same clusters and L2
    /// tables, and disjoint ranges, at once.
    @Test(arguments: ["compat=1.1", "compat=1.1,cluster_size=16k,extended_l2=on", "compat=0.10,cluster_size=4k"])
    func concurrentWriters(_ options: String) throws {
        let dir = try TemporaryDirectory("qcow2-write-mt")
        let path = try Self.plain(options)(dir)
        var model = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        let threads = 4, block = 4096
        let blocks = model.count / block
        let failures = Locked(0)
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for b in stride(from: t, to: blocks, by: threads) {
                let bytes = [UInt8](repeating: UInt8(t * 50 + b % 50), count: block)
                do { try bytes.withUnsafeBytes { try device.write($0, at: UInt64(b * block), fua: false) } } catch {
                    failures.withLock { $0 += 1 }
                }
            }
        }
        for t in 0..<threads {
            for b in stride(from: t, to: blocks, by: threads) {
                model.replaceSubrange(b * block..<(b + 1) * block, with: repeatElement(UInt8(t * 50 + b % 50), count: block))
            }
        }
        #expect(failures.withLock { $0 } == 0)
        try Q.expectSameContents(device, model)
        device.close()
        try Self.expectConsistent(path, model: model, dir: dir)
    }

    @Test func fastZeroAndReadOnly() throws {
        let dir = try TemporaryDirectory("qcow2-write-misc")
        let v2 = try Self.plain("compat=0.10")(dir)
        let device = try QCOW2Device(path: v2, readOnly: false)
        let error = #expect(throws: DeviceError.self) {
            try device.writeZeroes(at: 0, length: 65536, mayDeallocate: false, fast: true, fua: false)
        }
        #expect(error?.kind == .notSupported)
        // Where nothing is allocated, even v2 zeroes fast: there is nothing to do.
        try device.writeZeroes(at: 2560 * 1024, length: 65536, mayDeallocate: false, fast: true, fua: false)
        let past = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try device.write($0, at: device.size - 5, fua: true) }
        }
        #expect(past?.kind == .noSpace)
        device.close()
        let readOnly = try QCOW2Device(path: v2, readOnly: true)
        #expect(!readOnly.capabilities.canWrite)
        let denied = #expect(throws: DeviceError.self) {
            try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try readOnly.write($0, at: 0, fua: false) }
        }
        #expect(denied?.kind == .readOnly)
        readOnly.close()
    }
}

/// A dirty image (lazy refcounts, writer killed) is repaired at a
/// read-write open: refcounts rebuilt, COPIED flags fixed, dirty bit cleared.
@Suite struct DirtyRepairTests {
    @Test(arguments: [false, true])
    func repairsDirtyImage(withSnapshot: Bool) throws {
        let dir = try TemporaryDirectory("qcow2-dirty")
        let path = dir.file("lazy.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        if withSnapshot { try Q.img(["snapshot", "-c", "s", path]) }
        // qemu-io kills itself after writing: refcounts are left stale and the dirty bit set.
        _ = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x61 0 300k", "-c", "write -P 0x62 2M 40k",
                                      "-c", "sigraise 9", path])
        #expect(try WriteTests.header(path).incompatibleFeatures.contains(.dirty))
        #expect(try Tools.run("qemu-img", ["check", path]).status != 0)
        var model = try Q.qemuRaw(path, scratch: dir)
        try Self.openRepairedAndWrite(path, model: &model, seed: 5, dir: dir)
    }

    /// Opens the dirty image read-write (which repairs it), applies random
    /// writes, closes: the dirty bit is gone and qemu agrees with `model`.
    static func openRepairedAndWrite(_ path: String, model: inout [UInt8], seed: UInt64,
                                     dir: TemporaryDirectory) throws {
        let device = try QCOW2Device(path: path, readOnly: false)
        try WriteTests.apply(WriteTests.randomOps(count: 40, size: device.size, cluster: 4096, seed: seed),
                             to: device, model: &model)
        device.close()
        #expect(!(try WriteTests.header(path).incompatibleFeatures.contains(.dirty)))
        try WriteTests.expectConsistent(path, model: model, dir: dir)
    }
}

extension DirtyRepairTests {
    /// Bitmap clusters count as references, as qemu-img check counts them:
    /// the repair keeps the directory, tables and data of every bitmap, the
    /// one the crash left in use (inconsistent) and a disabled one that
    /// stays exportable with the bits it had. With the autoclear bit clear
    /// (`stale`) the extension names nothing, for qemu as for the repair, so
    /// its clusters are free afterwards and qemu-img check finds no leak.
    @Test(arguments: [false, true])
    func repairCountsBitmapClusters(stale: Bool) throws {
        let dir = try TemporaryDirectory("qcow2-dirty-bitmaps")
        let path = dir.file("lazy.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", path, Q.diskSize])
        // 512-byte granules: each bitmap's data spans several clusters.
        try Q.img(["bitmap", "--add", "-g", "512", path, "on"])
        try Q.img(["bitmap", "--add", "-g", "512", path, "off"])
        try Q.io(path, Q.contentScript)
        try Q.img(["bitmap", "--disable", path, "off"])
        let before = try QCOW2Device(path: path, readOnly: true)
        let offBits = try before.dirtyBitmapExtents(named: "off", at: 0, length: before.size)
        before.close()
        #expect(offBits.contains { $0.dirty }, "the fixture's premise: 'off' has data clusters")

        // Writes, then every write fails from the close on: what a crash leaves.
        var model = try Q.qemuRaw(path, scratch: dir)
        let faults = FileFaults()
        let crashed = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: faults.opener))
        try WriteTests.apply(WriteTests.randomOps(count: 20, size: crashed.size, cluster: 4096, seed: 8),
                             to: crashed, model: &model)
        faults.writesLeft.store(0, ordering: .relaxed)
        crashed.close()
        #expect(try WriteTests.header(path).incompatibleFeatures.contains(.dirty))
        #expect(try PersistentBitmapTests.inUseCount(path) == 1, "the crash left 'on' in use")
        if stale {
            let file = try FileHandle.open(path, mode: .readWrite)
            defer { file.close() }
            try file.write(bytes: QCOW2Device.bigEndianBytes(UInt64(0)), at: 88)  // autoclear features
        }

        try Self.openRepairedAndWrite(path, model: &model, seed: 9, dir: dir)
        guard !stale else { return }
        #expect(try PersistentBitmapTests.inUseCount(path) == 1, "'on' stays inconsistent, as qemu leaves it")
        let after = try QCOW2Device(path: path, readOnly: true)
        defer { after.close() }
        #expect(try after.dirtyBitmapExtents(named: "off", at: 0, length: after.size) == offBits)
    }

    /// Snapshots share L2 tables (qemu copies only the L1 table): the repair
    /// reads each distinct table once to count references, and the active
    /// ones once more to fix COPIED flags, however many snapshots share them.
    @Test func repairReadsSharedTablesOnce() throws {
        let dir = try TemporaryDirectory("qcow2-dirty-snapshots")
        let path = dir.file("lazy.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        for i in 0..<30 { try Q.img(["snapshot", "-c", "s\(i)", path]) }
        _ = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x61 0 300k", "-c", "sigraise 9", path])
        #expect(try WriteTests.header(path).incompatibleFeatures.contains(.dirty))
        let faults = FileFaults()
        let reads = ReadCounter()
        // Tables and refcount blocks are read whole: one 4 KiB cluster.
        faults.beforeRead.withLock { $0 = { offset, length in if length == 4096 { reads.count(offset) } } }
        let device = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(opener: faults.opener))
        device.close()
        let (offset, most) = reads.most
        #expect(most <= 2, "the cluster at \(offset) was read \(most) times")
        let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", path])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)")
    }

    final class ReadCounter: Sendable {
        private let counts = Locked<[UInt64: Int]>([:])
        func count(_ offset: UInt64) { counts.withLock { $0[offset, default: 0] += 1 } }
        var most: (offset: UInt64, reads: Int) {
            counts.withLock { $0.max { $0.value < $1.value }.map { ($0.key, $0.value) } ?? (0, 0) }
        }
    }
}

/// Threads write disjoint, unaligned 250-byte chunks that share subclusters
/// and clusters: in-place writes and read-modify-write of partly allocated
/// subclusters race, and no write may be lost.
@Suite struct SharedSubclusterWriteTests {
    @Test(arguments: ["cluster_size=16k,extended_l2=on", "cluster_size=4k"])
    func disjointUnalignedChunks(_ options: String) throws {
        let dir = try TemporaryDirectory("qcow2-chunks")
        let path = dir.file("chunks.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", options, path, "1M"])
        let device = try QCOW2Device(path: path, readOnly: false)
        let chunk = 250, chunks = (1 << 20) / chunk, threads = 4
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in stride(from: t, to: chunks, by: threads) {
                let bytes = [UInt8](repeating: UInt8(i % 251 + 1), count: chunk)
                try? bytes.withUnsafeBytes { try device.write($0, at: UInt64(i * chunk), fua: false) }
            }
        }
        var model = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<chunks {
            model.replaceSubrange(i * chunk..<(i + 1) * chunk, with: repeatElement(UInt8(i % 251 + 1), count: chunk))
        }
        try Q.expectSameContents(device, model)
        device.close()
        try WriteTests.expectConsistent(path, model: model, dir: dir)
    }
}

/// Four threads run random writes, zeroes and trims at once, each in its own
/// byte range (boundaries not cluster-aligned, so clusters and L2 tables are
/// shared), over backing files, compressed and extended-L2 images.
@Suite struct ConcurrentWorkloadTests {
    @Test(arguments: [WriteTests.kinds[10], WriteTests.kinds[12], WriteTests.kinds[13], WriteTests.kinds[2]])
    func fourThreads(_ kind: WriteTests.Kind) throws {
        let dir = try TemporaryDirectory("qcow2-mtwork")
        let path = try kind.make(dir)
        let initial = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        let threads = 4
        let slice = (initial.count / threads) & ~4095 + 1234  // deliberately unaligned
        let bounds = (0...threads).map { min($0 * slice, initial.count) }.enumerated().map { $0.offset == threads ? initial.count : $0.element }
        let results = Locked<[Int: [UInt8]]>([:])
        let failures = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let lower = bounds[t], upper = bounds[t + 1]
            var model = Array(initial[lower..<upper])
            var rng = SplitMix(seed: UInt64(t) * 7 + 1)
            for i in 0..<60 {
                let offset = Int.random(in: 0..<model.count, using: &rng)
                let length = Int.random(in: 1...min(model.count - offset, 40_000), using: &rng)
                let at = UInt64(lower + offset)
                do {
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0...5:
                        let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: t * 60 + i + 1), count: length)
                        try bytes.withUnsafeBytes { try device.write($0, at: at, fua: false) }
                        model.replaceSubrange(offset..<offset + length, with: bytes)
                    case 6...7:
                        try WriteTests.zero(device, at: at, length: UInt64(length), mayDeallocate: Bool.random(using: &rng))
                        model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
                    default:
                        // Whole clusters inside the range read as zeros afterwards (v3, or no backing).
                        try device.trim(at: at, length: UInt64(length), fua: false)
                        let c = Int(device.geometry.clusterSize)
                        let start = (Int(at) + c - 1) / c * c
                        let end = Int(at) + length == initial.count ? initial.count : (Int(at) + length) / c * c
                        if start < end && (device.backing == nil || device.header.version >= 3) {
                            model.replaceSubrange(start - lower..<end - lower, with: repeatElement(0, count: end - start))
                        }
                    }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
            results.withLock { $0[t] = model }
        }
        #expect(failures.withLock { $0 }.isEmpty)
        let model = results.withLock { r in (0..<threads).flatMap { r[$0]! } }
        try Q.expectSameContents(device, model)
        device.close()
        try WriteTests.expectConsistent(path, model: model, dir: dir)
    }
}

/// Zeroing or trimming what already reads as zeros changes no metadata.
@Suite struct NoOpZeroTests {
    @Test func zeroingEmptySpaceAllocatesNothing() throws {
        let dir = try TemporaryDirectory("qcow2-noop")
        let path = dir.file("empty.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", path, "8G"])
        let before = try Q.fileBytes(path)
        let device = try QCOW2Device(path: path, readOnly: false)
        for mayDeallocate in [false, true] {
            try device.writeZeroes(at: 0, length: device.size, mayDeallocate: mayDeallocate, fast: true, fua: false)
        }
        try device.trim(at: 0, length: device.size, fua: true)
        device.close()
        #expect(try Q.fileBytes(path) == before)
    }
}

/// With a raw external data file, a trim punches the data file and sets the
/// zero flag, as qemu does, so the file keeps matching the disk. The data
/// file's first cluster (host offset 0) is then rewritten like any other.
@Suite struct RawDataFileTrimTests {
    // A lost cluster-0 write once left the cluster marked as being allocated, and the next trim spun on it.
    // The limit counts from when the test is scheduled, so it leaves room for a busy test pool.
    @Test(.timeLimit(.minutes(10)))
    func trimmedClustersReadAsZerosAndTakeWritesAgain() throws {
        let dir = try TemporaryDirectory("qcow2-raw-trim")
        let dataPath = dir.file("image.data")
        let path = try WriteTests.plain("data_file=\(dataPath),data_file_raw=on,cluster_size=16k")(dir)
        var model = try Q.qemuRaw(path, scratch: dir)
        let device = try QCOW2Device(path: path, readOnly: false)
        try WriteTests.apply([.trim(0, device.size), .write(100, [UInt8](repeating: 0x5A, count: 3000)),
                              .trim(16384, 40000), .write(20000, [UInt8](repeating: 0xA5, count: 70000)),
                              .trim(0, device.size), .write(0, [UInt8](repeating: 0x3C, count: 512))],
                             to: device, model: &model)
        #expect(model[0..<512].allSatisfy { $0 == 0x3C } && model[512...].allSatisfy { $0 == 0 })
        device.close()
        try WriteTests.expectConsistent(path, model: model, dir: dir)
        let raw = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dataPath)))
        #expect(raw.count == model.count && raw == model, "the raw data file no longer matches the disk")
    }
}
