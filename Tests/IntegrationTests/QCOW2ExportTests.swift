import Foundation
import TestSupport
import Testing

/// qcow2 images made by qemu-img read back through the server exactly as
/// `qemu-img convert -O raw` produces them, and map like `qemu-img map`.
@Suite struct QCOW2ExportTests {
    struct Spec: Sendable, CustomStringConvertible {
        var name: String
        var createOptions: [String] = []
        var compression: String?         // nil, "zlib" or "zstd": made by qemu-img convert -c
        var backing: Bool = false        // a qcow2 overlay over a shorter raw base
        var dataFile: Bool = false
        var snapshot: Bool = false       // exported with -l
        var description: String { name }
    }

    static let size = 4 << 20
    static let writes = ["write -P 0x11 0 1M", "write -P 0x22 1536k 100k", "write -z 3M 256k",
                         "write -P 0x33 3900k 196k", "write -P 0x44 2000k 1"]

    static let matrix: [Spec] = [
        Spec(name: "v2 64k", createOptions: ["compat=0.10"]),
        Spec(name: "v3 512", createOptions: ["cluster_size=512"]),
        Spec(name: "v3 4k refcount_bits=1", createOptions: ["cluster_size=4096", "refcount_bits=1"]),
        Spec(name: "v3 64k", createOptions: []),
        Spec(name: "v3 2M", createOptions: ["cluster_size=2M"]),
        Spec(name: "v2 4k", createOptions: ["compat=0.10", "cluster_size=4096"]),
        Spec(name: "zlib 64k", compression: "zlib"),
        Spec(name: "zstd 64k", compression: "zstd"),
        Spec(name: "zstd 4k", createOptions: ["cluster_size=4096"], compression: "zstd"),
        Spec(name: "zlib v2 512", createOptions: ["compat=0.10", "cluster_size=512"], compression: "zlib"),
        Spec(name: "backing", backing: true),
        Spec(name: "backing 2M", createOptions: ["cluster_size=2M"], backing: true),
        Spec(name: "extended L2", createOptions: ["extended_l2=on", "cluster_size=64k"]),
        Spec(name: "extended L2 backing", createOptions: ["extended_l2=on"], backing: true),
        Spec(name: "data file", dataFile: true),
        Spec(name: "data file raw", createOptions: ["data_file_raw=on"], dataFile: true),
        Spec(name: "snapshot", snapshot: true),
    ]

