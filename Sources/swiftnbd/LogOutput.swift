import Glibc
import Logging
import SystemIO

/// Where log lines go: stderr by default, or a file that SIGHUP reopens so
/// logrotate can move it away.
final class LogOutput: @unchecked Sendable {
    private let lock = Lock()
    private let path: String?
    private var fd: Int32

    init(path: String?) throws {
        self.path = path
        fd = STDERR_FILENO
        if path != nil { try reopen() }
    }

    func reopen() throws {
        guard let path else { return }
        let newFD = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
        guard newFD >= 0 else { throw StartupFailure("cannot open log file '\(path)': \(String(cString: strerror(errno)))") }
        lock.withLock {
            if fd != STDERR_FILENO { close(fd) }
            fd = newFD
        }
    }

    func write(_ line: String) {
        var line = line
        line.withUTF8 { bytes in
            lock.withLock { _ = Glibc.write(fd, bytes.baseAddress, bytes.count) }
        }
    }
}

struct StartupFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// One line per event: time, level, message, then the metadata as key=value.
struct LineLogHandler: LogHandler {
    let label: String
    let output: LogOutput
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { $1 } }
        let fields = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let time = iso8601Now()
        output.write("\(time) \(event.level) \(label): \(event.message)\(fields.isEmpty ? "" : " " + fields)\n")
    }
}

/// The current UTC time as ISO 8601 to the second ("2026-12-01T17:53:40Z").
func iso8601Now() -> String {
    var seconds = time(nil)
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func padded(_ value: Int32, _ width: Int) -> String {
        let digits = String(value)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
    return padded(parts.tm_year + 1900, 4) + "-" + padded(parts.tm_mon + 1, 2) + "-" + padded(parts.tm_mday, 2)
        + "T" + padded(parts.tm_hour, 2) + ":" + padded(parts.tm_min, 2) + ":" + padded(parts.tm_sec, 2) + "Z"
}
