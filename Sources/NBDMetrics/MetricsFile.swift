import Dispatch
import Logging
import SystemIO

/// Keeps a Prometheus text file up to date for node_exporter's textfile
/// collector: rewritten every `interval` seconds and once more at `stop()`.
/// Each write goes to `PATH.tmp` and is renamed over `PATH`, so a reader
/// sees the old file or the new one, never half of one (the collector
/// reads only `*.prom`, so it skips the temporary file).
public final class MetricsFile: @unchecked Sendable {
    public let path: String
    private let render: @Sendable () -> String
    private let logger: Logger
    private let queue = DispatchQueue(label: "swiftnbd.metrics")
    // Owned by queue.
    private var timer: (any DispatchSourceTimer)?
    private var failing = false

    /// Writes the file once, so a path that can't be written is refused at start.
    /// - Throws: the `Errno` of the failed open, write or rename.
    public init(path: String, interval: Double, logger: Logger,
                render: @escaping @Sendable () -> String) throws(Errno) {
        self.path = path
        self.render = render
        self.logger = logger
        try Self.write(render(), to: path)
        let timer = DispatchSource.makeTimerSource(queue: queue)
        let period = DispatchTimeInterval.milliseconds(max(1, Int(interval * 1000)))
        timer.schedule(deadline: .now() + period, repeating: period)
        timer.setEventHandler { [unowned self] in writeNow() }
        queue.sync { self.timer = timer }
        timer.resume()
    }

    /// Stops the timer and writes the final numbers.
    public func stop() {
        queue.sync {
            timer?.cancel()
            timer = nil
            writeNow()
        }
    }

    /// On `queue`. A failure is logged once, not every interval, until a write works again.
    private func writeNow() {
        do throws(Errno) {
            try Self.write(render(), to: path)
            if failing { logger.warning("Metrics file written again", metadata: ["nbd.metrics_file": "\(path)"]) }
            failing = false
        } catch {
            if !failing {
                logger.warning("Cannot write the metrics file", metadata: [
                    "nbd.metrics_file": "\(path)", "nbd.reason": "\(error)",
                ])
            }
            failing = true
        }
    }

    /// Readable by all: node_exporter runs as another user, and the units' UMask=0077 would hide it.
    static func write(_ text: String, to path: String) throws(Errno) {
        try FileHandle.replace(path, contents: Array(text.utf8), permissions: 0o644)
    }
}
