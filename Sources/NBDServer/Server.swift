import BlockDevice
import Dispatch
import Logging
import SystemIO

/// How the server behaves, with qemu-nbd's defaults.
public struct ServerConfiguration: Sendable {
    /// Most clients served at once (`-e`); more wait in the listen backlog.
    public var maxConnections: Int = 1
    /// Keep serving after the last client leaves (`-t`).
    public var persistent: Bool = false
    /// Drop a client that hasn't finished negotiating after this long.
    public var handshakeTimeout: Double? = 10

    public init(maxConnections: Int = 1, persistent: Bool = false, handshakeTimeout: Double? = 10) {
        self.maxConnections = maxConnections
        self.persistent = persistent
        self.handshakeTimeout = handshakeTimeout
    }
}

/// Accepts clients on listening sockets and serves one export to them.
public final class Server: @unchecked Sendable {
    private let export: Export
    private let configuration: ServerConfiguration
    private let logger: Logger
    private let pool = BufferPool()
    private let ioQueue = DispatchQueue(label: "swiftnbd.io", qos: .userInitiated, attributes: .concurrent)
    private let controlQueue = DispatchQueue(label: "swiftnbd.accept")

    // Owned by controlQueue.
    private var sources: [any DispatchSourceRead] = []
    private var listeners: [Socket] = []
    private var connections: [ObjectIdentifier: Connection] = [:]
    private var acceptSuspended = false
    private var servedAny = false
    private var stopping = false
    private var nextID = 1
    private let finished = DispatchSemaphore(value: 0)

    public init(export: Export, configuration: ServerConfiguration, logger: Logger) {
        self.export = export
        self.configuration = configuration
        self.logger = logger
    }

    /// Starts accepting on `listeners` (already bound and listening).
    public func start(listeners: [Socket]) {
        controlQueue.sync {
            self.listeners = listeners
            for listener in listeners {
                listener.setNonBlocking(true)
                let source = DispatchSource.makeReadSource(fileDescriptor: listener.rawValue, queue: controlQueue)
                source.setEventHandler { [unowned self] in acceptPending(on: listener) }
                source.setCancelHandler { listener.close() }
                source.resume()
                sources.append(source)
            }
        }
    }

    /// Blocks until the server is done: after the last client when not
    /// persistent, or after `stop()` once every connection has finished.
    /// The export's device is closed (flushed) before this returns.
    public func wait() {
        finished.wait()
        export.device.close()
    }

    /// Stops accepting, lets every connection answer what it has received, then finishes.
    public func stop() {
        controlQueue.async { [self] in
            guard !stopping else { return }
            stopping = true
            stopAccepting()
            for connection in connections.values { connection.socket.shutdownRead() }
            finishIfIdle()
        }
    }

    private func acceptPending(on listener: Socket) {
        while !stopping && connections.count < configuration.maxConnections {
            let accepted: (Socket, String)?
            do {
                accepted = try listener.accept()
            } catch {
                logger.warning("accept failed", metadata: ["nbd.reason": "\(error)"])
                return
            }
            guard let (socket, peer) = accepted else { return }
            socket.setNonBlocking(false)
            socket.setNoDelay()
            open(socket, peer: peer)
        }
        // At the limit, clients wait in the backlog as with qemu-nbd's -e.
        if connections.count >= configuration.maxConnections { suspendAccepting() }
    }

    private func open(_ socket: Socket, peer: String) {
        let id = nextID
        nextID += 1
        servedAny = true
        let connection = Connection(socket: socket, peer: peer, id: id, export: export, pool: pool, ioQueue: ioQueue,
                                    handshakeTimeout: configuration.handshakeTimeout, logger: logger)
        connections[ObjectIdentifier(connection)] = connection
        logger.info("Connection opened", metadata: ["nbd.conn": "\(id)", "nbd.peer": "\(peer)",
                                                     "nbd.export": "\(export.name)"])
        // Each connection reads on its own thread; its requests run on ioQueue.
        DispatchQueue(label: "swiftnbd.conn.\(id)").async { [self] in
            connection.run()
            controlQueue.async { [self] in closed(connection) }
        }
    }

    private func closed(_ connection: Connection) {
        connections[ObjectIdentifier(connection)] = nil
        if !configuration.persistent && servedAny && connections.isEmpty && !stopping {
            stopping = true
            stopAccepting()
        }
        if stopping {
            finishIfIdle()
        } else {
            resumeAccepting()
            for listener in listeners { acceptPending(on: listener) }
        }
    }

    private func finishIfIdle() {
        if connections.isEmpty { finished.signal() }
    }

    private func suspendAccepting() {
        guard !acceptSuspended else { return }
        acceptSuspended = true
        for source in sources { source.suspend() }
    }

    private func resumeAccepting() {
        guard acceptSuspended else { return }
        acceptSuspended = false
        for source in sources { source.resume() }
    }

    private func stopAccepting() {
        resumeAccepting()  // a suspended source can't be cancelled cleanly
        for source in sources { source.cancel() }
        sources = []
        listeners = []
    }

}
