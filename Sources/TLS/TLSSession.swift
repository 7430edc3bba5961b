import CGnuTLS
import SystemIO

/// One server-side TLS session over a connected, blocking socket.
///
/// Threads: one thread may receive while another sends (GnuTLS allows it),
/// but sends must come from one thread at a time, as must receives. Every
/// call blocks; a socket timeout (SO_RCVTIMEO/SO_SNDTIMEO) surfaces as an
/// error for which `isTimeout` is true.
public final class TLSSession: @unchecked Sendable {
    let session: gnutls_session_t
    let credentials: TLSCredentials
    /// A reply's header and the start of its data, joined so the header
    /// doesn't cost a TLS record (and a syscall) of its own. One per session,
    /// used only by the sending thread.
    private let staging: UnsafeMutableRawBufferPointer
    private var closed = false
    /// A PSK username the client gave that has no key (set during the handshake, on its thread).
    var unknownUsername: String?

    /// The most plaintext one TLS record carries.
    public static let recordSize = 16384

    /// Starts a session on `fd`; the handshake is `handshake()`.
    public init(credentials: TLSCredentials, fd: Int32) throws(TLSError) {
        var session: gnutls_session_t?
        try check(cgnutls_server_init(&session), "starting a TLS session")
        guard let session else { throw .gnutls(operation: "starting a TLS session", code: -1) }
        self.session = session
        self.credentials = credentials
        staging = .allocate(byteCount: Self.recordSize, alignment: 16)
        do {
            try credentials.configure(session)
        } catch {
            gnutls.deinit(session)
            staging.deallocate()
            throw error
        }
        cgnutls_transport_set_fd(session, fd)
        // The caller's socket timeouts bound the handshake, not GnuTLS's own clock.
        gnutls.handshake_set_timeout(session, UInt32.max - 1)  // GNUTLS_INDEFINITE_TIMEOUT
        gnutls.session_set_ptr(session, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit {
        gnutls.deinit(session)
        staging.deallocate()
    }

    /// Runs the TLS handshake. On failure the client is sent the matching alert, if it is still there.
    public func handshake() throws(TLSError) {
        while true {
            let r = gnutls.handshake(session)
            if r == GNUTLS_E_SUCCESS { return }
            if r == GNUTLS_E_INTERRUPTED || (r != GNUTLS_E_AGAIN && gnutls.error_is_fatal(r) == 0) { continue }
            if r != GNUTLS_E_AGAIN { _ = gnutls.alert_send_appropriate(session, r) }
            throw .gnutls(operation: unknownUsername.map { "unknown PSK username '\($0)'" } ?? "TLS handshake", code: r)
        }
    }

    /// Who the client proved to be: its PSK username, or its certificate's
    /// distinguished name, first as RFC 4514 writes it (`CN=…,O=…,C=…`), then as
    /// `gnutls_x509_crt_get_dn` does, which is what qemu's authz matches and
    /// which GnuTLS 3.7 prints in the reverse order. Empty if the client presented none.
    public var peerIdentities: [String] {
        switch credentials.kind {
        case .psk:
            return gnutls.psk_server_get_username(session).map { [String(cString: $0)] } ?? []
        case .x509:
            var count: UInt32 = 0
            guard let chain = gnutls.certificate_get_peers(session, &count), count > 0 else { return [] }
            var certificate: gnutls_x509_crt_t?
            guard gnutls.x509_crt_init(&certificate) == 0, let certificate else { return [] }
            defer { gnutls.x509_crt_deinit(certificate) }
            guard gnutls.x509_crt_import(certificate, chain, GNUTLS_X509_FMT_DER) == 0 else { return [] }
            var names: [String] = []
            var rfc = gnutls_datum_t()
            if gnutls.x509_crt_get_dn3(certificate, &rfc, 0) == 0, let data = rfc.data {
                names.append(String(decoding: UnsafeBufferPointer(start: data, count: Int(rfc.size)), as: UTF8.self))
                cgnutls_free(data)
            }
            var size = 0
            _ = gnutls.x509_crt_get_dn(certificate, nil, &size)
            if size > 0 {
                var name = [UInt8](repeating: 0, count: size + 1)
                if gnutls.x509_crt_get_dn(certificate, &name, &size) == 0 {
                    let text = String(decoding: name.prefix(while: { $0 != 0 }), as: UTF8.self)
                    if !names.contains(text) { names.append(text) }
                }
            }
            return names
        }
    }

    /// Reads up to `buffer.count` bytes of plaintext (at most one record); 0 when the client closed.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(TLSError) -> Int {
        while true {
            let n = gnutls.record_recv(session, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            let code = Int32(n)
            switch code {
            case GNUTLS_E_INTERRUPTED: continue
            // A blocking socket only says "again" when its receive timeout ran out.
            case GNUTLS_E_AGAIN: throw .system(.wouldBlock)
            // End of file without close_notify: the client went away, or our shutdown woke us.
            case GNUTLS_E_PREMATURE_TERMINATION: return 0
            case GNUTLS_E_REHANDSHAKE: throw .gnutls(operation: "receive", code: code)
            default:
                if gnutls.error_is_fatal(code) == 0 { continue }  // a warning alert
                throw .gnutls(operation: "receive", code: code)
            }
        }
    }

    /// Sends `first` then `second`, all of them, blocking. The first record
    /// carries `first` and as much of `second` as fits; the rest of `second`
    /// goes out in full records straight from its buffer, without copying.
    public func send(_ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer) throws(TLSError) {
        var rest = second
        if first.count > 0 {
            let joined = min(first.count, staging.count)
            if joined < first.count {
                try sendAll(first)
            } else {
                let take = min(second.count, staging.count - first.count)
                staging.baseAddress!.copyMemory(from: first.baseAddress!, byteCount: first.count)
                if take > 0 {
                    (staging.baseAddress! + first.count).copyMemory(from: second.baseAddress!, byteCount: take)
                }
                try sendAll(UnsafeRawBufferPointer(rebasing: staging[..<(first.count + take)]))
                rest = UnsafeRawBufferPointer(rebasing: second[take...])
            }
        }
        if rest.count > 0 { try sendAll(rest) }
    }

    private func sendAll(_ bytes: UnsafeRawBufferPointer) throws(TLSError) {
        var done = 0
        while done < bytes.count {
            let n = gnutls.record_send(session, bytes.baseAddress! + done, bytes.count - done)
            if n >= 0 {
                done += n
                continue
            }
            let code = Int32(n)
            if code == GNUTLS_E_INTERRUPTED { continue }
            if code == GNUTLS_E_AGAIN { throw .system(.wouldBlock) }
            throw .gnutls(operation: "send", code: code)
        }
    }

    /// Tells the client no more data follows (close_notify), without waiting for its answer.
    public func close() {
        guard !closed else { return }
        closed = true
        _ = gnutls.bye(session, GNUTLS_SHUT_WR)
    }
}
