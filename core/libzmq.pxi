# libzmq, resolved at import time from the copy pyzmq has already loaded.
#
# Include this file at module level (`include "libzmq.pxi"`) and call
# `_resolve_libzmq()` once at import. It declares the few libzmq prototypes devmgr uses
# as function pointers (no zmq.h is needed: pyzmq's wheels ship none) and fills them with
# dlsym on pyzmq's own backend module. dlsym on that handle searches the module's
# dependencies, so the pointers land in the very libzmq pyzmq mapped; a devmgr build
# therefore survives a pyzmq upgrade that renames its bundled library, and a process
# never holds two libzmq copies whose sockets must not meet.
#
# One catch: the dynamic linker binds pyzmq's calls to the global scope first (the
# program, LD_PRELOAD, anything loaded RTLD_GLOBAL). If a libzmq is there too, pyzmq may
# be calling that one while the handle's lookup finds pyzmq's own. Each symbol is
# therefore also looked up in the global scope; a definition from another file means
# two libzmq copies, and devmgr refuses to guess which one owns pyzmq's sockets.
#
# Sockets cross over as `socket.underlying` (the address of libzmq's socket object).

from libc.stdint cimport uint64_t, uintptr_t

cdef extern from "dlfcn.h" nogil:
    # Python.h (included first by Cython) defines _GNU_SOURCE, which dladdr needs.
    ctypedef struct Dl_info:
        const char *dli_fname
        void *dli_fbase
        const char *dli_sname
        void *dli_saddr
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int dladdr(const void *addr, Dl_info *info)
    int RTLD_NOW
    int RTLD_NOLOAD
    void *RTLD_DEFAULT

cdef extern from "errno.h":
    # libzmq uses the system's values for these on Linux.
    enum:
        EAGAIN
        EINTR
        EHOSTUNREACH
        ENOTSOCK
        EINVAL
        EFAULT
        ENOTSUP

cdef extern from *:
    """
    #ifndef DEVMGR_LIBZMQ_PXI_H
    #define DEVMGR_LIBZMQ_PXI_H
    /* libzmq's zmq_msg_t: 64 opaque bytes aligned like a pointer (zmq.h, 4.x). */
    typedef struct devmgr_zmq_msg_t {
        unsigned char _[64] __attribute__((aligned(sizeof(void *))));
    } devmgr_zmq_msg_t;
    /* zmq_pollitem_t on POSIX, where the fd member is an int. */
    typedef struct devmgr_zmq_pollitem_t {
        void *socket;
        int fd;
        short events;
        short revents;
    } devmgr_zmq_pollitem_t;
    #endif
    """
    ctypedef struct zmq_msg_t "devmgr_zmq_msg_t":
        pass
    ctypedef struct zmq_pollitem_t "devmgr_zmq_pollitem_t":
        void *socket
        int fd
        short events
        short revents

# Constants from zmq.h (stable across libzmq 4.x).
cdef enum:
    ZMQ_HAUSNUMERO = 156384712
    EFSM = ZMQ_HAUSNUMERO + 51
    ENOCOMPATPROTO = ZMQ_HAUSNUMERO + 52
    ETERM = ZMQ_HAUSNUMERO + 53
    EMTHREAD = ZMQ_HAUSNUMERO + 54

    ZMQ_PAIR = 0
    ZMQ_PUB = 1
    ZMQ_SUB = 2
    ZMQ_REQ = 3
    ZMQ_REP = 4
    ZMQ_DEALER = 5
    ZMQ_ROUTER = 6
    ZMQ_PULL = 7
    ZMQ_PUSH = 8
    ZMQ_XPUB = 9
    ZMQ_XSUB = 10
    ZMQ_STREAM = 11

    ZMQ_SNDHWM = 23
    ZMQ_RCVHWM = 24
    ZMQ_LINGER = 17
    ZMQ_RCVMORE = 13
    ZMQ_FD = 14
    ZMQ_EVENTS = 15
    ZMQ_TYPE = 16
    ZMQ_SUBSCRIBE = 6
    ZMQ_ROUTER_MANDATORY = 33

    ZMQ_MORE = 1

    ZMQ_DONTWAIT = 1
    ZMQ_SNDMORE = 2

    ZMQ_POLLIN = 1
    ZMQ_POLLOUT = 2
    ZMQ_POLLERR = 4
    ZMQ_POLLPRI = 8

