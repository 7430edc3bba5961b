// GnuTLS for Swift, loaded with dlopen on first use: a server that never
// sets up TLS never maps GnuTLS and the libraries it pulls in (p11-kit,
// nettle, gmp, ...: about 2.4 MiB of resident memory at idle). The headers
// give the types and constants; the functions come from the table below.
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define CGNUTLS_FUNCTION(name) __typeof__(&gnutls_##name) _Nonnull name

/// The GnuTLS functions the TLS module calls, named without their `gnutls_` prefix.
struct cgnutls_functions {
    CGNUTLS_FUNCTION(strerror);
    CGNUTLS_FUNCTION(error_is_fatal);
    CGNUTLS_FUNCTION(alert_send_appropriate);
    CGNUTLS_FUNCTION(deinit);
    CGNUTLS_FUNCTION(handshake);
    CGNUTLS_FUNCTION(handshake_set_timeout);
    CGNUTLS_FUNCTION(bye);
    CGNUTLS_FUNCTION(record_recv);
    CGNUTLS_FUNCTION(record_send);
    CGNUTLS_FUNCTION(session_set_ptr);
    CGNUTLS_FUNCTION(session_get_ptr);
    CGNUTLS_FUNCTION(session_set_verify_cert);
    CGNUTLS_FUNCTION(priority_init);
    CGNUTLS_FUNCTION(priority_set);
    CGNUTLS_FUNCTION(priority_deinit);
    CGNUTLS_FUNCTION(credentials_set);
    CGNUTLS_FUNCTION(certificate_allocate_credentials);
    CGNUTLS_FUNCTION(certificate_free_credentials);
    CGNUTLS_FUNCTION(certificate_set_x509_key_mem);
    CGNUTLS_FUNCTION(certificate_set_x509_trust_mem);
    CGNUTLS_FUNCTION(certificate_set_x509_crl_mem);
    CGNUTLS_FUNCTION(certificate_set_known_dh_params);
    CGNUTLS_FUNCTION(certificate_server_set_request);
    CGNUTLS_FUNCTION(certificate_get_peers);
    CGNUTLS_FUNCTION(psk_allocate_server_credentials);
    CGNUTLS_FUNCTION(psk_free_server_credentials);
    CGNUTLS_FUNCTION(psk_set_server_credentials_function);
    CGNUTLS_FUNCTION(psk_set_server_known_dh_params);
    CGNUTLS_FUNCTION(psk_server_get_username);
    CGNUTLS_FUNCTION(x509_crt_init);
    CGNUTLS_FUNCTION(x509_crt_deinit);
    CGNUTLS_FUNCTION(x509_crt_import);
    CGNUTLS_FUNCTION(x509_crt_get_dn);
    CGNUTLS_FUNCTION(x509_crt_get_dn3);
};

/// Loads GnuTLS once (later calls return the same table). NULL if it can't be
/// loaded, with `*error` (static text) saying why.
const struct cgnutls_functions *_Nullable cgnutls_load(const char *_Nullable *_Nonnull error);

// What Swift can't import (function-like macros, variables of function type) or
// would import ambiguously (GNUTLS_SERVER is both a macro and an enum case).
// Only after cgnutls_load succeeded.

/// A server session that never raises SIGPIPE (sends use MSG_NOSIGNAL).
int cgnutls_server_init(gnutls_session_t _Nullable *_Nonnull session);
void cgnutls_transport_set_fd(gnutls_session_t _Nonnull session, int fd);
/// A copy of `size` bytes in memory GnuTLS frees itself (a PSK it asked for).
int cgnutls_set_datum(gnutls_datum_t *_Nonnull datum, const void *_Nullable bytes, unsigned size);
void cgnutls_free(void *_Nullable pointer);
