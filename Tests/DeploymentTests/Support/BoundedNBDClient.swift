import CLibNBD
import Foundation

/// A libnbd client whose every call has a deadline. It drives libnbd's asynchronous API
/// (`nbd_aio_*` plus `nbd_poll`) so that a server that never answers fails the test with a
/// message instead of hanging it, which the blocking `nbd_connect_uri` would do.
final class BoundedNBDClient {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private let handle: OpaquePointer

    init() throws {
        guard let handle = nbd_create() else { throw Failure(description: "nbd_create: \(Self.lastError)") }
        self.handle = handle
    }

    deinit { nbd_close(handle) }

    /// Connects to `uri` (`nbd://127.0.0.1:PORT`, `nbd+unix:///?socket=PATH`) and finishes the handshake.
    func connect(_ uri: String, timeout: Duration = .seconds(10)) throws {
        guard nbd_aio_connect_uri(handle, uri) == 0 else {
            throw Failure(description: "connect to \(uri): \(Self.lastError)")
        }
        try poll(until: { nbd_aio_is_connecting(handle) == 0 }, timeout: timeout, doing: "connect to \(uri)")
        guard nbd_aio_is_ready(handle) == 1 else {
            throw Failure(description: "connect to \(uri): \(Self.lastError)")
        }
    }

    /// Tries `connect` on fresh handles until one succeeds or `timeout` passes, for servers
    /// that are still starting. Each failed attempt waits 50 ms.
    static func connect(_ uri: String, retryingFor timeout: Duration) throws -> BoundedNBDClient {
        let deadline = ContinuousClock.now + timeout
        while true {
            let client = try BoundedNBDClient()
            do {
                try client.connect(uri, timeout: max(deadline - ContinuousClock.now, .milliseconds(1)))
                return client
            } catch {
                if ContinuousClock.now >= deadline { throw error }
                usleep(50_000)
            }
        }
    }

    /// The export size the server announced.
    var size: Int64 { nbd_get_size(handle) }

    func pread(count: Int, offset: UInt64, timeout: Duration = .seconds(10)) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        try buffer.withUnsafeMutableBytes { raw in
            let cookie = nbd_aio_pread(handle, raw.baseAddress!, count, offset, Self.noCompletion, 0)
            try wait(for: cookie, timeout: timeout, doing: "pread \(count)@\(offset)")
        }
        return buffer
    }

    /// Reads the whole export, 1 MiB at a time.
    func readAll(timeout: Duration = .seconds(30)) throws -> [UInt8] {
        let total = Int(size)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(total)
        var offset = 0
        while offset < total {
            let n = min(1 << 20, total - offset)
            bytes += try pread(count: n, offset: UInt64(offset), timeout: timeout)
            offset += n
        }
        return bytes
    }

    func pwrite(_ bytes: [UInt8], offset: UInt64, timeout: Duration = .seconds(10)) throws {
        try bytes.withUnsafeBytes { raw in
            let cookie = nbd_aio_pwrite(handle, raw.baseAddress!, raw.count, offset, Self.noCompletion, 0)
            try wait(for: cookie, timeout: timeout, doing: "pwrite \(raw.count)@\(offset)")
        }
    }

    func flush(timeout: Duration = .seconds(10)) throws {
        let cookie = nbd_aio_flush(handle, Self.noCompletion, 0)
        try wait(for: cookie, timeout: timeout, doing: "flush")
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    func disconnect(timeout: Duration = .seconds(10)) throws {
        guard nbd_aio_disconnect(handle, 0) == 0 else {
            throw Failure(description: "disconnect: \(Self.lastError)")
        }
        try poll(until: { nbd_aio_is_closed(handle) == 1 || nbd_aio_is_dead(handle) == 1 },
                 timeout: timeout, doing: "disconnect")
    }

    // MARK: - Polling

    private static var noCompletion: nbd_completion_callback {
        nbd_completion_callback(callback: nil, user_data: nil, free: nil)
    }

    private static var lastError: String {
        nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
    }

    private func wait(for cookie: Int64, timeout: Duration, doing what: String) throws {
        guard cookie >= 0 else { throw Failure(description: "\(what): \(Self.lastError)") }
        var completed: Int32 = 0
        try poll(until: {
            completed = nbd_aio_command_completed(handle, UInt64(cookie))
            return completed != 0
        }, timeout: timeout, doing: what)
        guard completed == 1 else { throw Failure(description: "\(what): \(Self.lastError)") }
    }

    private func poll(until done: () -> Bool, timeout: Duration, doing what: String) throws {
        let deadline = ContinuousClock.now + timeout
        while !done() {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw Failure(description: "\(what): no answer within \(timeout)") }
            let millis = Int32(min(left.components.seconds * 1000 + 1, 1000))
            if nbd_poll(handle, millis) == -1 {
                if done() { return }
                throw Failure(description: "\(what): \(Self.lastError)")
            }
        }
    }
}
