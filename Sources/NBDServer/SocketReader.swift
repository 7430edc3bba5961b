/// Buffered blocking reads from a connection's transport: small headers come
/// out of one read of up to 64 KiB, large payloads go straight into their buffer.
struct SocketReader: ~Copyable {
    enum Failure: Error {
        /// The peer closed the connection (cleanly, between messages, if `atBoundary`).
        case closed(atBoundary: Bool)
        case failed(Transport.Failure)
    }

    private(set) var transport: Transport
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0

    init(transport: Transport, capacity: Int = 64 * 1024) {
        self.transport = transport
        buffer = .allocate(byteCount: capacity, alignment: 16)
    }

    deinit { buffer.deallocate() }

    /// Whether bytes were read ahead of what has been asked for.
    var hasBufferedBytes: Bool { start < end }

    /// Reads from `transport` from now on (TLS has started). Bytes read ahead
    /// in plaintext must not be taken as if they had come over TLS, so the
    /// caller checks `hasBufferedBytes` first.
    mutating func switchTransport(to transport: Transport) {
        precondition(!hasBufferedBytes)
        self.transport = transport
    }

    /// Fills `destination` completely.
    mutating func readExactly(into destination: UnsafeMutableRawBufferPointer) throws(Failure) {
        var filled = 0
        let buffered = min(end - start, destination.count)
        if buffered > 0 {
            destination.baseAddress!.copyMemory(from: buffer.baseAddress! + start, byteCount: buffered)
            start += buffered
            filled = buffered
        }
        while filled < destination.count {
            let wanted = destination.count - filled
            if wanted >= buffer.count {
                filled += try receive(into: UnsafeMutableRawBufferPointer(rebasing: destination[filled...]),
                                      atBoundary: false)
                continue
            }
            start = 0
            end = try receive(into: buffer, atBoundary: filled == 0)
            let n = min(end, wanted)
            (destination.baseAddress! + filled).copyMemory(from: buffer.baseAddress!, byteCount: n)
            start = n
            filled += n
        }
    }

    /// Reads and discards `count` bytes (an oversized payload being drained).
    mutating func skip(_ count: UInt64) throws(Failure) {
        var left = count
        while left > 0 {
            if start == end {
                start = 0
                end = try receive(into: buffer, atBoundary: false)
            }
            let n = min(UInt64(end - start), left)
            start += Int(n)
            left -= n
        }
    }

    private func receive(into destination: UnsafeMutableRawBufferPointer, atBoundary: Bool) throws(Failure) -> Int {
        let n: Int
        do {
            n = try transport.receive(into: destination)
        } catch {
            throw .failed(error)
        }
        if n == 0 { throw .closed(atBoundary: atBoundary) }
        return n
    }
}
