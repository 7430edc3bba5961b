import CGnuTLS
import SystemIO

/// Why TLS could not be set up, or why a session failed.
public enum TLSError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A credentials file is missing, unreadable or malformed; says which and why.
    case credentials(String)
    /// GnuTLS reported `code` while doing `operation`.
    case gnutls(operation: String, code: Int32)
    /// The socket under the session failed (a timeout shows as EAGAIN).
    case system(Errno)

    public var description: String {
        switch self {
        case .credentials(let why): why
        case .gnutls(let operation, let code):
            "\(operation): \(GnuTLS.functions.strerror(code).map { String(cString: $0) } ?? "GnuTLS error \(code)")"
        case .system(let errno): "\(errno)"
        }
    }

    /// The socket's receive or send timeout ran out (the handshake deadline).
    public var isTimeout: Bool {
        switch self {
        case .system(let errno): errno == .wouldBlock
        case .gnutls(_, let code): code == GNUTLS_E_AGAIN
        default: false
        }
    }
}

/// Throws a `TLSError` for a negative GnuTLS return code.
@discardableResult
func check(_ code: Int32, _ operation: @autoclosure () -> String) throws(TLSError) -> Int32 {
    guard code >= 0 else { throw .gnutls(operation: operation(), code: code) }
    return code
}
