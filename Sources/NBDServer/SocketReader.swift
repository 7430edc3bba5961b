import Glibc
import Synchronization
import SystemIO

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

    /// Fills `destination` completely; with `pollingFirst`, polls briefly before sleeping
    /// if nothing has arrived (see `pollNanoseconds`).
    mutating func readExactly(into destination: UnsafeMutableRawBufferPointer,
                              pollingFirst: Bool = false) throws(Failure) {
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
            end = try receive(into: buffer, atBoundary: filled == 0, polling: pollingFirst && filled == 0)
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

    /// Waiting for the next request with nothing in flight, a reader first polls for
    /// this long (with requests in flight, device threads need the CPU): a client
    /// answered at queue depth 1 usually sends its next request within it, and a
    /// thread that slept must be woken, which on this 2-vCPU VM took most of a
    /// round trip (fio 4k randread qd1 on qcow2: p50 86 µs and 8,900 IOPS without,
    /// 36 µs and 15,100-18,800 IOPS with 50 µs; qemu-nbd 7,600-8,100 in that run).
    static let pollNanoseconds: UInt64 = 50_000
    /// Readers polling at once, at most half the CPUs (at least one), so that
    /// polling never takes the CPUs the clients and device threads need.
    private static let pollers = Atomic<Int>(0)
    private static let maxPollers = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) / 2)

    private func receive(into destination: UnsafeMutableRawBufferPointer, atBoundary: Bool,
                         polling: Bool = false) throws(Failure) -> Int {
        let n: Int
        do {
            if polling, let polled = try poll(into: destination) {
                n = polled
            } else {
                n = try transport.receive(into: destination)
            }
        } catch {
            throw .failed(error)
        }
        if n == 0 { throw .closed(atBoundary: atBoundary) }
        return n
    }

    /// What arrives within `pollNanoseconds`, read without sleeping; nil if nothing
    /// did, if enough readers are polling already, or over TLS.
    private func poll(into destination: UnsafeMutableRawBufferPointer) throws(Transport.Failure) -> Int? {
        // TLS records may need several reads: there the reader just waits.
        guard case .plain = transport else { return nil }
        guard Self.pollers.add(1, ordering: .relaxed).newValue <= Self.maxPollers else {
            Self.pollers.subtract(1, ordering: .relaxed)
            return nil
        }
        defer { Self.pollers.subtract(1, ordering: .relaxed) }
        let deadline = MonotonicClock.now() + Self.pollNanoseconds
        repeat {
            if let n = try transport.receiveIfReady(into: destination) { return n }
        } while MonotonicClock.now() < deadline
        return nil
    }
}
