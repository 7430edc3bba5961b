#include "CGnuTLS.h"
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

static struct cgnutls_functions functions;
static int (*init_session)(gnutls_session_t *, unsigned int);
static void (*transport_set_int2)(gnutls_session_t, int, int);
static gnutls_alloc_function *malloc_variable;
static gnutls_free_function *free_variable;
static const char *load_error;
static char load_error_text[256];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void load(void) {
    // The soname Debian's libgnutls30 installs (the ABI these headers describe).
    void *library = dlopen("libgnutls.so.30", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) {
        // dlerror's text lives only until the next dl call.
        const char *why = dlerror();
        strncpy(load_error_text, why ? why : "dlopen failed", sizeof load_error_text - 1);
        load_error = load_error_text;
        return;
    }
    int missing = 0;
#define FIND(field, symbol) \
    do { \
        *(void **)&(field) = dlsym(library, symbol); \
        if ((field) == NULL) missing = 1; \
    } while (0)
    FIND(functions.strerror, "gnutls_strerror");
    FIND(functions.error_is_fatal, "gnutls_error_is_fatal");
    FIND(functions.alert_send_appropriate, "gnutls_alert_send_appropriate");
    FIND(functions.deinit, "gnutls_deinit");
    FIND(functions.handshake, "gnutls_handshake");
    FIND(functions.handshake_set_timeout, "gnutls_handshake_set_timeout");
    FIND(functions.bye, "gnutls_bye");
    FIND(functions.record_recv, "gnutls_record_recv");
    FIND(functions.record_send, "gnutls_record_send");
    FIND(functions.session_set_ptr, "gnutls_session_set_ptr");
    FIND(functions.session_get_ptr, "gnutls_session_get_ptr");
    FIND(functions.session_set_verify_cert, "gnutls_session_set_verify_cert");
    FIND(functions.priority_init, "gnutls_priority_init");
    FIND(functions.priority_set, "gnutls_priority_set");
    FIND(functions.priority_deinit, "gnutls_priority_deinit");
    FIND(functions.credentials_set, "gnutls_credentials_set");
    FIND(functions.certificate_allocate_credentials, "gnutls_certificate_allocate_credentials");
    FIND(functions.certificate_free_credentials, "gnutls_certificate_free_credentials");
    FIND(functions.certificate_set_x509_key_mem, "gnutls_certificate_set_x509_key_mem");
    FIND(functions.certificate_set_x509_trust_mem, "gnutls_certificate_set_x509_trust_mem");
    FIND(functions.certificate_set_x509_crl_mem, "gnutls_certificate_set_x509_crl_mem");
    FIND(functions.certificate_set_known_dh_params, "gnutls_certificate_set_known_dh_params");
    FIND(functions.certificate_server_set_request, "gnutls_certificate_server_set_request");
    FIND(functions.certificate_get_peers, "gnutls_certificate_get_peers");
    FIND(functions.psk_allocate_server_credentials, "gnutls_psk_allocate_server_credentials");
    FIND(functions.psk_free_server_credentials, "gnutls_psk_free_server_credentials");
    FIND(functions.psk_set_server_credentials_function, "gnutls_psk_set_server_credentials_function");
    FIND(functions.psk_set_server_known_dh_params, "gnutls_psk_set_server_known_dh_params");
    FIND(functions.psk_server_get_username, "gnutls_psk_server_get_username");
    FIND(functions.x509_crt_init, "gnutls_x509_crt_init");
    FIND(functions.x509_crt_deinit, "gnutls_x509_crt_deinit");
    FIND(functions.x509_crt_import, "gnutls_x509_crt_import");
    FIND(functions.x509_crt_get_dn, "gnutls_x509_crt_get_dn");
    FIND(functions.x509_crt_get_dn3, "gnutls_x509_crt_get_dn3");
    FIND(init_session, "gnutls_init");
    FIND(transport_set_int2, "gnutls_transport_set_int2");
    // gnutls_malloc and gnutls_free are variables holding GnuTLS's allocator.
    FIND(malloc_variable, "gnutls_malloc");
    FIND(free_variable, "gnutls_free");
#undef FIND
    if (missing) {
        load_error = "libgnutls.so.30 lacks a function swiftnbd needs";
        dlclose(library);
    }
}

const struct cgnutls_functions *cgnutls_load(const char **error) {
    pthread_once(&once, load);
    if (load_error != NULL) {
        *error = load_error;
        return NULL;
    }
    return &functions;
}

int cgnutls_server_init(gnutls_session_t *session) {
    return init_session(session, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
}

void cgnutls_transport_set_fd(gnutls_session_t session, int fd) {
    transport_set_int2(session, fd, fd);
}

int cgnutls_set_datum(gnutls_datum_t *datum, const void *bytes, unsigned size) {
    datum->data = (*malloc_variable)(size ? size : 1);
    if (datum->data == NULL) return -1;
    if (size) memcpy(datum->data, bytes, size);
    datum->size = size;
    return 0;
}

void cgnutls_free(void *pointer) {
    (*free_variable)(pointer);
}
