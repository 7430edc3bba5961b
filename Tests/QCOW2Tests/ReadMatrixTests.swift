import BlockDevice
import Foundation
@testable import QCOW2
import TestSupport
import Testing

/// Every image kind qemu makes reads back through QCOW2Device byte for byte
/// as `qemu-img convert -O raw` sees it, with the same map as `qemu-img map`.
@Suite struct ReadMatrixTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var compat: String
        var clusterSize: Int
        var compression: String?  // nil: plain; "zlib"/"zstd": qemu-img convert -c
        var testDescription: String { "compat=\(compat) cluster=\(clusterSize) \(compression ?? "plain")" }
    }

    static let cases: [Case] = {
        var cases: [Case] = []
        for compat in ["0.10", "1.1"] {
            for cluster in [512, 4096, 65536, 2 << 20] {
                for compression in [nil, "zlib", "zstd"] as [String?] {
                    if compat == "0.10" && compression == "zstd" { continue }  // zstd needs v3
                    cases.append(Case(compat: compat, clusterSize: cluster, compression: compression))
                }
            }
        }
        return cases
    }()

    @Test(arguments: cases)
    func plainAndCompressed(_ c: Case) throws {
        let dir = try TemporaryDirectory("qcow2-matrix")
        let source = dir.file("source.qcow2")
        try Q.img(["create", "-q", "-f", "qcow2", "-o", "compat=\(c.compat),cluster_size=\(c.clusterSize)",
                   source, Q.diskSize])
        try Q.io(source, Q.contentScript)
        var path = source
        if let compression = c.compression {
            // Mix compressible patterns with random (incompressible, stored plain) data.
            let random = dir.file("random.raw")
            try ImageFactory.patternedRaw(random, size: 3200 * 1024, seed: 7)
            try Q.io(source, ["write -P 0x66 2560k 256k"])
            path = dir.file("compressed.qcow2")
            var options = "compat=\(c.compat),cluster_size=\(c.clusterSize)"
            if compression == "zstd" { options += ",compression_type=zstd" }
            try Q.img(["convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", options, source, path])
            _ = random
        }
        let device = try QCOW2Device(path: path, readOnly: true)
        defer { device.close() }
        #expect(device.header.version == (c.compat == "0.10" ? 2 : 3))
        if c.compression == "zstd" { #expect(device.header.compressionType == .zstd) }
        try Q.expectSameContents(device, try Q.qemuRaw(path, scratch: dir))
        try Q.expectSameMap(device, path: path)
    }
}
