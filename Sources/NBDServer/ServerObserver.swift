import NBDProtocol

/// Why a client never reached transmission.
public enum HandshakeFailureReason: String, Sendable, CaseIterable {
    /// It did not finish within the handshake timeout.
    case timeout
    /// It hung up mid-negotiation.
    case clientClosed = "client_closed"
    /// It sent NBD_OPT_ABORT (as `nbdinfo --list` does after listing).
    case clientAborted = "client_aborted"
    /// It broke the protocol or asked for an export that isn't there.
    case refused
    /// The socket failed.
    case ioError = "io_error"
}

/// Told what the server does, for metrics. `requestFinished` runs on device
/// and connection threads once per request, so implementations must not
/// lock, block or allocate there: atomic counters on handles made up front.
public protocol ServerObserver: AnyObject, Sendable {
    /// A client was accepted (or adopted).
    func connectionOpened()
    /// A connection ended, whatever the reason.
    func connectionClosed()
    func handshakeFailed(_ reason: HandshakeFailureReason)
    /// A request was answered with `error` (`.ok` for success), `nanoseconds`
    /// after it was read: queueing and device time, not sending.
    func requestFinished(_ command: Command, length: UInt64, error: NBDError, nanoseconds: UInt64)
}
