import TLS

/// TLS as the server offers it, and who may come in over it.
public struct TLSConfiguration: Sendable {
    public var mode: TLSMode
    /// Needed unless `mode` is off.
    public var credentials: TLSCredentials?
    /// Client identities let in: certificate distinguished names (as qemu's
    /// authz-simple matches them) or PSK usernames. nil lets in every client
    /// whose TLS handshake succeeds.
    public var allowedIdentities: [String]?

    public init(mode: TLSMode = .off, credentials: TLSCredentials? = nil, allowedIdentities: [String]? = nil) {
        precondition(mode == .off || credentials != nil, "TLS needs credentials")
        self.mode = mode
        self.credentials = credentials
        self.allowedIdentities = allowedIdentities
    }

    public static let off = TLSConfiguration()
}
