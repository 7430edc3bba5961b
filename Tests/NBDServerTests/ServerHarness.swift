#if canImport(Glibc)
import Glibc
#endif
import BlockDevice
import Logging
import NBDProtocol
@testable import NBDServer
import SystemIO
import TestSupport

/// An in-process server that takes clients on socket pairs: the server's own
/// threads and queues, with no process or TCP in between.
final class ServerHarness {
    let server: Server
    let device: any BlockDevice
    /// The transmission flags the last client got.
    private(set) var flags: TransmissionFlags = []

    init(_ device: any BlockDevice, exposeAllocationDepth: Bool = false,
         _ configure: (inout ServerConfiguration) -> Void = { _ in }) {
        var configuration = ServerConfiguration(maxConnections: 0, persistent: true)
        configure(&configuration)
        self.device = device
        server = Server(exports: [Export(name: "", device: device, readOnly: false,
                                         exposeAllocationDepth: exposeAllocationDepth)],
                        configuration: configuration, logger: Logger(label: "test"))
        server.start(listeners: [])
    }

    /// A client in transmission (simple replies unless asked).
    func client(structured: Bool = false, extended: Bool = false, metaContexts: [String] = [],
                clientReceiveBuffer: Int? = nil) throws -> RawClient {
        let (ours, theirs) = try Socket.pair()
        if let clientReceiveBuffer { theirs.setSendBufferSize(clientReceiveBuffer) }
        server.adopt(ours, peer: "pair")
        let client = RawClient(socket: theirs)
        flags = try client.go(structuredReplies: structured, extendedHeaders: extended, metaContexts: metaContexts)
        return client
    }

    func stop() {
        server.stop()
        server.wait()
    }

    /// Waits (bounded) until `condition` holds.
    func eventually(_ what: String, within seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.now() + UInt64(seconds * 1e9)
        while !condition() {
            if MonotonicClock.now() > deadline { return false }
            usleep(1000)
        }
        return true
    }
}
