import CoreMetrics
import Synchronization

/// A Prometheus histogram of durations that records with atomic adds only.
/// swift-prometheus's own histogram takes a lock per sample, which the
/// request path must not; this one is a swift-metrics `TimerHandler` with
/// one atomic counter per bucket, made cumulative only when emitted.
final class LatencyHistogram: TimerHandler, Sendable {
    /// Upper bounds in seconds as written in `le`, and the same in nanoseconds.
    static let bounds: [(label: String, nanoseconds: Int64)] = [
        ("0.00005", 50_000), ("0.0001", 100_000), ("0.00025", 250_000), ("0.0005", 500_000),
        ("0.001", 1_000_000), ("0.0025", 2_500_000), ("0.005", 5_000_000), ("0.01", 10_000_000),
        ("0.025", 25_000_000), ("0.05", 50_000_000), ("0.1", 100_000_000), ("0.25", 250_000_000),
        ("0.5", 500_000_000), ("1", 1_000_000_000), ("2.5", 2_500_000_000), ("5", 5_000_000_000),
        ("10", 10_000_000_000),
    ]

    private final class Cell: Sendable {
        let value = Atomic<UInt64>(0)
    }

    /// `bounds` in nanoseconds alone, read on every sample.
    private let limits: [Int64] = LatencyHistogram.bounds.map(\.nanoseconds)
    /// Samples per bucket, not cumulative; the last one is above every bound.
    private let buckets: [Cell] = (0...LatencyHistogram.bounds.count).map { _ in Cell() }
    private let sumNanoseconds = Atomic<UInt64>(0)
    /// The labels, rendered once as `a="x",b="y"`.
    let renderedLabels: String

    init(labels: [(String, String)]) {
        renderedLabels = PrometheusText.labels(labels)
    }

    func recordNanoseconds(_ duration: Int64) {
        let value = max(duration, 0)
        var index = 0
        while index < limits.count && value > limits[index] { index += 1 }
        buckets[index].value.add(1, ordering: .relaxed)
        sumNanoseconds.add(UInt64(value), ordering: .relaxed)
    }

    /// The `_bucket`, `_sum` and `_count` lines. `+Inf` and `_count` are the sum of
    /// the buckets as read, so the lines always agree with each other.
    func emit(name: String, into text: inout String) {
        var cumulative: UInt64 = 0
        let sum = sumNanoseconds.load(ordering: .relaxed)
        for (index, bound) in Self.bounds.enumerated() {
            cumulative += buckets[index].value.load(ordering: .relaxed)
            text += "\(name)_bucket{\(renderedLabels),le=\"\(bound.label)\"} \(cumulative)\n"
        }
        cumulative += buckets[Self.bounds.count].value.load(ordering: .relaxed)
        text += "\(name)_bucket{\(renderedLabels),le=\"+Inf\"} \(cumulative)\n"
        text += "\(name)_sum{\(renderedLabels)} \(Double(sum) / 1e9)\n"
        text += "\(name)_count{\(renderedLabels)} \(cumulative)\n"
    }
}

/// Pieces of the Prometheus text exposition format.
enum PrometheusText {
    /// `a="x",b="y"`, with backslash, quote and newline escaped as the format requires.
    static func labels(_ labels: [(String, String)]) -> String {
        labels.map { name, value in
            var escaped = ""
            for character in value {
                switch character {
                case "\\": escaped += "\\\\"
                case "\"": escaped += "\\\""
                case "\n": escaped += "\\n"
                default: escaped.append(character)
                }
            }
            return "\(name)=\"\(escaped)\""
        }.joined(separator: ",")
    }
}
