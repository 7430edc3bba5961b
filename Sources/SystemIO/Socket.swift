#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSystemShims

/// A connected or listening stream socket.
public struct Socket: Sendable, Hashable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public func close() { _ = Glibc.close(rawValue) }

    /// Stops both directions, waking any thread blocked in `read`.
    public func shutdown() { _ = Glibc.shutdown(rawValue, Int32(SHUT_RDWR)) }

    /// Stops receiving: a thread blocked in `read` sees end of file, replies can still go out.
    public func shutdownRead() { _ = Glibc.shutdown(rawValue, Int32(SHUT_RD)) }

    /// Reads up to `buffer.count` bytes; 0 means the peer closed.
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try retryingEINTR { Glibc.recv(rawValue, buffer.baseAddress, buffer.count, 0) }
    }

    /// As `readSome`, without waiting: nil when nothing has arrived yet.
    public func readSomeIfReady(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int? {
        let n = Glibc.recv(rawValue, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
        if n >= 0 { return n }
        if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return nil }
        throw Errno.current
    }

    /// Sends every byte of every buffer, in order, with as few syscalls as the kernel allows.
    public func writeAll(_ buffers: [UnsafeRawBufferPointer]) throws(Errno) {
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: buffers.count) { (vecs) throws(Errno) in
            for (i, b) in buffers.enumerated() {
                vecs[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress), iov_len: b.count)
            }
            try sendAll(vecs)
        }
    }

    /// Sends the iovecs completely, advancing past partial sends. The iovecs are consumed.
    private func sendAll(_ vecs: UnsafeMutableBufferPointer<iovec>) throws(Errno) {
        var first = 0
        while first < vecs.count, vecs[first].iov_len == 0 { first += 1 }
        while first < vecs.count {
            var header = msghdr()
            header.msg_iov = vecs.baseAddress! + first
            header.msg_iovlen = vecs.count - first
            var left = try retryingEINTR { sendmsg(rawValue, &header, Int32(MSG_NOSIGNAL)) }
            while first < vecs.count, left >= vecs[first].iov_len {
                left -= vecs[first].iov_len
                first += 1
            }
            if left > 0 {
                vecs[first].iov_base += left
                vecs[first].iov_len -= left
            }
        }
    }

    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws(Errno) {
        try writeAll([buffer])
    }

    /// Sends what is left of `first` then `second` after skipping `sent` bytes of them, without
    /// blocking unless `blocking`; returns the new count of bytes sent (all of both, or fewer when
    /// the socket's buffer is full and the call may not block). `moreFollows` holds the bytes back
    /// for the next send (MSG_MORE), so a reply header and its sendfile'd body share packets.
    public func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer, alreadySent sent: Int,
                     blocking: Bool, moreFollows: Bool = false) throws(Errno) -> Int {
        let total = first.count + second.count
        var done = sent
        let flags = Int32(MSG_NOSIGNAL) | (blocking ? 0 : Int32(MSG_DONTWAIT)) | (moreFollows ? Int32(MSG_MORE) : 0)
        while done < total {
            var vecs = (iovec(), iovec())
            let n: Int = withUnsafeMutablePointer(to: &vecs) { pair in
                pair.withMemoryRebound(to: iovec.self, capacity: 2) { v in
                    var count = 0
                    if done < first.count {
                        v[0] = iovec(iov_base: UnsafeMutableRawPointer(mutating: first.baseAddress! + done),
                                     iov_len: first.count - done)
                        count = 1
                    }
                    let intoSecond = max(0, done - first.count)
                    if second.count > intoSecond {
                        v[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: second.baseAddress! + intoSecond),
                                         iov_len: second.count - intoSecond)
                        count += 1
                    }
                    var header = msghdr()
                    header.msg_iov = v
                    header.msg_iovlen = count
                    return Glibc.sendmsg(rawValue, &header, flags)
                }
            }
            if n >= 0 {
                done += n
                continue
            }
            let error = errno
            if error == EINTR { continue }
            if error == EAGAIN || error == EWOULDBLOCK { return done }
            throw Errno(error)
        }
        return done
    }

    /// Sends `count` bytes of the file `descriptor` from `offset` with sendfile(2), blocking (it
    /// has no per-call non-blocking flag); returns the bytes sent, fewer only when a send timeout
    /// ran out. Bytes past the end of the file (it shrank) go out as zeros, as reads see them.
    public func sendFile(_ descriptor: Int32, at offset: UInt64, count: Int) throws(Errno) -> Int {
        var done = 0
        while done < count {
            var position = off_t(offset) + off_t(done)
            let n = Glibc.sendfile(rawValue, descriptor, &position, count - done)
            if n > 0 {
                done += n
                continue
            }
            if n == 0 { return done + (try sendZeros(count - done)) }
            let error = errno
            if error == EINTR { continue }
            if error == EAGAIN || error == EWOULDBLOCK { return done }
            throw Errno(error)
        }
        return done
    }

    private func sendZeros(_ count: Int) throws(Errno) -> Int {
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: min(count, 64 << 10), alignment: 16)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done = 0
        while done < count {
            let piece = UnsafeRawBufferPointer(rebasing: zeros[..<min(zeros.count, count - done)])
            let sent = try send(piece, UnsafeRawBufferPointer(start: nil, count: 0), alreadySent: 0, blocking: true)
            done += sent
            if sent < piece.count { break }
        }
        return done
    }

    /// A connected pair of Unix stream sockets (for tests that play both ends).
    public static func pair() throws(Errno) -> (Socket, Socket) {
        var fds: (Int32, Int32) = (-1, -1)
        let r = withUnsafeMutablePointer(to: &fds) {
            $0.withMemoryRebound(to: Int32.self, capacity: 2) {
                socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, $0)
            }
        }
        guard r == 0 else { throw Errno.current }
        return (Socket(rawValue: fds.0), Socket(rawValue: fds.1))
    }

    /// Sets the kernel's send buffer size (tests use a small one to fill it quickly).
    public func setSendBufferSize(_ bytes: Int) {
        var value = Int32(clamping: bytes)
        _ = setsockopt(rawValue, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Bounds how long a blocking read may wait; nil waits forever.
    public func setReceiveTimeout(seconds: Double?) {
        setTimeout(SO_RCVTIMEO, seconds)
    }

    /// Bounds how long a blocking send may wait; nil waits forever.
    public func setSendTimeout(seconds: Double?) {
        setTimeout(SO_SNDTIMEO, seconds)
    }

    private func setTimeout(_ option: Int32, _ seconds: Double?) {
        var tv = timeval()
        if let seconds {
            tv.tv_sec = Int(seconds)
            // A zero timeval means "no timeout": a deadline a few nanoseconds away must not become one.
            tv.tv_usec = max(Int((seconds - Double(Int(seconds))) * 1_000_000), tv.tv_sec == 0 ? 1 : 0)
        }
        _ = setsockopt(rawValue, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    public func setNoDelay() {
        var one: Int32 = 1
        _ = setsockopt(rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    public func setNonBlocking(_ on: Bool) {
        let flags = fcntl(rawValue, F_GETFL)
        _ = fcntl(rawValue, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
    }

    /// Accepts one pending connection: the socket, the peer as text, and its IP address
    /// (nil for a Unix socket). nil when none is waiting on a non-blocking socket.
    public func accept() throws(Errno) -> (Socket, String, IPAddress?)? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let fd = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                cshim_accept_cloexec(rawValue, $0, &length)
            }
        }
        if fd < 0 {
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED { return nil }
            throw Errno.current
        }
        return (Socket(rawValue: fd), Self.describe(&storage), Self.address(&storage))
    }

    static func address(_ storage: inout sockaddr_storage) -> IPAddress? {
        switch Int32(storage.ss_family) {
        case AF_INET:
            withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { IPAddress($0.pointee.sin_addr) }
            }
        case AF_INET6:
            withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { IPAddress($0.pointee.sin6_addr) }
            }
        default: nil
        }
    }

    /// Whether the connected peer runs on this machine: a Unix socket, or a TCP peer on a
    /// loopback address or on this end's own address (one of this host's interfaces).
    public var peerIsThisMachine: Bool {
        var ours = sockaddr_storage(), theirs = sockaddr_storage()
        var oursLength = socklen_t(MemoryLayout<sockaddr_storage>.size), theirsLength = oursLength
        let named = withUnsafeMutablePointer(to: &ours) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(rawValue, $0, &oursLength) }
        } == 0 && withUnsafeMutablePointer(to: &theirs) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(rawValue, $0, &theirsLength) }
        } == 0
        guard named else { return false }
        if Int32(ours.ss_family) == AF_UNIX { return true }
        guard let local = Self.address(&ours), let peer = Self.address(&theirs) else { return false }
        return peer.isLoopback || local.unmapped == peer.unmapped
    }

    /// The local port of a bound TCP socket.
    public func localPort() -> Int? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(rawValue, $0, &length) }
        }
        guard r == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
            }
        case AF_INET6:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
        default: return nil
        }
    }

    /// Whether this descriptor is a listening stream socket (for sockets passed by systemd).
    public var isListeningStream: Bool {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(rawValue, SOL_SOCKET, SO_ACCEPTCONN, &value, &length) == 0 else { return false }
        return value != 0
    }

    static func describe(_ storage: inout sockaddr_storage) -> String {
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    var addr = sin.pointee.sin_addr
                    var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
                    inet_ntop(AF_INET, &addr, &text, socklen_t(text.count))
                    return "\(String(cString: text)):\(UInt16(bigEndian: sin.pointee.sin_port))"
                }
            }
        case AF_INET6:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin in
                    var addr = sin.pointee.sin6_addr
                    var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                    inet_ntop(AF_INET6, &addr, &text, socklen_t(text.count))
                    return "[\(String(cString: text))]:\(UInt16(bigEndian: sin.pointee.sin6_port))"
                }
            }
        case AF_UNIX: return "unix"
        default: return "unknown"
        }
    }

    // MARK: - Listening

    /// Binds and listens on every address `host` resolves to (TCP). The empty
    /// host is every address of both families, each on a socket of its own;
    /// a family the machine lacks is skipped. IPv6 literals may be bracketed.
    public static func listenTCP(host: String, port: Int, backlog: Int32 = 128) throws(Errno) -> [Socket] {
        let host = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var result: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &result)
        guard status == 0, let first = result else { throw Errno(EADDRNOTAVAIL) }
        defer { freeaddrinfo(first) }
        var sockets: [Socket] = []
        var lastError = Errno(EADDRNOTAVAIL)
        var boundPort = port
        var node: UnsafeMutablePointer<addrinfo>? = first
        while let info = node {
            node = info.pointee.ai_next
            let fd = cshim_stream_socket(info.pointee.ai_family)
            guard fd >= 0 else { lastError = .current; continue }
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if info.pointee.ai_family == AF_INET6 {
                _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            // With port 0, every address family must share the port the first one got.
            if boundPort != port, let addr = info.pointee.ai_addr {
                setPort(addr, boundPort)
            }
            if bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) != 0 || Glibc.listen(fd, backlog) != 0 {
                lastError = .current
                _ = Glibc.close(fd)
                continue
            }
            let socket = Socket(rawValue: fd)
            if port == 0, let p = socket.localPort() { boundPort = p }
            sockets.append(socket)
        }
        if sockets.isEmpty { throw lastError }
        return sockets
    }

    private static func setPort(_ addr: UnsafeMutablePointer<sockaddr>, _ port: Int) {
        switch Int32(addr.pointee.sa_family) {
        case AF_INET:
            addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_port = UInt16(port).bigEndian }
        case AF_INET6:
            addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_port = UInt16(port).bigEndian }
        default: break
        }
    }

    /// Binds and listens on a Unix socket path, replacing a stale socket file.
    public static func listenUnix(path: String, backlog: Int32 = 128) throws(Errno) -> Socket {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        let bytes = Array(path.utf8)
        guard bytes.count < capacity else { throw Errno(ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = try retryingEINTR { cshim_stream_socket(AF_UNIX) }
        unlink(path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if r != 0 || Glibc.listen(fd, backlog) != 0 {
            let error = Errno.current
            _ = Glibc.close(fd)
            throw error
        }
        return Socket(rawValue: fd)
    }

    // MARK: - Connecting (used by tests and tools)

    public static func connectTCP(host: String, port: Int) throws(Errno) -> Socket {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let first = result else {
            throw Errno(EADDRNOTAVAIL)
        }
        defer { freeaddrinfo(first) }
        var lastError = Errno(ECONNREFUSED)
        var node: UnsafeMutablePointer<addrinfo>? = first
        while let info = node {
            node = info.pointee.ai_next
            let fd = cshim_stream_socket(info.pointee.ai_family)
            guard fd >= 0 else { lastError = .current; continue }
            if Glibc.connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 {
                return Socket(rawValue: fd)
            }
            lastError = .current
            _ = Glibc.close(fd)
        }
        throw lastError
    }
}
