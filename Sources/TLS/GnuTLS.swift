import CGnuTLS

/// GnuTLS, loaded when TLS is first set up (see CGnuTLS.h for why).
enum GnuTLS {
    /// Loaded on first use; the error says why it could not be.
    nonisolated(unsafe) private static let loaded: Result<UnsafePointer<cgnutls_functions>, TLSError> = {
        var error: UnsafePointer<CChar>?
        guard let table = cgnutls_load(&error) else {
            let why = error.map { String(cString: $0) } ?? "not found"
            return .failure(.credentials("TLS needs GnuTLS (Debian package libgnutls30): \(why)"))
        }
        return .success(table)
    }()

    /// Loads GnuTLS if it isn't yet. Every GnuTLS object is made after this succeeded.
    static func load() throws(TLSError) { _ = try loaded.get() }

    /// The functions, for code that runs only after `load()` succeeded.
    static var functions: cgnutls_functions {
        guard case .success(let table) = loaded else { preconditionFailure("GnuTLS used before it was loaded") }
        return table.pointee
    }
}

/// GnuTLS's functions without their `gnutls_` prefix: `gnutls.handshake(session)`.
var gnutls: cgnutls_functions { GnuTLS.functions }
