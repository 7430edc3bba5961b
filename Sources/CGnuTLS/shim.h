// GnuTLS for Swift: the headers, plus wrappers for what Swift can't import
// (function-like macros) or would import ambiguously (GNUTLS_SERVER is both a
// macro and an enum case).
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

/// A server session that never raises SIGPIPE (sends use MSG_NOSIGNAL).
static inline int cgnutls_server_init(gnutls_session_t *session) {
    return gnutls_init(session, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
}

static inline void cgnutls_transport_set_fd(gnutls_session_t session, int fd) {
    gnutls_transport_set_int(session, fd);
}

/// A copy of `size` bytes in memory GnuTLS frees itself (a PSK it asked for).
static inline int cgnutls_set_datum(gnutls_datum_t *datum, const void *bytes, unsigned size) {
    datum->data = gnutls_malloc(size ? size : 1);
    if (datum->data == NULL) return -1;
    for (unsigned i = 0; i < size; i++) datum->data[i] = ((const unsigned char *)bytes)[i];
    datum->size = size;
    return 0;
}

/// gnutls_free is a macro over a function pointer.
static inline void cgnutls_free(void *pointer) {
    gnutls_free(pointer);
}
