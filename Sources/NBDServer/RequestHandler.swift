import BlockDevice
import Logging
import NBDProtocol
import Synchronization

/// Byte counts of one connection, logged when it closes.
final class TransferCounters: Sendable {
    let read = Atomic<UInt64>(0)
    let written = Atomic<UInt64>(0)
}

/// Turns one validated request into its reply by calling the device: no
/// sockets, so it is tested with an in-memory device alone.
struct RequestHandler: @unchecked Sendable {
    /// Most descriptors in one block status chunk: qemu-nbd's cap (1 MiB of
    /// 8-byte descriptors), kept as a count so that extended headers' 16-byte
    /// descriptors cover as much of the disk per request (2 MiB).
    static let maxDescriptors = 131_072
    /// Extents are asked of the device a window at a time, so a capped reply
    /// costs about what it holds, not what the whole range would.
    static let extentWindow: UInt64 = 128 << 20

    let device: any BlockDevice
    let session: Session
    let buffers: BufferPool
    let counters: TransferCounters
    let logger: Logger
    /// Whether reads may answer with file ranges sent by sendfile(2): on plain sockets (not TLS)
    /// to remote clients (see `ServerConfiguration.sendfileToLocalPeers`).
    var sendsFileRanges = false
    /// Reads this long and up go out by sendfile(2) when the device offers the range; below it
    /// the copy costs less than the hand-over to the writer thread that sendfile needs.
    static let fileRangeThreshold: UInt64 = 64 << 10

    /// How replies to `request` are framed; nil for simple replies.
    func framing(for request: Request) -> ChunkFraming? {
        if session.extendedHeaders { return .extended(requestOffset: request.offset) }
        return session.structuredReplies ? .structured : nil
    }

    func handle(_ request: Request, payload: UnsafeMutableRawBufferPointer?,
                contexts: ContextSelection = .all) -> Reply {
        logger.trace("Request", metadata: [
            "nbd.cmd": "\(request.command)", "nbd.offset": "\(request.offset)", "nbd.length": "\(request.length)",
        ])
        let fua = request.flags.contains(.fua)
        do throws(DeviceError) {
            switch request.command {
            case .read:
                return try read(request)
            case .write:
                try device.write(UnsafeRawBufferPointer(payload!), at: request.offset, fua: fua)
                counters.written.add(request.length, ordering: .relaxed)
            case .flush:
                try device.flush()
            case .trim:
                try device.trim(at: request.offset, length: request.length, fua: fua)
            case .writeZeroes:
                try device.writeZeroes(at: request.offset, length: request.length,
                                       mayDeallocate: !request.flags.contains(.noHole),
                                       fast: request.flags.contains(.fastZero), fua: fua)
            case .cache:
                try device.cache(at: request.offset, length: request.length)
            case .blockStatus:
                return try blockStatus(request, contexts: contexts)
            default:
                preconditionFailure("validated request with command \(request.command)")
            }
            return .status(cookie: request.cookie, error: .ok, framing: framing(for: request))
        } catch {
            logger.debug("Request failed", metadata: ["nbd.cmd": "\(request.command)", "nbd.reason": "\(error)"])
            return errorReply(request, nbdError(for: error), error.reason)
        }
    }

    /// Reads and block status errors carry a message when structured replies are on.
    func errorReply(_ request: Request, _ error: NBDError, _ message: String) -> Reply {
        // Reads must not get simple replies once chunks are agreed; for the rest a chunk is a courtesy.
        guard let framing = framing(for: request),
              session.extendedHeaders || request.command == .read || request.command == .blockStatus
        else { return .status(cookie: request.cookie, error: error, framing: nil) }
        var reply = Reply.chunks(encodeErrorChunk(framing: framing, cookie: request.cookie, error: error,
                                                  message: message))
        reply.error = error
        return reply
    }

    /// On a device thread: the data is not cached (`readIfCached` said so), so it is read here,
    /// in parallel with other requests, rather than left for the connection's one writer thread
    /// to fault in through sendfile.
    private func read(_ request: Request) throws(DeviceError) -> Reply {
        guard let data = buffers.take(Int(request.length)) else {
            throw DeviceError(.noMemory, "no memory for a \(request.length)-byte read")
        }
        do {
            try device.read(into: data, at: request.offset)
        } catch {
            buffers.give(data)
            throw error
        }
        counters.read.add(request.length, ordering: .relaxed)
        return dataReply(request, data)
    }

