import BlockDevice
import NBDProtocol
import NBDServer
import SystemIO
import Testing
@testable import NBDMetrics

/// The metrics without a server: what the observer calls become, as rendered text.
@Suite struct ExportMetricsTests {
    /// The value of the one line starting with `series ` (name and labels as rendered).
    static func value(_ text: String, _ series: String) -> Double? {
        let lines = text.split(separator: "\n").filter { $0.hasPrefix(series + " ") }
        return lines.count == 1 ? Double(lines[0].dropFirst(series.count + 1)) : nil
    }

    /// The request path switches on wire values; they must land on the labels' positions.
    @Test func indexTablesMatchTheLabels() {
        for (position, entry) in ExportMetrics.commands.enumerated() {
            #expect(ExportMetrics.commandIndex(entry.command) == position, "\(entry.label)")
        }
        for command in [Command.disconnect, .resize, Command(rawValue: 99)] {
            #expect(ExportMetrics.commandIndex(command) == ExportMetrics.commands.count)
        }
        for (position, error) in ExportMetrics.errors.enumerated() {
            #expect(ExportMetrics.errorIndex(error) == position, "\(error)")
        }
        #expect(ExportMetrics.errorIndex(NBDError(rawValue: 7)) == ExportMetrics.errors.count)
    }

    @Test func requestsBytesErrorsAndConnectionsAddUp() {
        let metrics = ExportMetrics(export: "disk\"1", statistics: nil)
        metrics.connectionOpened()
        metrics.connectionOpened()
        metrics.connectionClosed()
        for _ in 0..<3 { metrics.requestFinished(.read, length: 4096, error: .ok, nanoseconds: 1000) }
        metrics.requestFinished(.read, length: 512, error: .io, nanoseconds: 1000)
        metrics.requestFinished(.write, length: 100, error: .ok, nanoseconds: 1000)
        metrics.requestFinished(Command(rawValue: 42), length: 0, error: .invalid, nanoseconds: 10)
        metrics.handshakeFailed(.timeout)
        let text = metrics.render()
        let export = #"export="disk\"1""#  // the quote escaped, as the format wants
        #expect(Self.value(text, "swiftnbd_requests_total{\(export),command=\"read\"}") == 4)
        #expect(Self.value(text, "swiftnbd_read_bytes_total{\(export)}") == 12288, "failed reads move no bytes")
        #expect(Self.value(text, "swiftnbd_written_bytes_total{\(export)}") == 100)
        #expect(Self.value(text, "swiftnbd_request_errors_total{\(export),command=\"read\",error=\"EIO\"}") == 1)
        #expect(Self.value(text, "swiftnbd_request_errors_total{\(export),command=\"other\",error=\"EINVAL\"}") == 1)
        #expect(Self.value(text, "swiftnbd_connections_total{\(export)}") == 2)
        #expect(Self.value(text, "swiftnbd_connections_open{\(export)}") == 1)
        #expect(Self.value(text, "swiftnbd_handshake_failures_total{\(export),reason=\"timeout\"}") == 1)
        #expect(Self.value(text, "swiftnbd_handshake_failures_total{\(export),reason=\"refused\"}") == 0)
        #expect(!text.contains("qcow2"))
    }

    /// A sample on a bound counts in that bucket (`le` is "less or equal"); buckets add up.
    @Test func histogramBucketsAreCumulative() {
        let histogram = LatencyHistogram(labels: [("command", "read")])
        for nanoseconds: Int64 in [0, 50_000, 50_001, 2_000_000, 20_000_000_000] {
            histogram.recordNanoseconds(nanoseconds)
        }
        var text = ""
        histogram.emit(name: "h", into: &text)
        #expect(Self.value(text, #"h_bucket{command="read",le="0.00005"}"#) == 2)
        #expect(Self.value(text, #"h_bucket{command="read",le="0.0001"}"#) == 3)
        #expect(Self.value(text, #"h_bucket{command="read",le="0.0025"}"#) == 4)
        #expect(Self.value(text, #"h_bucket{command="read",le="10"}"#) == 4)
        #expect(Self.value(text, #"h_bucket{command="read",le="+Inf"}"#) == 5)
        #expect(Self.value(text, #"h_count{command="read"}"#) == 5)
        #expect(Self.value(text, #"h_sum{command="read"}"#) == 20.002100001)
    }

    final class FakeEngine: DeviceStatisticsSource {
        let current = Locked(DeviceStatistics())
        var statistics: DeviceStatistics { current.withLock { $0 } }
    }

    /// The engine's totals become counters that follow them, and a ratio of hits to lookups.
    @Test func qcow2TotalsArePublishedAtEachRender() {
        let engine = FakeEngine()
        let metrics = ExportMetrics(export: "", statistics: engine)
        var text = metrics.render()
        #expect(Self.value(text, #"swiftnbd_qcow2_l2_cache_hit_ratio{export=""}"#) == 0, "no lookups yet")
        engine.current.withLock { $0 = DeviceStatistics(cacheHits: 3, cacheMisses: 1, clustersAllocated: 5) }
        _ = metrics.render()
        engine.current.withLock { $0 = DeviceStatistics(cacheHits: 9, cacheMisses: 1, clustersAllocated: 7,
                                                        clustersFreed: 2) }
        text = metrics.render()
        #expect(Self.value(text, #"swiftnbd_qcow2_l2_cache_hits_total{export=""}"#) == 9)
        #expect(Self.value(text, #"swiftnbd_qcow2_l2_cache_misses_total{export=""}"#) == 1)
        #expect(Self.value(text, #"swiftnbd_qcow2_l2_cache_hit_ratio{export=""}"#) == 0.9)
        #expect(Self.value(text, #"swiftnbd_qcow2_clusters_allocated_total{export=""}"#) == 7)
        #expect(Self.value(text, #"swiftnbd_qcow2_clusters_freed_total{export=""}"#) == 2)
    }
}
