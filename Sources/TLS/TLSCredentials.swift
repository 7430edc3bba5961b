import CGnuTLS

/// Server credentials loaded once at start: an X.509 certificate and key (and
/// the CA that signs clients' certificates), or a table of pre-shared keys.
/// Sessions share them; GnuTLS only reads credentials once they are set up.
public final class TLSCredentials: @unchecked Sendable {
    public enum Kind: Sendable, Equatable {
        /// With `verifyPeer`, clients must present a certificate the CA signed.
        case x509(verifyPeer: Bool)
        case psk
    }

    public let kind: Kind
    private let certificates: gnutls_certificate_credentials_t?
    private let pskCredentials: gnutls_psk_server_credentials_t?
    let keys: PSKKeys?
    let priority: gnutls_priority_t

    /// The file names qemu and nbdkit read from a credentials directory.
    public enum FileName {
        public static let caCertificate = "ca-cert.pem"
        public static let caRevocations = "ca-crl.pem"
        public static let serverCertificate = "server-cert.pem"
        public static let serverKey = "server-key.pem"
        public static let pskKeys = "keys.psk"
    }

    private init(kind: Kind, certificates: gnutls_certificate_credentials_t?,
                 psk: gnutls_psk_server_credentials_t?, keys: PSKKeys?, priority: gnutls_priority_t) {
        self.kind = kind
        self.certificates = certificates
        self.pskCredentials = psk
        self.keys = keys
        self.priority = priority
    }

    deinit {
        if let certificates { gnutls.certificate_free_credentials(certificates) }
        if let pskCredentials { gnutls.psk_free_server_credentials(pskCredentials) }
        gnutls.priority_deinit(priority)
    }

    /// Loads `server-cert.pem` and `server-key.pem` from `directory`, and `ca-cert.pem`
    /// (needed to verify clients) and `ca-crl.pem` when present.
    public static func x509(directory: String, verifyPeer: Bool) throws(TLSError) -> TLSCredentials {
        try GnuTLS.load()
        let path = { (name: String) in directory.hasSuffix("/") ? directory + name : directory + "/" + name }
        let cert = try CredentialFiles.read(path(FileName.serverCertificate))
        let key = try CredentialFiles.read(path(FileName.serverKey))
        let caPath = path(FileName.caCertificate)
        let ca: [UInt8]? = verifyPeer || CredentialFiles.exists(caPath) ? try CredentialFiles.read(caPath) : nil
        let crlPath = path(FileName.caRevocations)
        let crl: [UInt8]? = CredentialFiles.exists(crlPath) ? try CredentialFiles.read(crlPath) : nil

        var credentials: gnutls_certificate_credentials_t?
        try check(gnutls.certificate_allocate_credentials(&credentials), "allocating certificate credentials")
        guard let credentials else { throw .gnutls(operation: "allocating certificate credentials", code: -1) }
        do throws(TLSError) {
            try withDatum(cert) { (certDatum) throws(TLSError) in
                try withDatum(key) { (keyDatum) throws(TLSError) in
                    try check(gnutls.certificate_set_x509_key_mem(credentials, &certDatum, &keyDatum,
                                                                   GNUTLS_X509_FMT_PEM),
                              "'\(path(FileName.serverCertificate))' with '\(path(FileName.serverKey))'")
                }
            }
            if let ca {
                let count = try withDatum(ca) { (datum) throws(TLSError) in
                    try check(gnutls.certificate_set_x509_trust_mem(credentials, &datum, GNUTLS_X509_FMT_PEM),
                              "'\(caPath)'")
                }
                guard count > 0 else { throw TLSError.credentials("'\(caPath)' holds no certificate") }
            }
            if let crl {
                try withDatum(crl) { (datum) throws(TLSError) in
                    try check(gnutls.certificate_set_x509_crl_mem(credentials, &datum, GNUTLS_X509_FMT_PEM),
                              "'\(crlPath)'")
                }
            }
            _ = gnutls.certificate_set_known_dh_params(credentials, GNUTLS_SEC_PARAM_MEDIUM)
            let priority = try makePriority("NORMAL")
            return TLSCredentials(kind: .x509(verifyPeer: verifyPeer), certificates: credentials, psk: nil,
                                  keys: nil, priority: priority)
        } catch {
            gnutls.certificate_free_credentials(credentials)
            throw error
        }
    }