    /// A read answered on the calling thread if the device has the bytes at hand (a cached raw
    /// file), or a file range for sendfile whose start is cached and not zero; nil when it would
    /// wait for storage, so a device thread runs it.
    func readIfCached(_ request: Request) -> Reply? {
        guard request.command == .read else { return nil }
        // Devices without file ranges (qcow2) copy cached data here, whatever its length.
        if sendsFileRanges && request.length >= Self.fileRangeThreshold,
           let range = device.fileRange(at: request.offset, length: request.length) {
            return fileRangeIfCached(request, range)
        }
        guard let data = buffers.take(Int(request.length)) else { return nil }
        guard device.readIfCached(into: data, at: request.offset) else {
            buffers.give(data)
            return nil
        }
        counters.read.add(request.length, ordering: .relaxed)
        return dataReply(request, data)
    }

    private func fileRangeIfCached(_ request: Request, _ range: FileRange) -> Reply? {
        let framing = framing(for: request)
        if framing != nil {
            // As in `read`: data starting with zeros may be a hole, for the copy path to find.
            var probe: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
            let worthSending = withUnsafeMutableBytes(of: &probe) { bytes in
                device.readIfCached(into: bytes, at: request.offset) && !isAllZero(UnsafeRawBufferPointer(bytes))
            }
            guard worthSending else { return nil }
        }
        counters.read.add(request.length, ordering: .relaxed)
        return .fileData(cookie: request.cookie, offset: request.offset, range, count: Int(request.length),
                         framing: framing)
    }

    /// Read data as a hole chunk when it is all zeros and chunks are on, else as data.
    private func dataReply(_ request: Request, _ data: UnsafeMutableRawBufferPointer) -> Reply {
        let framing = framing(for: request)
        if let framing, isAllZero(UnsafeRawBufferPointer(data)) {
            // A hole chunk tells the client it reads as zeros, without sending them.
            buffers.give(data)
            return .hole(cookie: request.cookie, offset: request.offset, length: UInt32(request.length),
                         framing: framing)
        }
        return .data(cookie: request.cookie, offset: request.offset, data, framing: framing)
    }


    private func blockStatus(_ request: Request, contexts: ContextSelection) throws(DeviceError) -> Reply {
        let framing = framing(for: request) ?? .structured
        let extended = session.extendedHeaders
        let limit = request.flags.contains(.requestOne)
            ? 1 : Self.maxDescriptors
        let chosen = session.metaContexts.indices.filter { contexts.contains($0) }
        var chunks: [UInt8] = []
        for (n, index) in chosen.enumerated() {
            let context = session.metaContexts[index]
            let descriptors = try self.descriptors(of: context, at: request.offset, length: request.length,
                                                   limit: limit, longest: extended ? .max : UInt64(UInt32.max))
            guard !descriptors.isEmpty else { throw DeviceError(.io, "device reported no extents") }
            chunks += encodeBlockStatusChunk(framing: framing, cookie: request.cookie, final: n == chosen.count - 1,
                                             contextID: context.rawValue, descriptors: descriptors)
        }
        return .chunks(chunks)
    }

    /// At most `limit` descriptors of at most `longest` bytes each from `offset`, never past
    /// `length` (spec: BLOCK_STATUS), asking the device one window at a time and stopping at the limit.
    func descriptors(of context: MetaContext, at offset: UInt64, length: UInt64, limit: Int,
                     longest: UInt64 = UInt64(UInt32.max)) throws(DeviceError) -> [BlockStatusDescriptor] {
        var result: [BlockStatusDescriptor] = []
        var at = offset
        let end = offset + length
        while at < end && result.count < limit {
            let window = min(end - at, Self.extentWindow)
            var covered: UInt64 = 0
            for (runLength, flags) in try runs(of: context, at: at, length: window) {
                var n = min(runLength, window - covered)
                guard n > 0 else { break }
                covered += n
                if let last = result.last, last.flags == flags, last.length < longest {
                    let merged = min(n, longest - last.length)
                    result[result.count - 1].length += merged
                    n -= merged
                }
                while n > 0 {
                    guard result.count < limit else { return result }
                    let piece = min(n, longest)
                    result.append(BlockStatusDescriptor(length: piece, flags: flags))
                    n -= piece
                }
            }
            guard covered > 0 else { break }
            at += covered
        }
        return result
    }

    private func runs(of context: MetaContext, at offset: UInt64,
                      length: UInt64) throws(DeviceError) -> [(UInt64, UInt64)] {
        switch context.kind {
        case .baseAllocation:
            return try device.extents(at: offset, length: length).map {
                var flags: AllocationFlags = []
                if $0.flags.contains(.hole) { flags.insert(.hole) }
                if $0.flags.contains(.zero) { flags.insert(.zero) }
                return ($0.length, UInt64(flags.rawValue))
            }
        case .allocationDepth:
            return try device.allocationDepth(at: offset, length: length).map { ($0.length, UInt64($0.depth)) }
        case .dirtyBitmap(let name):
            // qemu's docs/interop/nbd.txt: bit 0 set means dirty.
            return try device.dirtyBitmapExtents(named: name, at: offset, length: length).map {
                ($0.length, $0.dirty ? 1 : 0)
            }
        }
    }
}
