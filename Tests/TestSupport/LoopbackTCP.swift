import Glibc
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

    /// A port nothing listens on right now: listen on port 0, read what the kernel chose, close.
    public static func freePort() throws -> UInt16 {
        let listener = try listen()
        listener.close()
        return listener.port
    }

    /// True if something accepts connections on `port` now (one attempt).
    public static func isListening(port: UInt16) -> Bool {
        guard let socket = try? Socket.connectTCP(host: "127.0.0.1", port: Int(port)) else { return false }
        socket.close()
        return true
    }
}
