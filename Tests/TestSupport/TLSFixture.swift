import Foundation

/// Credentials made with `certtool` and `psktool` for TLS tests, once per test process:
///
/// - `x509`: ca-cert.pem, server-cert.pem, server-key.pem (for 127.0.0.1, ::1 and localhost),
///   and a trusted client-cert.pem/client-key.pem whose DN is `clientDN`: the layout qemu
///   reads for either endpoint and libnbd's `tls-certificates=` reads.
/// - `otherClient`: the same CA, and a client certificate the CA signed for `otherDN`.
/// - `untrustedClient`: the same CA (so the client trusts the server), and a client
///   certificate signed by another CA.
/// - `psk/keys.psk`: alice's key (qemu's tls-creds-psk dir, libnbd's tls-psk-file);
///   `wrongKey`: alice with another key; `unknownUser`: bob's key.
public final class TLSFixture: Sendable {
    public let x509: String
    public let otherClient: String
    public let untrustedClient: String
    public let pskDirectory: String
    public var pskFile: String { pskDirectory + "/keys.psk" }
    public let wrongKey: String
    public let unknownUser: String
    /// The good client's distinguished name as RFC 4514 (and certtool) writes it.
    public let clientDN = "CN=client.example.com,O=Example Org,L=London,ST=London,C=GB"
    public let otherDN = "CN=intruder.example.com,O=Example Org"
    private let scratch: TemporaryDirectory

    public static let shared: TLSFixture = {
        do { return try TLSFixture() } catch { fatalError("cannot make TLS test credentials: \(error)") }
    }()

    private init() throws {
        scratch = try TemporaryDirectory("swiftnbd-tls")
        let root = scratch.path
        x509 = root + "/x509"
        otherClient = root + "/other-client"
        untrustedClient = root + "/untrusted-client"
        pskDirectory = root + "/psk"
        wrongKey = root + "/wrong.psk"
        unknownUser = root + "/bob.psk"
        for dir in [x509, otherClient, untrustedClient, pskDirectory, root + "/work"] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        let work = root + "/work"
        func template(_ name: String, _ lines: [String]) throws -> String {
            let path = "\(work)/\(name).info"
            try (lines + ["expiration_days = 2"]).joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
            return path
        }
        func key(_ path: String) throws {
            try Tools.check("certtool", ["--generate-privkey", "--key-type=ecdsa", "--outfile", path])
        }
        func selfSigned(_ name: String, key: String, out: String) throws {
            let info = try template(name, ["cn = \(name)", "ca", "cert_signing_key"])
            try Tools.check("certtool", ["--generate-self-signed", "--load-privkey", key, "--template", info,
                                         "--outfile", out])
        }
        func sign(_ name: String, _ lines: [String], key: String, ca: (cert: String, key: String), out: String) throws {
            let info = try template(name, lines)
            try Tools.check("certtool", ["--generate-certificate", "--load-privkey", key,
                                         "--load-ca-certificate", ca.cert, "--load-ca-privkey", ca.key,
                                         "--template", info, "--outfile", out])
        }
        let ca = (cert: x509 + "/ca-cert.pem", key: work + "/ca-key.pem")
        try key(ca.key)
        try selfSigned("swiftnbd test CA", key: ca.key, out: ca.cert)
        try key(x509 + "/server-key.pem")
        try sign("server", ["organization = swiftnbd test", "cn = localhost", "dns_name = localhost",
                            "ip_address = 127.0.0.1", "ip_address = ::1", "tls_www_server", "encryption_key",
                            "signing_key"], key: x509 + "/server-key.pem", ca: ca, out: x509 + "/server-cert.pem")
        try key(x509 + "/client-key.pem")
        try sign("client", ["country = GB", "state = London", "locality = London", "organization = Example Org",
                            "cn = client.example.com", "tls_www_client", "encryption_key", "signing_key"],
                 key: x509 + "/client-key.pem", ca: ca, out: x509 + "/client-cert.pem")
        for dir in [otherClient, untrustedClient] {
            try FileManager.default.copyItem(atPath: ca.cert, toPath: dir + "/ca-cert.pem")
        }
        try key(otherClient + "/client-key.pem")
        try sign("other", ["organization = Example Org", "cn = intruder.example.com", "tls_www_client",
                           "encryption_key", "signing_key"],
                 key: otherClient + "/client-key.pem", ca: ca, out: otherClient + "/client-cert.pem")
        let rogue = (cert: work + "/rogue-ca-cert.pem", key: work + "/rogue-ca-key.pem")
        try key(rogue.key)
        try selfSigned("rogue CA", key: rogue.key, out: rogue.cert)
        try key(untrustedClient + "/client-key.pem")
        try sign("untrusted", ["country = GB", "state = London", "locality = London", "organization = Example Org",
                               "cn = client.example.com", "tls_www_client", "encryption_key", "signing_key"],
                 key: untrustedClient + "/client-key.pem", ca: rogue, out: untrustedClient + "/client-cert.pem")

        try Tools.check("psktool", ["-u", "alice", "-p", pskDirectory + "/keys.psk"])
        try Tools.check("psktool", ["-u", "alice", "-p", wrongKey])
        try Tools.check("psktool", ["-u", "bob", "-p", unknownUser])
    }

    /// An `nbds://` URI for libnbd clients with X.509 credentials from `directory`.
    public func x509URI(port: Int, directory: String? = nil) -> String {
        "nbds://127.0.0.1:\(port)/?tls-certificates=\(directory ?? x509)"
    }

    /// An `nbds://` URI for libnbd clients with a PSK file.
    public func pskURI(port: Int, user: String = "alice", file: String? = nil) -> String {
        "nbds://\(user)@127.0.0.1:\(port)/?tls-psk-file=\(file ?? pskFile)"
    }
}