    /// Builds the image for `spec`; returns its path and the snapshot to load, if any.
    static func build(_ spec: Spec, in scratch: TemporaryDirectory) throws -> (path: String, snapshot: String?) {
        let image = scratch.file("disk.qcow2")
        var options = spec.createOptions
        if let compression = spec.compression {
            let raw = scratch.file("source.raw")
            try ImageFactory.patternedRaw(raw, size: size)
            options.append("compression_type=\(compression)")
            try Tools.check("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options.joined(separator: ","),
                                         raw, image])
            // Some clusters are then rewritten uncompressed, and some zeroed.
            try ImageFactory.io(image, format: "qcow2", ["write -P 0x55 100k 10k", "write -z 2M 64k"])
            return (image, nil)
        }
        if spec.backing {
            let base = scratch.file("base.raw")
            try ImageFactory.patternedRaw(base, size: size / 2 + 12345)
            options += ["backing_file=\(base)", "backing_fmt=raw"]
        }
        if spec.dataFile { options.append("data_file=\(scratch.file("disk.data"))") }
        try ImageFactory.create(image, format: "qcow2", size: "\(size)", options: options)
        try ImageFactory.io(image, format: "qcow2", writes)
        guard spec.snapshot else { return (image, nil) }
        try Tools.check("qemu-img", ["snapshot", "-c", "before", image])
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x99 0 2M", "discard 3M 1M"])
        return (image, "before")
    }

    @Test(arguments: matrix)
    func readsBackAsQemuConvertsIt(_ spec: Spec) throws {
        let scratch = try TemporaryDirectory()
        let (image, snapshot) = try Self.build(spec, in: scratch)
        let expectedPath = scratch.file("expected.raw")
        var convert = ["convert", "-f", "qcow2"]
        if let snapshot { convert += ["-l", "snapshot.name=\(snapshot)"] }
        try Tools.check("qemu-img", convert + ["-O", "raw", image, expectedPath])
        let expected = [UInt8](try Data(contentsOf: URL(fileURLWithPath: expectedPath)))

        var arguments = ["-t", "-r", "-e", "2"]
        if let snapshot { arguments += ["-l", snapshot] }
        let server = try ServerProcess(arguments + [image])

        // Byte for byte through libnbd, in odd-sized requests that straddle clusters.
        let client = try NBDClient(uri: server.uri, metaContexts: ["base:allocation"])
        #expect(client.size == Int64(expected.count))
        var actual: [UInt8] = []
        var offset = 0
        while offset < expected.count {
            let n = min(300_000 + 7, expected.count - offset)
            actual += try client.pread(count: n, offset: UInt64(offset))
            offset += n
        }
        if actual != expected {
            let first = zip(actual, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            Issue.record("\(spec): libnbd read differs from qemu-img convert, first at byte \(first)")
        }

        // And as qemu-img sees it.
        let compare = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", expectedPath, server.uri])
        #expect(compare.status == 0, "\(spec): \(compare.stdout)\(compare.stderr)")

        // Holes and data agree with qemu-img map (snapshots have no map to compare with).
        if snapshot == nil {
            let ours = try Self.dataRanges(nbdinfoMap: try Tools.check("nbdinfo", ["--map", "--json", server.uri]))
            let theirs = try Self.dataRanges(qemuMap: try Tools.check("qemu-img", ["map", "-f", "qcow2", "--output=json", image]))
            #expect(ours == theirs, "\(spec): nbdinfo --map vs qemu-img map")
        }
        client.shutdown()
    }

    /// Merged (start, end) ranges that hold data, from `nbdinfo --map --json`.
    static func dataRanges(nbdinfoMap json: String) throws -> [[Int]] {
        let entries = try #require(try jsonObject(json) as? [[String: Any]])
        return merge(entries.map { ($0["offset"] as! Int, $0["length"] as! Int, ($0["type"] as! Int) & 1 == 0) })
    }

    /// The same from `qemu-img map --output=json`.
    static func dataRanges(qemuMap json: String) throws -> [[Int]] {
        let entries = try #require(try jsonObject(json) as? [[String: Any]])
        return merge(entries.map { ($0["start"] as! Int, $0["length"] as! Int, $0["data"] as! Bool) })
    }

    static func merge(_ entries: [(Int, Int, Bool)]) -> [[Int]] {
        var ranges: [[Int]] = []
        for (start, length, isData) in entries where isData && length > 0 {
            if let last = ranges.last, last[1] == start {
                ranges[ranges.count - 1][1] = start + length
            } else {
                ranges.append([start, start + length])
            }
        }
        return ranges
    }

    @Test func allocationDepthMatchesTheChain() throws {
        let scratch = try TemporaryDirectory()
        let (image, _) = try Self.build(Spec(name: "backing", backing: true), in: scratch)
        let server = try ServerProcess(["-t", "-r", "-A", image])
        let client = try NBDClient(uri: server.uri, metaContexts: ["qemu:allocation-depth"])
        #expect(client.canMetaContext("qemu:allocation-depth"))
        let depths = try client.blockStatus(count: UInt64(Self.size), offset: 0, context: "qemu:allocation-depth")
        // [0,1M) written in the overlay: depth 1; [1M,1536k) only in the raw base: depth 2; past the base: 0.
        #expect(depths.first?.flags == 1)
        var position: UInt32 = 0
        var depthAt1M: UInt32?, depthAtEnd: UInt32?
        for d in depths {
            if position <= 1 << 20 && 1 << 20 < position + d.length { depthAt1M = d.flags }
            if position + d.length == UInt32(Self.size) { depthAtEnd = d.flags }
            position += d.length
        }
        #expect(depthAt1M == 2)
        #expect(depthAtEnd == 1, "the last write (3900k..4M) is in the overlay")
    }

    @Test func unsupportedImageIsRefusedAtStart() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("future.qcow2")
        try ImageFactory.create(image, format: "qcow2", size: "1M")
        // Set incompatible feature bit 40, which no qcow2 version defines.
        let handle = try Foundation.FileHandle(forUpdating: URL(fileURLWithPath: image))
        try handle.seek(toOffset: 72)
        handle.write(Data([0, 0, 1, 0, 0, 0, 0, 0]))
        try handle.close()
        let result = try Tools.run(ServerProcess.binary, ["-p", "0", "-b", "127.0.0.1", image])
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(result.stderr.contains("incompatible"), "\(result.stderr)")
    }

    @Test func brokenL2PointerIsEIOForThatReadOnly() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("broken.qcow2")
        // 512-byte clusters: one L2 table covers 32 KiB, so L1[1] maps [32K, 64K).
        try ImageFactory.create(image, format: "qcow2", size: "1M", options: ["cluster_size=512"])
        try ImageFactory.io(image, format: "qcow2", ["write -P 0x61 0 64k"])
        let header = try Data(contentsOf: URL(fileURLWithPath: image))
        let l1Offset = header[40..<48].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let handle = try Foundation.FileHandle(forUpdating: URL(fileURLWithPath: image))
        try handle.seek(toOffset: l1Offset + 8)
        handle.write(Data([0x80, 0, 0, 0x10, 0, 0, 0, 0]))  // COPIED | an offset far past the end of the file
        try handle.close()

        let server = try ServerProcess(["-t", "-r", image])
        let client = try NBDClient(uri: server.uri)
        #expect(throws: NBDClientError.self) { _ = try client.pread(count: 512, offset: 40 << 10) }
        do {
            _ = try client.pread(count: 512, offset: 40 << 10)
        } catch let error as NBDClientError {
            #expect(error.errno == EIO)
        }
        #expect(try client.pread(count: 4096, offset: 0) == [UInt8](repeating: 0x61, count: 4096))
        #expect(server.isRunning)
    }
}
