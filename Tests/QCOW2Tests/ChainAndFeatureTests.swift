import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Backing chains, extended L2 entries, external data files and internal
/// snapshots read back as qemu sees them.
@Suite struct ChainAndFeatureTests {
    /// raw (2 MiB, shorter than the disk) <- middle.qcow2 (absolute path) <- top.qcow2 (relative path).
    static func makeChain(_ dir: TemporaryDirectory, compat: String = "1.1", cluster: Int = 65536,
                          topOptions: [String] = []) throws -> String {
        let base = dir.file("base.raw")
        try ImageFactory.patternedRaw(base, size: 2 << 20, seed: 3)
        let middle = dir.file("middle.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=\(cluster)",
                   "-b", base, "-F", "raw", middle, Q.diskSize])
        try Q.io(middle, ["write -P 0x77 192k 70k", "write -z 1M 64k", "write -P 0x78 2600k 5k"])
        let top = dir.file("top.qcow2")
        let options = (["compat=\(compat)", "cluster_size=\(cluster)"] + topOptions).joined(separator: ",")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", options, "-b", "middle.qcow2", "-F", "qcow2", top, Q.diskSize])
        try Q.io(top, ["write -P 0x88 60k 10k", "write -z 1600k 64k", "write -P 0x89 3100k 3k", "discard 192k 64k"])
        return top
    }

    @Test(arguments: ["0.10", "1.1"], [512, 65536])
    func backingChain(compat: String, cluster: Int) throws {
        let dir = try TemporaryDirectory("qcow2-chain")
        let top = try Self.makeChain(dir, compat: compat, cluster: cluster)
        let device = try QCOW2Device(path: top, readOnly: true)
        defer { device.close() }
        try Q.expectSameContents(device, try Q.qemuRaw(top, scratch: dir))
        try Q.expectSameMap(device, path: top)
    }

    @Test func compressedWritesOverBacking() throws {
        let dir = try TemporaryDirectory("qcow2-chain-c")
        let top = try Self.makeChain(dir, topOptions: ["compression_type=zstd"])
        try Q.io(top, ["write -c -P 0x99 256k 64k", "write -c -P 0x9a 2M 64k"])
        let device = try QCOW2Device(path: top, readOnly: true)
        defer { device.close() }
        try Q.expectSameContents(device, try Q.qemuRaw(top, scratch: dir))
        try Q.expectSameMap(device, path: top)
    }

    /// Subclusters: 2 KiB units at 64 KiB clusters, partly allocated over a backing file.
    @Test(arguments: [65536, 2 << 20])
    func extendedL2(cluster: Int) throws {
        let dir = try TemporaryDirectory("qcow2-ext")
        let top = try Self.makeChain(dir, cluster: cluster, topOptions: ["extended_l2=on"])
        try Q.io(top, ["write -P 0xa1 8k 2k", "write -P 0xa2 13k 5k", "write -z 30k 4k", "write -P 0xa3 2050k 1k"])
        let device = try QCOW2Device(path: top, readOnly: true)
        defer { device.close() }
        #expect(device.header.hasExtendedL2)
        try Q.expectSameContents(device, try Q.qemuRaw(top, scratch: dir))
        try Q.expectSameMap(device, path: top)
    }

    @Test(arguments: [false, true])
    func externalDataFile(raw: Bool) throws {
        let dir = try TemporaryDirectory("qcow2-data")
        let path = dir.file("image.qcow2")
        // qemu opens a relative data_file name from its working directory, so
        // the image is made with an absolute name, then renamed relative (which
        // swiftnbd resolves from the image's directory).
        try Q.img(["create", "-q", "-f", "qcow2", "-o",
                   "data_file=\(dir.file("image.data")),data_file_raw=\(raw ? "on" : "off")", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        let expected = try Q.qemuRaw(path, scratch: dir)
        let absolute = try QCOW2Device(path: path, readOnly: true)
        try Q.expectSameContents(absolute, expected)
        try Q.expectSameMap(absolute, path: path)
        absolute.close()
        try Q.img(["amend", "-f", "qcow2", "-o", "data_file=image.data", path])
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        #expect(device.header.externalDataFile == "image.data")
        #expect(device.header.dataFileIsRaw == raw)
        try Q.expectSameContents(device, expected)
    }

    @Test(arguments: ["0.10", "1.1"])
    func internalSnapshots(compat: String) throws {
        let dir = try TemporaryDirectory("qcow2-snap")
        let path = dir.file("image.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", path, Q.diskSize])
        try Q.io(path, Q.contentScript)
        try Q.img(["snapshot", "-c", "first", path])
        try Q.io(path, ["write -P 0xb1 0 128k", "write -P 0xb2 1000k 10k", "discard 3M 64k"])
        try Q.img(["snapshot", "-c", "second", path])
        try Q.io(path, ["write -P 0xc1 64k 64k"])
        let expectedFirst = try Q.qemuRaw(path, snapshot: "first", scratch: dir)
        let expectedSecond = try Q.qemuRaw(path, snapshot: "second", scratch: dir)

        for key in ["first", "1"] {  // by name and by ID
            let device = try QCOW2Device(path: path, readOnly: true, options: QCOW2Options(snapshot: key))
            try Q.expectSameContents(device, expectedFirst)
            device.close()
        }
        let second = try QCOW2Device(path: path, readOnly: false, options: QCOW2Options(snapshot: "second"))
        #expect(!second.capabilities.canWrite)
        try Q.expectSameContents(second, expectedSecond)
        second.close()
        let active = try QCOW2Device(path: path, readOnly: true)
        #expect(active.snapshots.map(\.name) == ["first", "second"])
        try Q.expectSameContents(active, try Q.qemuRaw(path, scratch: dir))
        active.close()
        #expect(throws: QCOW2Error.snapshotNotFound("third")) {
            try QCOW2Device(path: path, readOnly: true, options: QCOW2Options(snapshot: "third"))
        }
    }

    /// Allocation depth as qemu-nbd -A reports it: 1 here, 2 in the backing, ...
    @Test func allocationDepth() throws {
        let dir = try TemporaryDirectory("qcow2-depth")
        let base = dir.file("base.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", base, "1M"])
        try Q.io(base, ["write -P 1 0 64k"])
        let top = dir.file("top.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M"])
        try Q.io(top, ["write -P 2 128k 64k", "write -z 256k 64k"])
        let device = try QCOW2Device(path: top, readOnly: true)
        defer { device.close() }
        let k = UInt64(1024)
        #expect(try device.allocationDepth(at: 0, length: 1024 * k) == [
            DepthExtent(length: 64 * k, depth: 2), DepthExtent(length: 64 * k, depth: 0),
            DepthExtent(length: 64 * k, depth: 1), DepthExtent(length: 64 * k, depth: 0),
            DepthExtent(length: 64 * k, depth: 1), DepthExtent(length: 704 * k, depth: 0),
        ])
        #expect(try device.extents(at: 0, length: 1024 * k) == [
            Extent(length: 64 * k, flags: []), Extent(length: 64 * k, flags: [.hole, .zero]),
            Extent(length: 64 * k, flags: []), Extent(length: 832 * k, flags: [.hole, .zero]),
        ])
    }

    @Test func probeMagic() throws {
        let dir = try TemporaryDirectory("qcow2-magic")
        let path = dir.file("a.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", path, "1M"])
        let raw = dir.file("a.raw")
        try ImageFactory.patternedRaw(raw, size: 4096)
        #expect(QCOW2.hasMagic(path: path))
        #expect(!QCOW2.hasMagic(path: raw))
        #expect(!QCOW2.hasMagic(path: dir.file("missing")))
    }
}
