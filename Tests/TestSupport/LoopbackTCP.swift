import Glibc
import Foundation
import SystemIO

/// Ports on 127.0.0.1, through SystemIO's `Socket`. To talk to a server over a plain socket,
/// misbehaving on purpose or just holding a connection open, use `RawClient`.
public enum LoopbackTCP {
    /// A listening socket that holds its port busy until `close()`.
    public struct Listener: Sendable {
        public let socket: Socket
        public let port: UInt16
        public func close() { socket.close() }
    }

    /// Listens on a port the kernel chose.
    public static func listen() throws -> Listener {
        guard let socket = try Socket.listenTCP(host: "127.0.0.1", port: 0, backlog: 8).first,
              let port = socket.localPort()
        else { throw Errno(EADDRNOTAVAIL) }
        return Listener(socket: socket, port: UInt16(port))
    }

    /// A port nothing listens on right now, for a server that must be told its port. It is
    /// taken below the kernel's ephemeral range, so no other test's port-0 listener or outgoing
    /// connection can take it between this check and the server's bind.
    public static func freePort() throws -> UInt16 {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<100 {
            let port = UInt16.random(in: ports, using: &generator)
            guard let socket = try? Socket.listenTCP(host: "127.0.0.1", port: Int(port), backlog: 1).first
            else { continue }
            socket.close()
            return port
        }
        throw Errno(EADDRINUSE)
    }

    /// 12,000 ports just below the ephemeral range (32768-60999 by default).
    private static let ports: ClosedRange<UInt16> = {
        let text = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? ""
        let low = text.split(whereSeparator: \.isWhitespace).first.flatMap { Int($0) } ?? 32768
        let top = max(low - 1, 2048)
        return UInt16(max(top - 12_000, 1025))...UInt16(top)
    }()

    /// A connection to 127.0.0.1:`port` from another loopback address (Linux routes all of
    /// 127.0.0.0/8 to lo), for tests of address allow-lists.
    public static func connect(port: Int, from source: String) throws -> Socket {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Errno.current }
        func address(_ host: String, _ port: Int) -> sockaddr_in {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = UInt16(port).bigEndian
            inet_pton(AF_INET, host, &a.sin_addr)
            return a
        }
        var local = address(source, 0), remote = address("127.0.0.1", port)
        let size = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, size) == 0 }
        } && withUnsafePointer(to: &remote) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, size) == 0 }
        }
        guard ok else {
            let error = Errno.current
            Glibc.close(fd)
            throw error
        }
        return Socket(rawValue: fd)
    }

    /// Whether this machine has IPv6 loopback (::1) to listen on.
    public static let hasIPv6Loopback: Bool = {
        guard let sockets = try? Socket.listenTCP(host: "::1", port: 0, backlog: 1) else { return false }
        sockets.forEach { $0.close() }
        return true
    }()

    /// True if something accepts connections on `port` now (one attempt).
    public static func isListening(port: UInt16) -> Bool {
        guard let socket = try? Socket.connectTCP(host: "127.0.0.1", port: Int(port)) else { return false }
        socket.close()
        return true
    }
}
