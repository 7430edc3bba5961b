import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Deterministic mutation fuzzing of the parsers and of whole images: any
/// input may be refused or fail a read, but nothing may crash.
@Suite struct FuzzTests {
    /// SplitMix64: a small, seeded, reproducible generator.
    /// Flips, replaces or sets to extremes a few bytes in `range`.
    static func mutate(_ bytes: inout [UInt8], in range: Range<Int>, using rng: inout SplitMix) {
        let count = Int.random(in: 1...8, using: &rng)
        for _ in 0..<count {
            let i = Int.random(in: range, using: &rng)
            switch Int.random(in: 0..<4, using: &rng) {
            case 0: bytes[i] ^= 1 << UInt8.random(in: 0..<8, using: &rng)
            case 1: bytes[i] = UInt8.random(in: 0...255, using: &rng)
            case 2: bytes[i] = 0xFF
            default: bytes[i] = 0
            }
        }
    }

    /// A v3 image with a backing name, feature table and snapshot, 512-byte clusters.
    static func seedImage(_ dir: TemporaryDirectory) throws -> String {
        let base = dir.file("base.raw")
        try ImageFactory.patternedRaw(base, size: 64 * 1024)
        let path = dir.file("seed.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compression_type=zstd",
                   "-b", "base.raw", "-F", "raw", path, "96k"])
        try Q.io(path, ["write -c -P 0x31 0 4k", "write -P 0x32 8k 3k", "write -z 16k 2k"])
        try Q.img(["snapshot", "-c", "s1", path])
        try Q.io(path, ["write -P 0x33 40k 1k"])
        return path
    }

    @Test func headerParser() throws {
        let dir = try TemporaryDirectory("qcow2-fuzz-h")
        let seed = Array(try Q.fileBytes(try Self.seedImage(dir)).prefix(512))
        var rng = SplitMix(seed: 0x5EED_0001)
        var accepted = 0
        for _ in 0..<20000 {
            var bytes = seed
            Self.mutate(&bytes, in: 0..<Int.random(in: 8...512, using: &rng), using: &rng)
            if Bool.random(using: &rng) { bytes = Array(bytes.prefix(Int.random(in: 0...512, using: &rng))) }
            guard let header = try? QCOW2Header.parse(bytes) else { continue }
            let fileSize = UInt64.random(in: 0...(1 << 40), using: &rng)
            if (try? header.validate(fileSize: fileSize, writable: Bool.random(using: &rng))) != nil { accepted += 1 }
            _ = Geometry(header: header)
        }
        #expect(accepted > 0)
    }

    @Test func snapshotTableAndBitmapDirectoryParsers() {
        var rng = SplitMix(seed: 0x5EED_0002)
        for _ in 0..<5000 {
            let bytes = (0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            _ = try? QCOW2Snapshot.parseTable(bytes, count: Int.random(in: 0...5, using: &rng))
            _ = Bitmaps.flagOffsets(in: bytes, count: Int.random(in: 0...5, using: &rng))
        }
    }

    @Test(arguments: [(9, false, UInt32(3)), (16, false, 2), (16, true, 3), (21, true, 3), (12, false, 3)])
    func l2Tables(clusterBits: UInt32, extended: Bool, version: UInt32) throws {
        var header = try QCOW2Header.parse(Self.minimalHeader)
        header.clusterBits = clusterBits
        header.version = version
        if extended { header.incompatibleFeatures.insert(.extendedL2) }
        let g = Geometry(header: header)
        var rng = SplitMix(seed: 0x5EED_0003 ^ UInt64(clusterBits))
        let interesting: [UInt64] = [0, 1, EntryBits.copied, EntryBits.compressed, EntryBits.offsetMask, .max,
                                     EntryBits.copied | (1 << UInt64(clusterBits)), 0xFFFF_FFFF, 0xFFFF_FFFF_0000_0000]
        let entryCount = Int(g.clusterSize / 8)
        for _ in 0..<min(200, (1 << 20) / entryCount) {
            let entries = (0..<entryCount).map { _ in
                Bool.random(using: &rng) ? interesting.randomElement(using: &rng)! : UInt64.random(in: 0...(.max), using: &rng)
            }
            let table = L2Table(entries: entries)
            for _ in 0..<20 {
                let offset = UInt64.random(in: 0..<g.bytesPerL2, using: &rng)
                let limit = UInt64.random(in: 1...(4 * g.clusterSize), using: &rng)
                let (_, length) = table.run(at: offset, limit: limit, geometry: g)
                #expect(length > 0 && length <= limit && offset + length <= g.bytesPerL2)
            }
        }
    }

    /// Whole images with mutated metadata clusters: open, read, map.
    @Test func mutatedImages() throws {
        let dir = try TemporaryDirectory("qcow2-fuzz-img")
        let seedPath = try Self.seedImage(dir)
        let seed = try Q.fileBytes(seedPath)
        let header = try QCOW2Header.parse(Array(seed.prefix(512)))
        // Metadata lives in the header, L1, refcount and L2 clusters; aim most mutations there.
        let l1 = Int(header.l1TableOffset), refcount = Int(header.refcountTableOffset)
        let l2 = Int(ByteCursor.peek(UInt64.self, in: seed, at: l1)! & EntryBits.offsetMask)
        let regions = [0..<512, l1..<l1 + 512, refcount..<refcount + 512, 0..<seed.count, l2..<l2 + 512, l2..<l2 + 512,
                       Int(header.snapshotsOffset)..<Int(header.snapshotsOffset) + 512]
        var rng = SplitMix(seed: 0x5EED_0004)
        let path = dir.file("mutant.qcow2")
        var opened = 0
        for _ in 0..<400 {
            var bytes = seed
            let region = regions.randomElement(using: &rng)!.clamped(to: 0..<seed.count)
            Self.mutate(&bytes, in: region, using: &rng)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            let snapshot: String? = Int.random(in: 0..<4, using: &rng) == 0 ? "s1" : nil
            guard let device = try? QCOW2Device(path: path, readOnly: true,
                                                options: QCOW2Options(cacheBytes: 4096, snapshot: snapshot))
            else { continue }
            opened += 1
            _ = try? Q.readAll(device, chunk: 7 * 1024)
            _ = try? device.extents(at: 0, length: device.size)
            _ = try? device.allocationDepth(at: 0, length: device.size)
            device.close()
        }
        #expect(opened > 0)
    }

    /// Mutated images opened read-write (sometimes marked dirty, so the
    /// refcount repair runs) take writes, zeroes and trims without crashing.
    @Test func mutatedImagesWritten() throws {
        let dir = try TemporaryDirectory("qcow2-fuzz-rw")
        let seed = try Q.fileBytes(try Self.seedImage(dir))
        let header = try QCOW2Header.parse(Array(seed.prefix(512)))
        let l1 = Int(header.l1TableOffset), refcount = Int(header.refcountTableOffset)
        let l2 = Int(ByteCursor.peek(UInt64.self, in: seed, at: l1)! & EntryBits.offsetMask)
        let refblock = Int(ByteCursor.peek(UInt64.self, in: seed, at: refcount)! & EntryBits.offsetMask)
        let regions = [0..<512, l1..<l1 + 512, refcount..<refcount + 512, refblock..<refblock + 512, l2..<l2 + 512]
        var rng = SplitMix(seed: 0x5EED_0005)
        let path = dir.file("mutant-rw.qcow2")
        var opened = 0
        for _ in 0..<250 {
            var bytes = seed
            Self.mutate(&bytes, in: regions.randomElement(using: &rng)!.clamped(to: 0..<seed.count), using: &rng)
            if Int.random(in: 0..<3, using: &rng) == 0 { bytes[79] |= 1 }  // dirty: repair at open
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            guard let device = try? QCOW2Device(path: path, readOnly: false,
                                                options: QCOW2Options(cacheBytes: 4096)) else { continue }
            opened += 1
            for _ in 0..<6 {
                let offset = UInt64.random(in: 0..<device.size, using: &rng)
                let length = UInt64.random(in: 1...min(device.size - offset, 9000), using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0:
                    let data = [UInt8](repeating: 0x77, count: Int(length))
                    _ = try? data.withUnsafeBytes { try device.write($0, at: offset, fua: false) }
                case 1:
                    _ = try? device.writeZeroes(at: offset, length: length, mayDeallocate: Bool.random(using: &rng),
                                                fast: false, fua: false)
                default:
                    _ = try? device.trim(at: offset, length: length, fua: false)
                }
            }
            _ = try? Q.readAll(device, chunk: 16 * 1024)
            device.close()
        }
        #expect(opened > 0)
    }

    /// A minimal valid v3 header with 64 KiB clusters, for geometry tests.
    static let minimalHeader: [UInt8] = {
        var b = [UInt8](repeating: 0, count: 512)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { b.replaceSubrange(at..<at + MemoryLayout<T>.size, with: Q.bigEndian(v)) }
        put(QCOW2.magic, 0); put(UInt32(3), 4); put(UInt32(16), 20); put(UInt64(1 << 20), 24)
        put(UInt32(1), 36); put(UInt64(0x30000), 40); put(UInt64(0x10000), 48); put(UInt32(1), 56)
        put(UInt32(4), 96); put(UInt32(104), 100)
        return b
    }()
}
