import CLibNBD
import Foundation
import TestSupport
import Testing

/// `--metrics-file` counts known traffic exactly, in a file that Prometheus's own text
/// parser (Debian's python3-prometheus-client) reads.
@Suite struct MetricsFileTests {
    /// One sample: a series name with its labels, and its value.
    struct Sample: Decodable, Hashable {
        var name: String
        var labels: [String: String]
        var value: Double
    }

    /// The file as prometheus_client's parser sees it; the parser throws on malformed lines.
    static func parse(_ path: String) throws -> [Sample] {
        let json = try Tools.check("/usr/bin/python3", ["-c", """
            import json, sys
            from prometheus_client.parser import text_string_to_metric_families
            samples = []
            for family in text_string_to_metric_families(open(sys.argv[1]).read()):
                for s in family.samples:
                    samples.append({"name": s.name, "labels": s.labels, "value": s.value})
            print(json.dumps(samples))
            """, path])
        return try JSONDecoder().decode([Sample].self, from: Data(json.utf8))
    }

    static func value(_ samples: [Sample], _ name: String, _ labels: [String: String] = [:]) -> Double? {
        let matching = samples.filter { sample in sample.name == name && labels.allSatisfy { sample.labels[$0.key] == $0.value } }
        return matching.count == 1 ? matching[0].value : nil
    }

    /// Polls until the server has rewritten the file with `condition` true, or 10 s pass.
    static func waitForFile(_ path: String, until condition: ([Sample]) -> Bool) -> [Sample]? {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let samples = try? parse(path), condition(samples) { return samples }
            usleep(50_000)
        }
        return nil
    }

    @Test func readsAndAReadOnlyWriteAreCountedExactly() throws {
        let fixture = try RawFixture(size: 4 << 20)
        let metrics = fixture.scratch.file("swiftnbd.prom")
        let server = try ServerProcess(["-t", "-r", "-x", "disk", "--metrics-file", metrics,
                                        "--metrics-interval", "0.2", fixture.image])
        // Written once before the server says it listens.
        let initial = try Self.parse(metrics)
        #expect(Self.value(initial, "swiftnbd_requests_total", ["export": "disk", "command": "read"]) == 0)

        let reads = 10, size = 65536
        let client = try NBDClient(uri: server.uri + "/disk")
        for i in 0..<reads { _ = try client.pread(count: size, offset: UInt64(i * size)) }
        // libnbd would refuse this write itself; unstrict, it goes to the server, which answers EPERM.
        nbd_set_strict_mode(client.handle, 0)
        #expect(throws: NBDClientError.self) { try client.pwrite([1, 2, 3, 4], offset: 0) }
        try client.disconnect()
        // A listing client ends its handshake with NBD_OPT_ABORT.
        try Tools.check("nbdinfo", ["--list", server.uri])

        // The file is rewritten while the server runs, not only at exit.
        let running = Self.waitForFile(metrics) {
            Self.value($0, "swiftnbd_handshake_failures_total", ["reason": "client_aborted"]) == 1
                && Self.value($0, "swiftnbd_requests_total", ["command": "write"]) == 1
        }
        #expect(running != nil, "the file never showed the traffic while the server ran")
        #expect(server.stop() == 0)

        let samples = try Self.parse(metrics)
        let export = ["export": "disk"]
        func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
            Self.value(samples, name, export.merging(labels) { $1 })
        }
        #expect(value("swiftnbd_requests_total", ["command": "read"]) == Double(reads))
        #expect(value("swiftnbd_read_bytes_total") == Double(reads * size))
        #expect(value("swiftnbd_requests_total", ["command": "write"]) == 1)
        #expect(value("swiftnbd_request_errors_total", ["command": "write", "error": "EPERM"]) == 1)
        #expect(value("swiftnbd_written_bytes_total") == 0)
        let errors = samples.filter { $0.name == "swiftnbd_request_errors_total" }
        #expect(errors.reduce(0) { $0 + $1.value } == 1, "one error in all")
        #expect(value("swiftnbd_request_duration_seconds_count", ["command": "read"]) == Double(reads))
        #expect(value("swiftnbd_request_duration_seconds_bucket", ["command": "read", "le": "+Inf"]) == Double(reads))
        #expect(value("swiftnbd_request_duration_seconds_count", ["command": "write"]) == 1)
        #expect((value("swiftnbd_request_duration_seconds_sum", ["command": "read"]) ?? 0) > 0)
        #expect(value("swiftnbd_connections_total") == 2)
        #expect(value("swiftnbd_connections_open") == 0)
        #expect(value("swiftnbd_handshake_failures_total", ["reason": "client_aborted"]) == 1)
        #expect(value("swiftnbd_handshake_failures_total", ["reason": "timeout"]) == 0)
        #expect(samples.allSatisfy { !$0.name.hasPrefix("swiftnbd_qcow2") }, "a raw image has no qcow2 series")

        // node_exporter runs as another user; the temporary file never stays behind.
        let mode = try FileManager.default.attributesOfItem(atPath: metrics)[.posixPermissions] as? Int
        #expect(mode == 0o644)
        #expect(!FileManager.default.fileExists(atPath: metrics + ".tmp"))
    }

    /// A 1 MiB write into an empty qcow2 image with 64 KiB clusters takes 16 data clusters and one
    /// L2 table; trimming it with --discard unmap frees the 16.
    @Test func qcow2ClustersAndL2CacheAreCounted() throws {
        let scratch = try TemporaryDirectory()
        let image = scratch.file("disk.qcow2")
        let metrics = scratch.file("swiftnbd.prom")
        try Tools.check("qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"])
        let server = try ServerProcess(["-t", "--discard", "unmap", "--metrics-file", metrics, image])
        let client = try NBDClient(uri: server.uri)
        try client.pwrite([UInt8](repeating: 0x5a, count: 1 << 20), offset: 0)
        _ = try client.pread(count: 4096, offset: 0)
        try client.trim(count: 1 << 20, offset: 0)
        try client.disconnect()
        #expect(server.stop() == 0)

        let samples = try Self.parse(metrics)
        #expect(Self.value(samples, "swiftnbd_qcow2_clusters_allocated_total") == 17)
        #expect(Self.value(samples, "swiftnbd_qcow2_clusters_freed_total") == 16)
        let hits = try #require(Self.value(samples, "swiftnbd_qcow2_l2_cache_hits_total"))
        let misses = try #require(Self.value(samples, "swiftnbd_qcow2_l2_cache_misses_total"))
        #expect(hits >= 1, "the read after the write finds its L2 table in memory")
        let ratio = try #require(Self.value(samples, "swiftnbd_qcow2_l2_cache_hit_ratio"))
        #expect(abs(ratio - hits / (hits + misses)) < 1e-9)
        #expect(Self.value(samples, "swiftnbd_written_bytes_total") == Double(1 << 20))
    }

    @Test func anUnwritableMetricsFileIsRefusedAtStart() throws {
        let fixture = try RawFixture(size: 1 << 20)
        let result = try Tools.run(ServerProcess.binary, ["-p", "0", "--metrics-file",
                                                          fixture.scratch.file("missing/dir/m.prom"), fixture.image])
        #expect(result.status == 1)
        #expect(result.stderr.contains("cannot write metrics file"), "\(result.stderr)")
    }
}
