import BlockDevice
import CoreMetrics
import NBDProtocol
import NBDServer
import Prometheus
import SystemIO

/// The metrics of one export, as swift-metrics handles on a swift-prometheus
/// registry. Every handle is made here, once: the request path indexes
/// arrays by command and error and bumps atomics, with no lock, no
/// allocation and no lookup by label.
public final class ExportMetrics: ServerObserver, Sendable {
    /// Commands with series of their own, by label; anything else counts as "other".
    static let commands: [(command: Command, label: String)] = [
        (.read, "read"), (.write, "write"), (.flush, "flush"), (.trim, "trim"),
        (.writeZeroes, "write_zeroes"), (.cache, "cache"), (.blockStatus, "block_status"),
    ]
    /// Errors with series of their own, labelled as in the NBD spec; anything else is "other".
    static let errors: [NBDError] = [.permission, .io, .noMemory, .invalid, .noSpace, .overflow, .notSupported,
                                     .shutdown]
    static let latencyName = "swiftnbd_request_duration_seconds"

    private let registry = PrometheusCollectorRegistry()
    private let statisticsSource: (any DeviceStatisticsSource)?

    private let bytesRead: CoreMetrics.Counter
    private let bytesWritten: CoreMetrics.Counter
    /// Indexed by `commandIndex`.
    private let requests: [CoreMetrics.Counter]
    /// Indexed by `commandIndex * (errors.count + 1) + errorIndex`.
    private let requestErrors: [CoreMetrics.Counter]
    private let latencyHandlers: [LatencyHistogram]
    private let latency: [CoreMetrics.Timer]
    private let connectionsOpen: Meter
    private let connectionsTotal: CoreMetrics.Counter
    /// Indexed like `HandshakeFailureReason.allCases`.
    private let handshakeFailures: [CoreMetrics.Counter]
    private let qcow2: QCOW2Series?

    /// The engine's totals, turned into counters when the file is written.
    private struct QCOW2Series: Sendable {
        let cacheHits: CoreMetrics.Counter
        let cacheMisses: CoreMetrics.Counter
        let cacheHitRatio: Meter
        let clustersAllocated: CoreMetrics.Counter
        let clustersFreed: CoreMetrics.Counter
        /// What the counters were last raised to; only the file writer touches it.
        let published = LockedStatistics()
    }

    /// - Parameters:
    ///   - export: the export's name, the `export` label of every series.
    ///   - statistics: the image engine's counters (qcow2), if it keeps any.
    public init(export: String, statistics: (any DeviceStatisticsSource)?) {
        let factory = PrometheusMetricsFactory(registry: registry)
        let registry = self.registry
        let exportLabel = [("export", export)]
        func counter(_ name: String, _ help: String, _ labels: [(String, String)] = []) -> CoreMetrics.Counter {
            let handler = registry.makeCounter(descriptor: .init(metricName: name, unitName: "", helpText: help),
                                               labels: exportLabel + labels)
            return CoreMetrics.Counter(label: name, dimensions: exportLabel + labels, handler: handler, factory: factory)
        }
        func gauge(_ name: String, _ help: String) -> Meter {
            let handler = registry.makeGauge(descriptor: .init(metricName: name, unitName: "", helpText: help),
                                             labels: exportLabel)
            return Meter(label: name, dimensions: exportLabel, handler: handler, factory: factory)
        }

        bytesRead = counter("swiftnbd_read_bytes_total", "Bytes read by clients (successful NBD_CMD_READ).")
        bytesWritten = counter("swiftnbd_written_bytes_total", "Bytes written by clients (successful NBD_CMD_WRITE).")
        let commandLabels = Self.commands.map(\.label) + ["other"]
        let errorLabels = Self.errors.map(\.description) + ["other"]
        requests = commandLabels.map {
            counter("swiftnbd_requests_total", "Requests answered, by command, failed ones included.", [("command", $0)])
        }
        requestErrors = commandLabels.flatMap { command in
            errorLabels.map { error in
                counter("swiftnbd_request_errors_total", "Requests answered with an NBD error, by command and error.",
                        [("command", command), ("error", error)])
            }
        }
        latencyHandlers = commandLabels.map { LatencyHistogram(labels: exportLabel + [("command", $0)]) }
        latency = zip(commandLabels, latencyHandlers).map { command, handler in
            CoreMetrics.Timer(label: Self.latencyName, dimensions: exportLabel + [("command", command)],
                              handler: handler, factory: factory)
        }
        connectionsOpen = gauge("swiftnbd_connections_open", "Client connections open now, negotiating or transmitting.")
        connectionsTotal = counter("swiftnbd_connections_total", "Client connections accepted.")
        handshakeFailures = HandshakeFailureReason.allCases.map {
            counter("swiftnbd_handshake_failures_total", "Connections that never reached transmission, by reason.",
                    [("reason", $0.rawValue)])
        }
        statisticsSource = statistics
        qcow2 = statistics.map { _ in
            QCOW2Series(
                cacheHits: counter("swiftnbd_qcow2_l2_cache_hits_total", "qcow2 L2 table lookups answered from memory."),
                cacheMisses: counter("swiftnbd_qcow2_l2_cache_misses_total", "qcow2 L2 table lookups that read the image."),
                cacheHitRatio: gauge("swiftnbd_qcow2_l2_cache_hit_ratio",
                                     "Share of qcow2 L2 table lookups answered from memory since start (0 before any)."),
                clustersAllocated: counter("swiftnbd_qcow2_clusters_allocated_total",
                                           "qcow2 host clusters handed out by the allocator."),
                clustersFreed: counter("swiftnbd_qcow2_clusters_freed_total",
                                       "qcow2 host clusters whose reference count dropped to zero."))
        }
    }

