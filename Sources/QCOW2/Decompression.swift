import CZlib
import CZstd
import SystemIO

/// Decompression of one compressed cluster. Runs on the calling thread, so
/// any number of requests decompress in parallel; only the reuse of stream
/// state goes through a short lock (allocating a zstd context or zlib
/// window per 512-byte cluster would cost more than decompressing it).
enum Decompression {
    /// Fills all of `output` from `input`, or returns false. `input` may run
    /// past the end of the compressed data: compressed clusters are stored
    /// in whole 512-byte sectors and the tail may belong to the next cluster.
    static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                           type: QCOW2Header.CompressionType) -> Bool {
        switch type {
        case .zlib: inflateRaw(input, into: output)
        case .zstd: zstdDecompress(input, into: output)
        }
    }

    /// Raw deflate (no zlib header), as qemu's qcow2_zlib_decompress reads it.
    private static func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress,
              let stream = zlibStreams.take() else { return false }
        var reusable = true
        defer { if reusable { zlibStreams.give(stream) } else { ZlibStreams.destroy(stream) } }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = uInt(input.count)
        stream.pointee.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.pointee.avail_out = uInt(output.count)
        let status = inflate(stream, Z_FINISH)
        reusable = inflateReset(stream) == Z_OK
        // Z_BUF_ERROR with a full output means the cluster ended where the stream's
        // end marker would follow; qemu accepts both.
        return (status == Z_STREAM_END || status == Z_BUF_ERROR || status == Z_OK) && stream.pointee.avail_out == 0
    }

    /// zstd frames, decoded until the cluster is full, as qcow2_zstd_decompress does.
    private static func zstdDecompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let context = zstdContexts.take() else { return false }
        defer { zstdContexts.give(context) }
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        var status = 0
        while outBuffer.pos < outBuffer.size {
            let lastIn = inBuffer.pos, lastOut = outBuffer.pos
            status = ZSTD_decompressStream(context.pointer, &outBuffer, &inBuffer)
            if ZSTD_isError(status) != 0 { return false }
            // No progress: truncated or garbage input (qemu guards the same way).
            if inBuffer.pos <= lastIn && outBuffer.pos <= lastOut { return false }
        }
        // A frame not finished within one cluster means more data than a cluster holds.
        return status == 0
    }

    private static let zlibStreams = ZlibStreams()
    private static let zstdContexts = ZstdContexts()
}

/// Idle stream states, reused across requests; at most `limit` are kept.
private final class Pool<Item>: Sendable {
    private struct Items: @unchecked Sendable { var items: [Item] = [] }
    private let idle = Locked(Items())
    private let limit = 64
    private let make: @Sendable () -> Item?
    private let reset: @Sendable (Item) -> Bool
    private let destroy: @Sendable (Item) -> Void

    init(make: @escaping @Sendable () -> Item?, reset: @escaping @Sendable (Item) -> Bool,
         destroy: @escaping @Sendable (Item) -> Void) {
        self.make = make
        self.reset = reset
        self.destroy = destroy
    }

    func take() -> Item? { idle.withLock { $0.items.popLast() } ?? make() }

    func give(_ item: Item) {
        guard reset(item) else { destroy(item); return }
        let kept = idle.withLock { state -> Bool in
            guard state.items.count < limit else { return false }
            state.items.append(item)
            return true
        }
        if !kept { destroy(item) }
    }
}

/// z_stream must not move once initialised (zlib keeps a pointer back to it),
/// so pooled streams live on the heap.
private struct ZlibStreams: Sendable {
    private let pool = Pool<UnsafeMutablePointer<z_stream>>(
        make: {
            let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            stream.initialize(to: z_stream())
            guard czlib_inflate_init_raw(stream) == Z_OK else { stream.deallocate(); return nil }
            return stream
        },
        reset: { _ in true },  // inflateReset runs right after each use
        destroy: { ZlibStreams.destroy($0) })

    func take() -> UnsafeMutablePointer<z_stream>? { pool.take() }
    func give(_ stream: UnsafeMutablePointer<z_stream>) { pool.give(stream) }

    static func destroy(_ stream: UnsafeMutablePointer<z_stream>) {
        inflateEnd(stream)
        stream.deallocate()
    }
}

private struct ZstdContext: @unchecked Sendable { let pointer: OpaquePointer }

private struct ZstdContexts: Sendable {
    private let pool = Pool<ZstdContext>(
        make: { ZSTD_createDCtx().map(ZstdContext.init) },
        reset: { ZSTD_isError(ZSTD_DCtx_reset($0.pointer, ZSTD_reset_session_only)) == 0 },
        destroy: { _ = ZSTD_freeDCtx($0.pointer) })

    func take() -> ZstdContext? { pool.take() }
    func give(_ context: ZstdContext) { pool.give(context) }
}
