#if canImport(Glibc)
import Glibc
#endif
import SystemIO

/// Where the server listens.
public enum ListenAddress: Sendable, Equatable {
    case tcp(host: String, port: Int)
    case unix(path: String)
}

extension SwiftNBDKit {
    /// Sockets handed over by systemd socket activation (LISTEN_FDS, LISTEN_PID),
    /// or nil when this process wasn't socket-activated. The variables are
    /// cleared so child processes don't inherit them.
    public static func activatedSockets() throws(StartupError) -> [Socket]? {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let countText = getenv("LISTEN_FDS").map({ String(cString: $0) })
        else { return nil }
        guard let pid = Int32(pidText), pid == getpid() else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        guard let count = Int32(countText), count > 0, count < 1024 else {
            throw StartupError("LISTEN_FDS='\(countText)' is not a usable socket count")
        }
        // systemd passes descriptors from 3 (SD_LISTEN_FDS_START) on.
        let sockets = (0..<count).map { Socket(rawValue: 3 + $0) }
        for socket in sockets {
            guard socket.isListeningStream else {
                throw StartupError("descriptor \(socket.rawValue) from LISTEN_FDS is not a listening stream socket")
            }
            _ = fcntl(socket.rawValue, F_SETFD, FD_CLOEXEC)
        }
        return sockets
    }

    /// Binds the listening sockets for `address`.
    public static func listen(on address: ListenAddress) throws(StartupError) -> [Socket] {
        do {
            switch address {
            case .tcp(let host, let port):
                return try Socket.listenTCP(host: host, port: port)
            case .unix(let path):
                return [try Socket.listenUnix(path: path)]
            }
        } catch {
            switch address {
            case .tcp(let host, let port): throw StartupError("cannot listen on \(host):\(port): \(error)")
            case .unix(let path): throw StartupError("cannot listen on \(path): \(error)")
            }
        }
    }
}
