import CLibNBD
import Foundation

public struct NBDClientError: Error, CustomStringConvertible {
    public var message: String
    public var errno: Int32
    public var description: String { "libnbd: \(message) (errno \(errno))" }

    public init(message: String, errno: Int32) {
        self.message = message
        self.errno = errno
    }

    /// libnbd's last error on this thread, prefixed with what we were doing.
    static func last(_ what: String) -> NBDClientError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
        return NBDClientError(message: "\(what): \(message)", errno: nbd_get_errno())
    }
}

/// A libnbd handle: the real client the tests drive the server with.
///
/// Every call has a deadline (`timeout`, 30 s unless told): it goes through libnbd's
/// asynchronous API (`nbd_aio_*`, then `nbd_poll` until the command completes), so a server
/// that never answers fails the test with an error naming the call instead of hanging it, as
/// the blocking `nbd_connect_uri` or `nbd_pread` would. After a timeout the command may still
/// be in flight, so the client refuses further calls: libnbd must not write into a buffer the
/// caller has already let go.
public final class NBDClient {
    public let handle: OpaquePointer
    /// How long each call (connect, a command, disconnect) may wait for the server.
    public var timeout: Duration
    private var timedOut: String?

    /// Connects to `uri` (`nbd://127.0.0.1:PORT[/EXPORT]`, `nbd+unix:///?socket=PATH`) and finishes
    /// the handshake, optionally asking for metadata contexts first.
    public init(uri: String, metaContexts: [String] = [], structuredReplies: Bool = true,
                timeout: Duration = .seconds(30)) throws {
        guard let h = nbd_create() else { throw NBDClientError.last("nbd_create") }
        handle = h
        self.timeout = timeout
        nbd_set_request_structured_replies(h, structuredReplies)
        // nbds:// URIs name credential files (tls-certificates=, tls-psk-file=); tests' URIs are trusted.
        nbd_set_uri_allow_local_file(h, true)
        for context in metaContexts { nbd_add_meta_context(h, context) }
        let what = "connect to \(uri)"
        guard nbd_aio_connect_uri(h, uri) == 0 else { throw NBDClientError.last(what) }
        try poll(until: { nbd_aio_is_connecting(h) == 0 }, doing: what)
        guard nbd_aio_is_ready(h) == 1 else { throw NBDClientError.last(what) }
    }

    /// Connects on fresh handles until one gets through or `retryingFor` passes, for servers
    /// that are still starting. Each failed attempt waits 50 ms before the next.
    public static func connect(_ uri: String, retryingFor window: Duration, metaContexts: [String] = [],
                               structuredReplies: Bool = true) throws -> NBDClient {
        let deadline = ContinuousClock.now + window
        while true {
            do {
                let client = try NBDClient(uri: uri, metaContexts: metaContexts, structuredReplies: structuredReplies,
                                           timeout: max(deadline - ContinuousClock.now, .milliseconds(1)))
                client.timeout = .seconds(30)
                return client
            } catch {
                if ContinuousClock.now >= deadline { throw error }
                usleep(50_000)
            }
        }
    }

    deinit { nbd_close(handle) }

    public var size: Int64 { nbd_get_size(handle) }
    public var isReadOnly: Bool { nbd_is_read_only(handle) == 1 }
    public var canFlush: Bool { nbd_can_flush(handle) == 1 }
    public var canTrim: Bool { nbd_can_trim(handle) == 1 }
    public var canZero: Bool { nbd_can_zero(handle) == 1 }
    public var canFastZero: Bool { nbd_can_fast_zero(handle) == 1 }
    public var canMultiConn: Bool { nbd_can_multi_conn(handle) == 1 }
    public var structuredReplies: Bool { nbd_get_structured_replies_negotiated(handle) == 1 }
    public func canMetaContext(_ name: String) -> Bool { nbd_can_meta_context(handle, name) == 1 }