    /// Loads the `username:hexkey` lines of `file`.
    public static func psk(file: String) throws(TLSError) -> TLSCredentials {
        try GnuTLS.load()
        let keys = try PSKKeys(parsing: try CredentialFiles.read(file), name: file)
        var credentials: gnutls_psk_server_credentials_t?
        try check(gnutls.psk_allocate_server_credentials(&credentials), "allocating PSK credentials")
        guard let credentials else { throw .gnutls(operation: "allocating PSK credentials", code: -1) }
        gnutls.psk_set_server_credentials_function(credentials, lookUpKey)
        _ = gnutls.psk_set_server_known_dh_params(credentials, GNUTLS_SEC_PARAM_MEDIUM)
        do throws(TLSError) {
            // PSK key exchanges are not in NORMAL; the same additions as qemu and nbdkit.
            let priority = try makePriority("NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK")
            return TLSCredentials(kind: .psk, certificates: nil, psk: credentials, keys: keys, priority: priority)
        } catch {
            gnutls.psk_free_server_credentials(credentials)
            throw error
        }
    }

    /// Puts these credentials on a new server session.
    func configure(_ session: gnutls_session_t) throws(TLSError) {
        try check(gnutls.priority_set(session, priority), "setting TLS priorities")
        switch kind {
        case .x509(let verifyPeer):
            try check(gnutls.credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(certificates)),
                      "setting certificate credentials")
            if verifyPeer {
                gnutls.certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
                // The handshake itself fails when the client's certificate doesn't verify against the CA.
                gnutls.session_set_verify_cert(session, nil, 0)
            }
        case .psk:
            try check(gnutls.credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(pskCredentials)),
                      "setting PSK credentials")
        }
    }

    private static func makePriority(_ text: String) throws(TLSError) -> gnutls_priority_t {
        var priority: gnutls_priority_t?
        try check(gnutls.priority_init(&priority, text, nil), "TLS priority '\(text)'")
        guard let priority else { throw .gnutls(operation: "TLS priority '\(text)'", code: -1) }
        return priority
    }
}

/// GnuTLS asks for the key of `username` during a PSK handshake; the session's
/// user pointer is its `TLSSession`. -1 (an unknown user) fails the handshake.
private func lookUpKey(_ session: gnutls_session_t?, _ username: UnsafePointer<CChar>?,
                       _ key: UnsafeMutablePointer<gnutls_datum_t>?) -> Int32 {
    guard let session, let username, let key, let pointer = gnutls.session_get_ptr(session) else { return -1 }
    let owner = Unmanaged<TLSSession>.fromOpaque(pointer).takeUnretainedValue()
    let name = String(cString: username)
    guard let bytes = owner.credentials.keys?.keys[name] else {
        owner.unknownUsername = name
        return -1
    }
    return bytes.withUnsafeBytes { cgnutls_set_datum(key, $0.baseAddress, UInt32($0.count)) }
}

/// Lends `bytes` to GnuTLS as a datum for the length of `body`.
@discardableResult
func withDatum<R>(_ bytes: [UInt8], _ body: (inout gnutls_datum_t) throws(TLSError) -> R) throws(TLSError) -> R {
    var copy = bytes
    let result = copy.withUnsafeMutableBytes { raw in
        var datum = gnutls_datum_t(data: raw.baseAddress?.assumingMemoryBound(to: UInt8.self), size: UInt32(raw.count))
        return Result { () throws(TLSError) in try body(&datum) }
    }
    return try result.get()
}
