import Logging
import NBDProtocol

/// Reads requests in transmission on the connection's own thread, checks
/// them, and hands them on: valid ones to a device thread, invalid ones
/// straight to an error reply. Before reading each request's payload it
/// reserves the bytes the request will hold (its payload, or its reply), so
/// a client that does not read its replies stops being read from
/// (backpressure) instead of growing the server.
struct TransmissionReader {
    struct Ending {
        var status: Connection.Status
        var reason: String
    }

    /// Each request is counted at least this much, which also bounds how many
    /// small requests a connection can have waiting.
    static let minimumCost = 4096

    let connection: Connection
    let session: Session
    let exportSize: UInt64
    let logger: Logger

    /// Reads until the client disconnects, breaks the protocol, or the connection stops reading.
    mutating func run(_ reader: inout SocketReader) -> Ending {
        let extended = session.extendedHeaders
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: Request.wireSize(extended: extended),
                                                            alignment: 8)
        defer { header.deallocate() }
        while true {
            do throws(SocketReader.Failure) {
                try reader.readExactly(into: header, pollingFirst: connection.hasNothingInFlight)
            } catch {
                return Self.ending(error)
            }
            var r = WireReader(UnsafeRawBufferPointer(header))
            let request: Request
            do {
                request = try Request.decode(&r, extended: extended)!
            } catch {
                return Ending(status: .draining, reason: "bad request: \(error)")
            }
            if request.command == .disconnect {
                // The spec: handle all outstanding requests, then close.
                return Ending(status: .draining, reason: "client disconnected")
            }
            let payloadLength = request.payloadLength(extended: extended)
            let cost = cost(of: request)
            guard connection.reserve(cost) else {
                return Ending(status: .draining, reason: "connection stopped reading")
            }
            // A payload is drained to keep the stream in step, but only up to what a request may carry.
            guard payloadLength <= UInt64(Limits.maxPayload) else {
                connection.reject(request, .invalid, "payload of \(payloadLength) bytes is over the limit", cost: cost)
                return Ending(status: .draining, reason: "payload of \(payloadLength) bytes is over the limit")
            }
            var effective = request
            var contexts = ContextSelection.all
            let payloadForm = extended && request.command == .blockStatus && request.flags.contains(.payloadLength)
                && session.flags.contains(.blockStatusPayload)
            if payloadForm {
                // The payload says which contexts and how far: it is read before the request is checked.
                let payload: UnsafeMutableRawBufferPointer
                switch readPayload(of: request, length: payloadLength, cost: cost, &reader) {
                case .read(let bytes): payload = bytes
                case .refused: continue
                case .ended(let ending): return ending
                }
                let selected = selection(from: UnsafeRawBufferPointer(payload))
                connection.giveBack(payload)
                guard case .success(let (length, chosen)) = selected else {
                    if case .failure(let why) = selected { connection.reject(request, .invalid, "\(why)", cost: cost) }
                    continue
                }
                effective.length = length
                effective.flags.remove(.payloadLength)
                contexts = chosen
            }
            if let (error, why) = validate(effective, size: exportSize, session: session) {
                if let ending = reject(request, error, why, cost: cost, skipping: payloadForm ? 0 : payloadLength,
                                       &reader) { return ending }
                continue
            }
            guard effective.command == .write else {
                connection.submit(effective, payload: nil, contexts: contexts, cost: cost)
                continue
            }
            switch readPayload(of: request, length: payloadLength, cost: cost, &reader) {
            case .read(let payload): connection.submit(effective, payload: payload, contexts: contexts, cost: cost)
            case .refused: continue
            case .ended(let ending): return ending
            }
        }
    }

    private enum PayloadRead {
        case read(UnsafeMutableRawBufferPointer)
        /// No memory for it: the request was answered with ENOMEM and the payload skipped.
        case refused
        case ended(Ending)
    }

    /// Reads a request's payload into a pool buffer.
    private func readPayload(of request: Request, length: UInt64, cost: Int,
                             _ reader: inout SocketReader) -> PayloadRead {
        guard let payload = connection.takeBuffer(Int(length)) else {
            if let ending = reject(request, .noMemory, "no memory for the payload", cost: cost, skipping: length,
                                   &reader) { return .ended(ending) }
            return .refused
        }
        do throws(SocketReader.Failure) {
            try reader.readExactly(into: payload)
        } catch {
            connection.dropPayload(payload, cost: cost)
            return .ended(Self.ending(error))
        }
        return .read(payload)
    }

    /// Answers `request` with an error and skips its payload; an ending if the client left meanwhile.
    private func reject(_ request: Request, _ error: NBDError, _ why: String, cost: Int, skipping payload: UInt64,
                        _ reader: inout SocketReader) -> Ending? {
        connection.reject(request, error, why, cost: cost)
        do throws(SocketReader.Failure) {
            try reader.skip(payload)
        } catch {
            return Self.ending(error)
        }
        return nil
    }

    /// The effect length and contexts a BLOCK_STATUS payload asks for (spec: unknown or
    /// repeated context IDs are an EINVAL).
    private func selection(from payload: UnsafeRawBufferPointer) -> Result<(UInt64, ContextSelection), PayloadError> {
        let decoded: BlockStatusPayload
        do {
            decoded = try BlockStatusPayload.decode(payload)
        } catch {
            return .failure(PayloadError("\(error)"))
        }
        var chosen = ContextSelection.none
        for id in decoded.contextIDs {
            guard let index = session.metaContexts.firstIndex(where: { $0.rawValue == id }) else {
                return .failure(PayloadError("context \(id) was not negotiated"))
            }
            guard !chosen.contains(index) else { return .failure(PayloadError("context \(id) is named twice")) }
            chosen.insert(index)
        }
        return .success((decoded.effectLength, chosen))
    }

    struct PayloadError: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    private static func ending(_ failure: SocketReader.Failure) -> Ending {
        switch failure {
        case .closed(let atBoundary):
            Ending(status: .dead, reason: "client closed the connection" + (atBoundary ? "" : " mid-request"))
        case .failed(let failure):
            Ending(status: .dead, reason: "read failed: \(failure)")
        }
    }

    /// What a request holds in memory: its payload, or its reply.
    func cost(of request: Request) -> Int {
        let bytes: Int
        switch request.command {
        case .read, .write:
            bytes = Int(min(request.length, UInt64(Limits.maxPayload))) + ReplyHeader.maxSize
        case .blockStatus:
            let descriptorBytes = RequestHandler.maxDescriptors
                * BlockStatusDescriptor.size(extended: session.extendedHeaders)
            bytes = session.metaContexts.count * (descriptorBytes + ReplyHeader.maxSize)
        default:
            bytes = Int(min(request.payloadLength(extended: session.extendedHeaders), UInt64(Limits.maxPayload)))
        }
        return max(bytes, Self.minimumCost)
    }
}

/// Which of the session's metadata contexts a BLOCK_STATUS answers, by index.
struct ContextSelection: Equatable, Sendable {
    private var bits: UInt64

    static let all = ContextSelection(bits: .max)
    static let none = ContextSelection(bits: 0)

    func contains(_ index: Int) -> Bool { index < 64 && bits & (1 << UInt64(index)) != 0 }
    mutating func insert(_ index: Int) { if index < 64 { bits |= 1 << UInt64(index) } }
}