    public func pread(count: Int, offset: UInt64, flags: UInt32 = 0) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        try buffer.withUnsafeMutableBytes { raw in
            try run("pread \(count)@\(offset)") {
                nbd_aio_pread(handle, raw.baseAddress!, count, offset, Self.noCompletion, flags)
            }
        }
        return buffer
    }

    /// Reads the whole export, 1 MiB at a time.
    public func readAll() throws -> [UInt8] {
        let total = Int(size)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(total)
        while bytes.count < total {
            bytes += try pread(count: min(1 << 20, total - bytes.count), offset: UInt64(bytes.count))
        }
        return bytes
    }

    public func pwrite(_ data: [UInt8], offset: UInt64, flags: UInt32 = 0) throws {
        try data.withUnsafeBytes { raw in
            try run("pwrite \(raw.count)@\(offset)") {
                nbd_aio_pwrite(handle, raw.baseAddress!, raw.count, offset, Self.noCompletion, flags)
            }
        }
    }

    public func flush() throws {
        try run("flush") { nbd_aio_flush(handle, Self.noCompletion, 0) }
    }

    public func trim(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws {
        try run("trim \(count)@\(offset)") { nbd_aio_trim(handle, count, offset, Self.noCompletion, flags) }
    }

    public func zero(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws {
        try run("zero \(count)@\(offset)") { nbd_aio_zero(handle, count, offset, Self.noCompletion, flags) }
    }

    public func cache(count: UInt64, offset: UInt64) throws {
        try run("cache \(count)@\(offset)") { nbd_aio_cache(handle, count, offset, Self.noCompletion, 0) }
    }

    /// (length, flags) pairs the server reports for `context` from `offset`.
    public func blockStatus(count: UInt64, offset: UInt64, context: String = "base:allocation",
                            flags: UInt32 = 0) throws -> [(length: UInt32, flags: UInt32)] {
        final class Box {
            let context: String
            var entries: [(UInt32, UInt32)] = []
            init(_ c: String) { context = c }
        }
        try checkUsable()
        let box = Box(context)
        // libnbd releases its reference through `free` once it is done with the callback, which
        // may be after a timeout here.
        let callback = nbd_extent_callback(
            callback: { userData, metacontext, _, entries, count, _ in
                let box = Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue()
                guard let metacontext, String(cString: metacontext) == box.context, let entries else { return 0 }
                for i in stride(from: 0, to: count - 1, by: 2) { box.entries.append((entries[i], entries[i + 1])) }
                return 0
            },
            user_data: Unmanaged.passRetained(box).toOpaque(),
            free: { userData in Unmanaged<Box>.fromOpaque(userData!).release() })
        try run("block_status \(count)@\(offset) \(context)") {
            nbd_aio_block_status(handle, count, offset, callback, Self.noCompletion, flags)
        }
        return box.entries.map { (length: $0.0, flags: $0.1) }
    }

    /// Issues all reads at once, then waits for every one; returns them in request order.
    public func pipelinedReads(_ ranges: [(offset: UInt64, count: Int)]) throws -> [[UInt8]] {
        try checkUsable()
        let buffers = ranges.map { UnsafeMutableRawBufferPointer.allocate(byteCount: $0.count, alignment: 8) }
        var cookies: [Int64] = []
        var firstError: NBDClientError?
        for (i, range) in ranges.enumerated() {
            let cookie = nbd_aio_pread(handle, buffers[i].baseAddress!, range.count, range.offset, Self.noCompletion, 0)
            guard cookie > 0 else {
                firstError = NBDClientError.last("pread \(range.count)@\(range.offset)")
                break
            }
            cookies.append(cookie)
        }
        // Every issued read must be retired before its buffer is freed, even if one failed.
        var pending = Set(cookies)
        try poll(until: {
            for cookie in pending {
                let r = nbd_aio_command_completed(handle, UInt64(cookie))
                if r == 0 { continue }
                if r == -1, firstError == nil { firstError = NBDClientError.last("pipelined pread") }
                pending.remove(cookie)
            }
            return pending.isEmpty
        }, doing: "\(cookies.count) pipelined reads")  // throwing, it leaves the buffers to libnbd
        defer { for b in buffers { b.deallocate() } }
        if let firstError { throw firstError }
        return buffers.map { Array(UnsafeRawBufferPointer($0)) }
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    public func disconnect() throws {
        try checkUsable()
        guard nbd_aio_disconnect(handle, 0) == 0 else { throw NBDClientError.last("disconnect") }
        try poll(until: { nbd_aio_is_closed(handle) == 1 || nbd_aio_is_dead(handle) == 1 }, doing: "disconnect")
    }

    /// Disconnects if the handle is connected; a failure or timeout is left for the test's later
    /// checks (the server's exit status, its log) to show.
    public func shutdown() {
        guard timedOut == nil, nbd_aio_is_ready(handle) == 1 else { return }
        try? disconnect()
    }

    // MARK: - Polling

    private static var noCompletion: nbd_completion_callback {
        nbd_completion_callback(callback: nil, user_data: nil, free: nil)
    }

    private func checkUsable() throws {
        if let timedOut {
            throw NBDClientError(message: "unusable: \(timedOut) timed out earlier", errno: ETIMEDOUT)
        }
    }

    /// Issues one command with `issue` (an `nbd_aio_*` call returning a cookie) and waits until it completes.
    private func run(_ what: String, _ issue: () -> Int64) throws {
        try checkUsable()
        let cookie = issue()
        guard cookie > 0 else { throw NBDClientError.last(what) }
        var completed: Int32 = 0
        try poll(until: {
            completed = nbd_aio_command_completed(handle, UInt64(cookie))
            return completed != 0
        }, doing: what)
        guard completed == 1 else { throw NBDClientError.last(what) }
    }

    /// Runs libnbd's state machine until `done` or the deadline; throws naming `what` on timeout.
    private func poll(until done: () -> Bool, doing what: String) throws {
        let deadline = ContinuousClock.now + timeout
        while !done() {
            let left = deadline - ContinuousClock.now
            guard left > .zero else {
                timedOut = what
                throw NBDClientError(message: "\(what): no answer within \(timeout)", errno: ETIMEDOUT)
            }
            let millis = left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000 + 1
            if nbd_poll(handle, Int32(min(millis, 1000))) == -1 {
                if done() { return }
                throw NBDClientError.last(what)
            }
        }
    }
}
