import CZlib
import CZstd

/// Decompression of one compressed cluster. Runs on the calling thread;
/// each call has its own stream state, so any number may run at once.
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
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        var stream = z_stream()
        guard czlib_inflate_init_raw(&stream) == Z_OK else { return false }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let status = inflate(&stream, Z_FINISH)
        // Z_BUF_ERROR with a full output means the cluster ended where the stream's
        // end marker would follow; qemu accepts both.
        return (status == Z_STREAM_END || status == Z_BUF_ERROR || status == Z_OK) && stream.avail_out == 0
    }

    /// zstd frames, decoded until the cluster is full, as qcow2_zstd_decompress does.
    private static func zstdDecompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let context = ZSTD_createDCtx() else { return false }
        defer { ZSTD_freeDCtx(context) }
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        var status = 0
        while outBuffer.pos < outBuffer.size {
            let lastIn = inBuffer.pos, lastOut = outBuffer.pos
            status = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
            if ZSTD_isError(status) != 0 { return false }
            // No progress: truncated or garbage input (qemu guards the same way).
            if inBuffer.pos <= lastIn && outBuffer.pos <= lastOut { return false }
        }
        // A frame not finished within one cluster means more data than a cluster holds.
        return status == 0
    }
}