# Prototypes, as function-pointer types. None of them touches Python, so every call is
# allowed without the GIL and without exception checks.
ctypedef void (*zmq_version_fn)(int *major, int *minor, int *patch) noexcept nogil
ctypedef int (*zmq_errno_fn)() noexcept nogil
ctypedef const char *(*zmq_strerror_fn)(int errnum) noexcept nogil
ctypedef int (*zmq_msg_init_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef int (*zmq_msg_init_size_fn)(zmq_msg_t *msg, size_t size) noexcept nogil
ctypedef int (*zmq_msg_close_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef void *(*zmq_msg_data_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef size_t (*zmq_msg_size_fn)(const zmq_msg_t *msg) noexcept nogil
ctypedef int (*zmq_msg_more_fn)(const zmq_msg_t *msg) noexcept nogil
ctypedef int (*zmq_msg_move_fn)(zmq_msg_t *dest, zmq_msg_t *src) noexcept nogil
ctypedef int (*zmq_msg_copy_fn)(zmq_msg_t *dest, zmq_msg_t *src) noexcept nogil
ctypedef int (*zmq_msg_recv_fn)(zmq_msg_t *msg, void *socket, int flags) noexcept nogil
ctypedef int (*zmq_msg_send_fn)(zmq_msg_t *msg, void *socket, int flags) noexcept nogil
ctypedef int (*zmq_send_fn)(void *socket, const void *buf, size_t len, int flags) noexcept nogil
ctypedef int (*zmq_send_const_fn)(
    void *socket, const void *buf, size_t len, int flags) noexcept nogil
ctypedef int (*zmq_recv_fn)(void *socket, void *buf, size_t len, int flags) noexcept nogil
ctypedef int (*zmq_poll_fn)(zmq_pollitem_t *items, int nitems, long timeout) noexcept nogil
ctypedef int (*zmq_getsockopt_fn)(
    void *socket, int option, void *optval, size_t *optvallen) noexcept nogil
ctypedef int (*zmq_setsockopt_fn)(
    void *socket, int option, const void *optval, size_t optvallen) noexcept nogil
# libc's srand, as libzmq's own rand() calls resolve it (see _resolve_libzmq_srand).
ctypedef void (*srand_fn)(unsigned int seed) noexcept nogil

cdef zmq_version_fn zmq_version = NULL
cdef zmq_errno_fn zmq_errno = NULL
cdef zmq_strerror_fn zmq_strerror = NULL
cdef zmq_msg_init_fn zmq_msg_init = NULL
cdef zmq_msg_init_size_fn zmq_msg_init_size = NULL
cdef zmq_msg_close_fn zmq_msg_close = NULL
cdef zmq_msg_data_fn zmq_msg_data = NULL
cdef zmq_msg_size_fn zmq_msg_size = NULL
cdef zmq_msg_more_fn zmq_msg_more = NULL
cdef zmq_msg_move_fn zmq_msg_move = NULL
cdef zmq_msg_copy_fn zmq_msg_copy = NULL
cdef zmq_msg_recv_fn zmq_msg_recv = NULL
cdef zmq_msg_send_fn zmq_msg_send = NULL
cdef zmq_send_fn zmq_send = NULL
cdef zmq_send_const_fn zmq_send_const = NULL
cdef zmq_recv_fn zmq_recv = NULL
cdef zmq_poll_fn zmq_poll = NULL
cdef zmq_getsockopt_fn zmq_getsockopt = NULL
cdef zmq_setsockopt_fn zmq_setsockopt = NULL
cdef srand_fn libzmq_srand = NULL


cdef str _object_file(void *address):
    """Name the shared object that defines `address` (via dladdr)."""
    cdef Dl_info info
    if dladdr(<const void *>address, &info) == 0 or info.dli_fname == NULL:
        return "an unknown object"
    return info.dli_fname.decode(errors="replace")


cdef void *_libzmq_symbol(void *handle, const char *name, list missing, list clashes):
    """Look up one libzmq function through pyzmq's backend handle; note it if absent.

    The global scope's definition is taken only when it lives in the same file as the
    handle's; a definition in another file is noted in `clashes` as (global, pyzmq's).
    """
    cdef void *address = dlsym(handle, name)
    cdef void *global_address
    cdef Dl_info ours, theirs
    if address == NULL:
        missing.append(name.decode())
        return NULL
    global_address = dlsym(RTLD_DEFAULT, name)
    if global_address == NULL or global_address == address:
        return address
    if (dladdr(<const void *>address, &ours) != 0
            and dladdr(<const void *>global_address, &theirs) != 0
            and ours.dli_fbase == theirs.dli_fbase):
        return global_address  # the same libzmq, reached another way
    clashes.append((_object_file(global_address), _object_file(address)))
    return address


cdef int _resolve_libzmq() except -1:
    """Point every prototype above at the libzmq that pyzmq has loaded.

    Raises ImportError when pyzmq's Cython backend is not loaded or lacks a symbol.
    """
    global zmq_version, zmq_errno, zmq_strerror, zmq_msg_init, zmq_msg_init_size
    global zmq_msg_close, zmq_msg_data, zmq_msg_size, zmq_msg_more, zmq_msg_move
    global zmq_msg_copy, zmq_msg_recv, zmq_msg_send, zmq_send, zmq_send_const, zmq_recv
    global zmq_poll, zmq_getsockopt, zmq_setsockopt
    cdef void *handle
    cdef list missing = []
    cdef list clashes = []
    try:
        import zmq.backend.cython._zmq as _pyzmq_backend
    except ImportError as exc:
        raise ImportError(
            "devmgr needs pyzmq's Cython backend (zmq.backend.cython._zmq) to find "
            f"libzmq, and it could not be imported: {exc}"
        ) from exc
    path = _pyzmq_backend.__file__.encode()
    # RTLD_NOLOAD: only a handle on what is already mapped; never load a second copy.
    handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        error = dlerror()
        raise ImportError(
            f"devmgr could not get a handle on pyzmq's backend {path.decode()!r}: "
            f"{error.decode() if error != NULL else 'unknown dlopen error'}"
        )
    zmq_version = <zmq_version_fn>_libzmq_symbol(handle, b"zmq_version", missing, clashes)
    zmq_errno = <zmq_errno_fn>_libzmq_symbol(handle, b"zmq_errno", missing, clashes)
    zmq_strerror = <zmq_strerror_fn>_libzmq_symbol(
        handle, b"zmq_strerror", missing, clashes)
    zmq_msg_init = <zmq_msg_init_fn>_libzmq_symbol(
        handle, b"zmq_msg_init", missing, clashes)
    zmq_msg_init_size = <zmq_msg_init_size_fn>_libzmq_symbol(
        handle, b"zmq_msg_init_size", missing, clashes)
    zmq_msg_close = <zmq_msg_close_fn>_libzmq_symbol(
        handle, b"zmq_msg_close", missing, clashes)
    zmq_msg_data = <zmq_msg_data_fn>_libzmq_symbol(
        handle, b"zmq_msg_data", missing, clashes)
    zmq_msg_size = <zmq_msg_size_fn>_libzmq_symbol(
        handle, b"zmq_msg_size", missing, clashes)
    zmq_msg_more = <zmq_msg_more_fn>_libzmq_symbol(
        handle, b"zmq_msg_more", missing, clashes)
    zmq_msg_move = <zmq_msg_move_fn>_libzmq_symbol(
        handle, b"zmq_msg_move", missing, clashes)
    zmq_msg_copy = <zmq_msg_copy_fn>_libzmq_symbol(
        handle, b"zmq_msg_copy", missing, clashes)
    zmq_msg_recv = <zmq_msg_recv_fn>_libzmq_symbol(
        handle, b"zmq_msg_recv", missing, clashes)
    zmq_msg_send = <zmq_msg_send_fn>_libzmq_symbol(
        handle, b"zmq_msg_send", missing, clashes)
    zmq_send = <zmq_send_fn>_libzmq_symbol(handle, b"zmq_send", missing, clashes)
    zmq_send_const = <zmq_send_const_fn>_libzmq_symbol(
        handle, b"zmq_send_const", missing, clashes)
    zmq_recv = <zmq_recv_fn>_libzmq_symbol(handle, b"zmq_recv", missing, clashes)
    zmq_poll = <zmq_poll_fn>_libzmq_symbol(handle, b"zmq_poll", missing, clashes)
    zmq_getsockopt = <zmq_getsockopt_fn>_libzmq_symbol(
        handle, b"zmq_getsockopt", missing, clashes)
    zmq_setsockopt = <zmq_setsockopt_fn>_libzmq_symbol(
        handle, b"zmq_setsockopt", missing, clashes)
    # The handle is deliberately kept open: pyzmq keeps the library mapped anyway.
    if clashes:
        other, pyzmqs = clashes[0]
        raise ImportError(
            f"two copies of libzmq are loaded in this process: {other} (in the global "
            f"symbol scope: linked into the program, LD_PRELOADed or loaded with "
            f"RTLD_GLOBAL) and {pyzmqs} (pyzmq's). pyzmq's calls may go to either, and "
            "sockets of one copy must never reach the other, so devmgr will not guess: "
            "load only the libzmq pyzmq uses."
        )
    if missing:
        raise ImportError(
            "devmgr could not find these libzmq functions through pyzmq's backend "
            f"{path.decode()!r}: {', '.join(missing)}"
        )
    check_libzmq_version(libzmq_version(), libzmq_path())
    _resolve_libzmq_srand()
    return 0


# The libzmq versions whose ABI the declarations above match: zmq_msg_t is 64 bytes
# aligned like a pointer from 4.2 on (zmq.h), and the prototypes are those of zmq.h 4.x.
# pyzmq's wheels bundle 4.3.5. Another major version may change any of it.
LIBZMQ_SUPPORTED = ((4, 2, 0), (5, 0, 0))  # from, up to but excluding


def check_libzmq_version(version, path=None):
    """Raise ImportError unless `version` (major, minor, patch) is one the core is for.

    The core declares zmq_msg_t's size and libzmq's prototypes itself (pyzmq ships no
    zmq.h), so a libzmq outside LIBZMQ_SUPPORTED could corrupt memory rather than fail.
    """
    low, high = LIBZMQ_SUPPORTED
    version = tuple(version)
    if low <= version < high:
        return
    found = ".".join(map(str, version))
    where = f" ({path})" if path else ""
    raise ImportError(
        f"devmgr's core is written for libzmq {low[0]}.{low[1]} up to (not including) "
        f"{high[0]}.0: it declares zmq_msg_t as 64 bytes and libzmq's 4.x prototypes "
        f"itself. pyzmq loaded libzmq {found}{where}, whose ABI may differ. Use a pyzmq "
        "built with libzmq 4.x (its wheels bundle 4.3.5)."
    )


cdef int _resolve_libzmq_srand() except -1:
    """Find the srand() that seeds the rand() libzmq draws ROUTER peer ids from.

    The lookup goes through a handle on libzmq's own file (the one found above), so it
    searches libzmq and then its dependencies: the libc its rand() calls are bound to,
    whatever copy of libzmq pyzmq bundles.
    """
    global libzmq_srand
    cdef Dl_info info
    cdef void *handle
    if dladdr(<const void *>zmq_msg_recv, &info) == 0 or info.dli_fname == NULL:
        raise ImportError("devmgr could not name the file of pyzmq's libzmq (dladdr)")
    handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        raise ImportError(
            f"devmgr could not get a handle on libzmq {info.dli_fname.decode()!r}")
    libzmq_srand = <srand_fn>dlsym(handle, b"srand")
    if libzmq_srand == NULL:
        raise ImportError(
            f"devmgr could not find srand() from libzmq {info.dli_fname.decode()!r}")
    return 0


def libzmq_path():
    """Return the file of the libzmq whose functions this module calls (via dladdr)."""
    cdef Dl_info info
    if zmq_msg_recv == NULL or dladdr(<const void *>zmq_msg_recv, &info) == 0:
        return None
    if info.dli_fname == NULL:
        return None
    return info.dli_fname.decode()


def libzmq_version():
    """Return the (major, minor, patch) version of the resolved libzmq."""
    cdef int major = 0, minor = 0, patch = 0
    zmq_version(&major, &minor, &patch)
    return (major, minor, patch)


cdef inline void *socket_handle(object socket) except NULL:
    """Return libzmq's socket pointer for a pyzmq socket (`socket.underlying`)."""
    cdef uintptr_t address
    if socket is None:
        raise TypeError("a zmq.Socket is required, not None")
    try:
        address = <uintptr_t>socket.underlying
    except AttributeError:
        raise TypeError(f"expected a zmq.Socket, got {type(socket).__name__}") from None
    if address == 0:
        # what pyzmq raises for a closed socket, and what _Controlled.run expects
        raise zmq_error_for(ENOTSOCK)
    return <void *>address


cdef inline object zmq_error_for(int errnum):
    """Return the pyzmq exception pyzmq itself would raise for `errnum`."""
    import zmq.error
    if errnum == ETERM:
        return zmq.error.ContextTerminated(errnum)
    if errnum == EAGAIN:
        return zmq.error.Again(errnum)
    if errnum == EINTR:
        return zmq.error.InterruptedSystemCall(errnum)
    return zmq.error.ZMQError(errnum)