    // MARK: - ServerObserver (the request path)

    // Both switch on wire values, not on the static constants, whose accessors cost a call each
    // on the request path. `indexTablesMatchTheLabels` checks them against the tables above.

    /// Position in `commands` (raw values: 0 read, 1 write, 3 flush, 4 trim, 5 cache,
    /// 6 write_zeroes, 7 block_status), or `commands.count` for any other.
    static func commandIndex(_ command: Command) -> Int {
        switch command.rawValue {
        case 0: 0
        case 1: 1
        case 3: 2
        case 4: 3
        case 6: 4
        case 5: 5
        case 7: 6
        default: 7
        }
    }

    /// Position in `errors`, or `errors.count` for any other.
    static func errorIndex(_ error: NBDError) -> Int {
        switch error.rawValue {
        case 1: 0
        case 5: 1
        case 12: 2
        case 22: 3
        case 28: 4
        case 75: 5
        case 95: 6
        case 108: 7
        default: 8
        }
    }

    public func requestFinished(_ command: Command, length: UInt64, error: NBDError, nanoseconds: UInt64) {
        let index = Self.commandIndex(command)
        requests[index].increment()
        latency[index].recordNanoseconds(Int64(clamping: nanoseconds))
        if error.rawValue == 0 {
            if index == 0 { bytesRead.increment(by: Int64(clamping: length)) }
            if index == 1 { bytesWritten.increment(by: Int64(clamping: length)) }
        } else {
            requestErrors[index * (Self.errors.count + 1) + Self.errorIndex(error)].increment()
        }
    }

    public func connectionOpened() {
        connectionsTotal.increment()
        connectionsOpen.increment()
    }

    public func connectionClosed() {
        connectionsOpen.decrement()
    }

    public func handshakeFailed(_ reason: HandshakeFailureReason) {
        handshakeFailures[HandshakeFailureReason.allCases.firstIndex(of: reason)!].increment()
    }

    // MARK: - Rendering (the file writer's thread)

    /// Everything in the Prometheus text format (version 0.0.4), as node_exporter's textfile collector reads it.
    public func render() -> String {
        if let qcow2, let source = statisticsSource { publish(source.statistics, to: qcow2) }
        var text = String(decoding: registry.emitToBuffer(), as: UTF8.self)
        text += "# HELP \(Self.latencyName) Time from reading a request to its reply being ready, by command.\n"
        text += "# TYPE \(Self.latencyName) histogram\n"
        for handler in latencyHandlers { handler.emit(name: Self.latencyName, into: &text) }
        return text
    }

    /// Raises the qcow2 counters to the engine's totals (counters only go up by increments).
    private func publish(_ now: DeviceStatistics, to series: QCOW2Series) {
        series.published.update { last in
            series.cacheHits.increment(by: Int64(clamping: now.cacheHits &- last.cacheHits))
            series.cacheMisses.increment(by: Int64(clamping: now.cacheMisses &- last.cacheMisses))
            series.clustersAllocated.increment(by: Int64(clamping: now.clustersAllocated &- last.clustersAllocated))
            series.clustersFreed.increment(by: Int64(clamping: now.clustersFreed &- last.clustersFreed))
            let lookups = now.cacheHits + now.cacheMisses
            series.cacheHitRatio.set(lookups == 0 ? 0 : Double(now.cacheHits) / Double(lookups))
            last = now
        }
    }
}

/// The last statistics published, behind a lock: touched only when the file is written.
final class LockedStatistics: Sendable {
    private let state = Locked(DeviceStatistics())
    func update(_ body: (inout DeviceStatistics) -> Void) { state.withLock { body(&$0) } }
}
