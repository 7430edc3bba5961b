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
    /// Most descriptors in one block status chunk: 1 MiB of them, as qemu-nbd caps it.
    static let maxDescriptors = (1 << 20) / 8
    /// Extents are asked of the device a window at a time, so a capped reply
    /// costs about what it holds, not what the whole range would.
    static let extentWindow: UInt64 = 128 << 20

    let device: any BlockDevice
    let session: Session
    let buffers: BufferPool
    let counters: TransferCounters
    let logger: Logger

    func handle(_ request: Request, payload: UnsafeMutableRawBufferPointer?) -> Reply {
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
                counters.written.add(UInt64(request.length), ordering: .relaxed)
            case .flush:
                try device.flush()
            case .trim:
                try device.trim(at: request.offset, length: UInt64(request.length), fua: fua)
            case .writeZeroes:
                try device.writeZeroes(at: request.offset, length: UInt64(request.length),
                                       mayDeallocate: !request.flags.contains(.noHole),
                                       fast: request.flags.contains(.fastZero), fua: fua)
            case .cache:
                try device.cache(at: request.offset, length: UInt64(request.length))
            case .blockStatus:
                return try blockStatus(request)
            default:
                preconditionFailure("validated request with command \(request.command)")
            }
            return .simple(cookie: request.cookie, error: .ok)
        } catch {
            logger.debug("Request failed", metadata: ["nbd.cmd": "\(request.command)", "nbd.reason": "\(error)"])
            return errorReply(request, nbdError(for: error), error.reason)
        }
    }

    /// Reads and block status errors carry a message when structured replies are on.
    func errorReply(_ request: Request, _ error: NBDError, _ message: String) -> Reply {
        guard session.structuredReplies && (request.command == .read || request.command == .blockStatus) else {
            return .simple(cookie: request.cookie, error: error)
        }
        var reply = Reply.chunks(encodeErrorChunk(cookie: request.cookie, error: error, message: message))
        reply.error = error
        return reply
    }

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
        counters.read.add(UInt64(request.length), ordering: .relaxed)
        if session.structuredReplies && isAllZero(UnsafeRawBufferPointer(data)) {
            // A hole chunk tells the client it reads as zeros, without sending them.
            buffers.give(data)
            return .hole(cookie: request.cookie, offset: request.offset, length: request.length)
        }
        return .data(cookie: request.cookie, offset: request.offset, data, structured: session.structuredReplies)
    }

    private func blockStatus(_ request: Request) throws(DeviceError) -> Reply {
        let one = request.flags.contains(.requestOne)
        var chunks: [UInt8] = []
        for (index, context) in session.metaContexts.enumerated() {
            let descriptors = try self.descriptors(of: context, at: request.offset, length: UInt64(request.length),
                                                   limit: one ? 1 : Self.maxDescriptors)
            guard !descriptors.isEmpty else { throw DeviceError(.io, "device reported no extents") }
            chunks += encodeBlockStatusChunk(cookie: request.cookie, final: index == session.metaContexts.count - 1,
                                             contextID: context.rawValue, descriptors: descriptors)
        }
        return .chunks(chunks)
    }

    /// At most `limit` descriptors from `offset`, never past `length` (spec: BLOCK_STATUS),
    /// asking the device one window at a time and stopping at the limit.
    func descriptors(of context: MetaContext, at offset: UInt64, length: UInt64,
                     limit: Int) throws(DeviceError) -> [BlockStatusDescriptor] {
        var result: [BlockStatusDescriptor] = []
        var at = offset
        let end = offset + length
        while at < end && result.count < limit {
            let window = min(end - at, Self.extentWindow)
            var covered: UInt64 = 0
            for (runLength, flags) in try runs(of: context, at: at, length: window) {
                let n = min(runLength, window - covered)
                guard n > 0 else { break }
                covered += n
                if let last = result.last, last.flags == flags, UInt64(last.length) + n <= UInt64(UInt32.max) {
                    result[result.count - 1].length += UInt32(n)
                } else if result.count < limit {
                    result.append(BlockStatusDescriptor(length: UInt32(n), flags: flags))
                } else {
                    return result
                }
            }
            guard covered > 0 else { break }
            at += covered
        }
        return result
    }

    private func runs(of context: MetaContext, at offset: UInt64,
                      length: UInt64) throws(DeviceError) -> [(UInt64, UInt32)] {
        switch context {
        case .baseAllocation:
            return try device.extents(at: offset, length: length).map {
                var flags: AllocationFlags = []
                if $0.flags.contains(.hole) { flags.insert(.hole) }
                if $0.flags.contains(.zero) { flags.insert(.zero) }
                return ($0.length, flags.rawValue)
            }
        case .allocationDepth:
            return try device.allocationDepth(at: offset, length: length).map { ($0.length, $0.depth) }
        }
    }
}
