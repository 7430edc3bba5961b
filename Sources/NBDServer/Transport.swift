import BlockDevice
import SystemIO
import TLS

/// Where a connection's bytes go: the socket itself, or a TLS session over it
/// once NBD_OPT_STARTTLS succeeded. The reader, the handshake and the reply
/// writer use this and never ask which one it is.
enum Transport: @unchecked Sendable {
    case plain(Socket)
    case tls(TLSSession)

    enum Failure: Error, CustomStringConvertible {
        case system(Errno)
        case tls(TLSError)

        /// The socket's timeout ran out (the handshake deadline).
        var isTimeout: Bool {
            switch self {
            case .system(let errno): errno == .wouldBlock
            case .tls(let error): error.isTimeout
            }
        }

        var description: String {
            switch self {
            case .system(let errno): "\(errno)"
            case .tls(let error): "\(error)"
            }
        }
    }

    /// Reads up to `buffer.count` bytes; 0 means the peer closed.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws(Failure) -> Int {
        switch self {
        case .plain(let socket):
            do { return try socket.readSome(into: buffer) } catch { throw .system(error) }
        case .tls(let session):
            do { return try session.receive(into: buffer) } catch { throw .tls(error) }
        }
    }

    /// What has arrived, without waiting; nil when nothing has (always over TLS).
    func receiveIfReady(into buffer: UnsafeMutableRawBufferPointer) throws(Failure) -> Int? {
        guard case .plain(let socket) = self else { return nil }
        do { return try socket.readSomeIfReady(into: buffer) } catch { throw .system(error) }
    }

    /// Whether `send(blocking: false)` may be tried from any thread. A TLS
    /// record that the socket took only in part must be finished by the same
    /// caller with the same data, so over TLS every reply goes through the
    /// writer thread, which blocks.
    var sendsWithoutBlocking: Bool {
        if case .plain = self { return true }
        return false
    }

    /// Sends what is left of `first` then `second` after `sent` bytes; returns the new count
    /// (see `Socket.send`). Over TLS `blocking` must be true and everything is sent.
    func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer, alreadySent sent: Int,
              blocking: Bool) throws(Failure) -> Int {
        switch self {
        case .plain(let socket):
            do { return try socket.send(first, second, alreadySent: sent, blocking: blocking) } catch {
                throw .system(error)
            }
        case .tls(let session):
            precondition(blocking && sent == 0, "TLS sends are whole and blocking")
            do { try session.send(first, second) } catch { throw .tls(error) }
            return first.count + second.count
        }
    }

    /// Sends what is left of a reply header then `count` bytes of a file after `sent` bytes of
    /// both, blocking; returns the new count (see `Socket.sendFile`). Plain sockets only: a TLS
    /// record must be encrypted from a buffer, so replies over TLS never carry a file range.
    func send(_ header: UnsafeRawBufferPointer, file range: FileRange, count: Int,
              alreadySent sent: Int) throws(Failure) -> Int {
        guard case .plain(let socket) = self else { preconditionFailure("file ranges are sent only on plain sockets") }
        do {
            var done = sent
            if done < header.count {
                done = try socket.send(header, UnsafeRawBufferPointer(start: nil, count: 0), alreadySent: done,
                                       blocking: true, moreFollows: true)
                if done < header.count { return done }
            }
            let intoFile = done - header.count
            return done + (try socket.sendFile(range.descriptor, at: range.offset + UInt64(intoFile),
                                               count: count - intoFile))
        } catch {
            throw .system(error)
        }
    }

    /// Sends all of `bytes`, blocking (negotiation replies).
    func sendAll(_ bytes: UnsafeRawBufferPointer) throws(Failure) {
        let sent = try send(bytes, UnsafeRawBufferPointer(start: nil, count: 0), alreadySent: 0, blocking: true)
        // A blocking send stops short only when the socket's send timeout ran out.
        if sent < bytes.count { throw .system(.wouldBlock) }
    }
}
