import CLibNBD
import Foundation

public struct NBDClientError: Error, CustomStringConvertible {
    public var message: String
    public var errno: Int32
    public var description: String { "libnbd: \(message) (errno \(errno))" }

    static func last() -> NBDClientError {
        NBDClientError(message: nbd_get_error().map { String(cString: $0) } ?? "unknown", errno: nbd_get_errno())
    }
}

/// A libnbd handle: the real client the tests drive the server with.
public final class NBDClient {
    public let handle: OpaquePointer

    /// Connects to `uri`, optionally asking for metadata contexts first.
    public init(uri: String, metaContexts: [String] = [], structuredReplies: Bool = true) throws {
        guard let h = nbd_create() else { throw NBDClientError.last() }
        handle = h
        nbd_set_request_structured_replies(h, structuredReplies)
        for context in metaContexts { nbd_add_meta_context(h, context) }
        guard nbd_connect_uri(h, uri) == 0 else {
            let error = NBDClientError.last()
            nbd_close(h)
            throw error
        }
    }

    deinit { nbd_close(handle) }

    public var size: Int64 { nbd_get_size(handle) }
    public var isReadOnly: Bool { nbd_is_read_only(handle) == 1 }
    public var canFlush: Bool { nbd_can_flush(handle) == 1 }
    public var canTrim: Bool { nbd_can_trim(handle) == 1 }
    public var canZero: Bool { nbd_can_zero(handle) == 1 }
    public var canMultiConn: Bool { nbd_can_multi_conn(handle) == 1 }
    public var structuredReplies: Bool { nbd_get_structured_replies_negotiated(handle) == 1 }
    public func canMetaContext(_ name: String) -> Bool { nbd_can_meta_context(handle, name) == 1 }

    public func pread(count: Int, offset: UInt64, flags: UInt32 = 0) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        let r = buffer.withUnsafeMutableBytes { nbd_pread(handle, $0.baseAddress!, count, offset, flags) }
        guard r == 0 else { throw NBDClientError.last() }
        return buffer
    }

    public func pwrite(_ data: [UInt8], offset: UInt64, flags: UInt32 = 0) throws {
        let r = data.withUnsafeBytes { nbd_pwrite(handle, $0.baseAddress!, data.count, offset, flags) }
        guard r == 0 else { throw NBDClientError.last() }
    }

    public func flush() throws {
        guard nbd_flush(handle, 0) == 0 else { throw NBDClientError.last() }
    }

    public func trim(count: UInt64, offset: UInt64) throws {
        guard nbd_trim(handle, count, offset, 0) == 0 else { throw NBDClientError.last() }
    }

    public func zero(count: UInt64, offset: UInt64, flags: UInt32 = 0) throws {
        guard nbd_zero(handle, count, offset, flags) == 0 else { throw NBDClientError.last() }
    }

    public func cache(count: UInt64, offset: UInt64) throws {
        guard nbd_cache(handle, count, offset, 0) == 0 else { throw NBDClientError.last() }
    }

    /// (length, flags) pairs the server reports for `context` from `offset`.
    public func blockStatus(count: UInt64, offset: UInt64, context: String = "base:allocation",
                            flags: UInt32 = 0) throws -> [(length: UInt32, flags: UInt32)] {
        final class Box {
            let context: String
            var entries: [(UInt32, UInt32)] = []
            init(_ c: String) { context = c }
        }
        let box = Box(context)
        let unmanaged = Unmanaged.passRetained(box)
        defer { unmanaged.release() }
        let callback = nbd_extent_callback(
            callback: { userData, metacontext, _, entries, count, _ in
                let box = Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue()
                guard let metacontext, String(cString: metacontext) == box.context, let entries else { return 0 }
                for i in stride(from: 0, to: count - 1, by: 2) { box.entries.append((entries[i], entries[i + 1])) }
                return 0
            },
            user_data: unmanaged.toOpaque(), free: nil)
        guard nbd_block_status(handle, count, offset, callback, flags) == 0 else { throw NBDClientError.last() }
        return box.entries.map { (length: $0.0, flags: $0.1) }
    }

    /// Issues all reads at once, then waits for every one; returns them in request order.
    public func pipelinedReads(_ ranges: [(offset: UInt64, count: Int)]) throws -> [[UInt8]] {
        let buffers = ranges.map { UnsafeMutableRawBufferPointer.allocate(byteCount: $0.count, alignment: 8) }
        defer { for b in buffers { b.deallocate() } }
        var cookies: [Int64] = []
        for (i, range) in ranges.enumerated() {
            let cookie = nbd_aio_pread(handle, buffers[i].baseAddress!, range.count, range.offset,
                                       nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)
            guard cookie > 0 else { throw NBDClientError.last() }
            cookies.append(cookie)
        }
        var pending = Set(cookies)
        while !pending.isEmpty {
            for cookie in pending {
                let r = nbd_aio_command_completed(handle, UInt64(cookie))
                if r == 1 { pending.remove(cookie) } else if r == -1 { throw NBDClientError.last() }
            }
            if !pending.isEmpty, nbd_poll(handle, 5000) == -1 { throw NBDClientError.last() }
        }
        return buffers.map { Array(UnsafeRawBufferPointer($0)) }
    }

    public func shutdown() {
        nbd_shutdown(handle, 0)
    }
}
