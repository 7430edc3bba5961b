import Logging
import NBDProtocol

/// Reads requests in transmission on the connection's own thread, checks
/// them, and hands them on: valid ones to a device thread, invalid ones
/// straight to an error reply. Before reading each request it reserves the
/// bytes its reply will hold, so a client that does not read its replies
/// stops being read from (backpressure) instead of growing the server.
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
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: Request.wireSize, alignment: 8)
        defer { header.deallocate() }
        while true {
            do throws(SocketReader.Failure) {
                try reader.readExactly(into: header)
            } catch {
                switch error {
                case .closed(let atBoundary):
                    let when = atBoundary ? "" : " mid-request"
                    return Ending(status: .dead, reason: "client closed the connection\(when)")
                case .failed(let failure):
                    return Ending(status: .dead, reason: "read failed: \(failure)")
                }
            }
            var r = WireReader(UnsafeRawBufferPointer(header))
            let request: Request
            do {
                request = try Request.decode(&r)!
            } catch {
                return Ending(status: .draining, reason: "bad request: \(error)")
            }
            if request.command == .disconnect {
                // The spec: handle all outstanding requests, then close.
                return Ending(status: .draining, reason: "client disconnected")
            }
            let cost = cost(of: request)
            guard connection.reserve(cost) else {
                return Ending(status: .draining, reason: "connection stopped reading")
            }
            let invalid = validate(request, size: exportSize, session: session)
            guard request.command.hasPayload else {
                if let (error, why) = invalid {
                    connection.reject(request, error, why, cost: cost)
                } else {
                    connection.submit(request, payload: nil, cost: cost)
                }
                continue
            }
            if let (error, why) = invalid {
                connection.reject(request, error, why, cost: cost)
                // Draining keeps the stream in step, but only up to what a request may carry.
                guard request.length <= Limits.maxPayload else {
                    return Ending(status: .draining, reason: "write of \(request.length) bytes is over the limit")
                }
                do {
                    try reader.skip(UInt64(request.length))
                } catch {
                    return Ending(status: .dead, reason: "client closed the connection mid-request")
                }
                continue
            }
            guard let payload = connection.takeBuffer(Int(request.length)) else {
                connection.reject(request, .noMemory, "no memory for the payload", cost: cost)
                do {
                    try reader.skip(UInt64(request.length))
                } catch {
                    return Ending(status: .dead, reason: "client closed the connection mid-request")
                }
                continue
            }
            do {
                try reader.readExactly(into: payload)
            } catch {
                connection.dropPayload(payload, cost: cost)
                return Ending(status: .dead, reason: "client closed the connection mid-request")
            }
            connection.submit(request, payload: payload, cost: cost)
        }
    }

    /// What a request's reply (or its payload, for writes) holds in memory.
    func cost(of request: Request) -> Int {
        let bytes: Int
        switch request.command {
        case .read, .write: bytes = Int(min(request.length, Limits.maxPayload)) + 32
        case .blockStatus: bytes = session.metaContexts.count * (RequestHandler.maxDescriptors * 8 + 32)
        default: bytes = 0
        }
        return max(bytes, Self.minimumCost)
    }
}
