# cython: language_level=3
"""Load generator for `devmgr bench`: a sender, a sink and a monitor drain in C loops.

A Python sender tops out near 600k msg/s on a small machine, below what the devices
under test forward; these loops run without the GIL on `socket.underlying` so that the
generator and the sink are never what the benchmark measures.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

include "libzmq.pxi"

_resolve_libzmq()


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline long _remaining_ms(int64_t deadline) noexcept nogil:
    cdef int64_t left = deadline - _now_ns()
    if left <= 0:
        return 0
    # poll in slices of at most 100 ms so a deadline is noticed promptly
    return min(<long>(left // 1000000) + 1, 100)


def monotonic_ns() -> int:
    """Return CLOCK_MONOTONIC in nanoseconds (the clock the loops stamp with)."""
    return _now_ns()


# One payload buffer, shared by every message sent: zmq_send_const makes libzmq reference
# it until the bytes are written, possibly after send() has returned, so it is never
# freed. A larger size replaces it and the old one is left allocated on purpose.
cdef char* _payload = NULL
cdef size_t _payload_size = 0


cdef const char* _payload_of(size_t size) except NULL:
    global _payload, _payload_size
    cdef char* fresh
    if _payload == NULL or size > _payload_size:
        fresh = <char*>malloc(size if size > 0 else 1)
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0x61, size)
        _payload = fresh
        _payload_size = size
    return _payload


def send(socket, uint64_t count, size_t size, double timeout=30.0):
    """Send `count` single-frame messages of `size` bytes, waiting at the HWM.

    Returns (sent, first_ns, last_ns): sent is short of `count` only when `timeout`
    seconds pass without the peer taking a message, or the context ends.
    """
    cdef void* sock = socket_handle(socket)
    cdef const char* payload = _payload_of(size)
    cdef uint64_t sent = 0
    cdef int64_t first = 0, last = 0, deadline
    cdef int rc, err
    cdef zmq_pollitem_t item
    item.socket = sock
    item.fd = 0
    item.events = ZMQ_POLLOUT
    with nogil:
        first = _now_ns()
        deadline = first + <int64_t>(timeout * 1e9)
        while sent < count:
            # non-blocking send + poll on EAGAIN behaves as a blocking send at the HWM,
            # but a vanished peer cannot hang us past the deadline
            # zmq_send_const: libzmq references the payload instead of copying it, so the
            # sender costs no malloc and no memcpy per message
            rc = zmq_send_const(sock, payload, size, ZMQ_DONTWAIT)
            if rc >= 0:
                sent += 1
                continue
            err = zmq_errno()
            if err == EINTR:
                continue
            if err != EAGAIN:
                break
            if _now_ns() >= deadline:
                break
            item.revents = 0
            rc = zmq_poll(&item, 1, _remaining_ms(deadline))
            if rc > 0:
                deadline = _now_ns() + <int64_t>(timeout * 1e9)
            elif rc < 0 and zmq_errno() != EINTR:
                break
        last = _now_ns()
    return sent, first, last


cdef int _receive(void* sock, zmq_msg_t* msg, uint64_t* nbytes) noexcept nogil:
    """Receive one whole message without blocking; 1 done, 0 EAGAIN, -1 error."""
    cdef int rc, more
    cdef uint64_t total = 0
    cdef bint started = False
    while True:
        rc = zmq_msg_recv(msg, sock, 0 if started else ZMQ_DONTWAIT)
        if rc < 0:
            if zmq_errno() == EINTR:
                continue
            if not started and zmq_errno() == EAGAIN:
                return 0
            return -1
        started = True
        total += zmq_msg_size(msg)
        more = zmq_msg_more(msg)
        if not more:
            nbytes[0] += total
            return 1


cdef int _wait_in(void* sock, void* stop, int64_t deadline) noexcept nogil:
    """Wait until `sock` is readable (1), `stop` is readable (2), or the deadline (0)."""
    cdef zmq_pollitem_t items[2]
    cdef int n = 2 if stop != NULL else 1
    cdef int rc
    items[0].socket = sock
    items[0].fd = 0
    items[0].events = ZMQ_POLLIN
    items[1].socket = stop
    items[1].fd = 0
    items[1].events = ZMQ_POLLIN
    while True:
        items[0].revents = 0
        items[1].revents = 0
        rc = zmq_poll(items, n, _remaining_ms(deadline))
        if rc < 0:
            if zmq_errno() == EINTR:
                continue
            return -1
        if n == 2 and items[1].revents & ZMQ_POLLIN:
            return 2
        if items[0].revents & ZMQ_POLLIN:
            return 1
        if _now_ns() >= deadline:
            return 0


cdef tuple _drain(void* sock, void* stop, uint64_t count, double timeout):
    cdef zmq_msg_t msg
    cdef uint64_t received = 0, nbytes = 0
    cdef int64_t first = 0, last = 0, idle = <int64_t>(timeout * 1e9)
    cdef int64_t started
    cdef int rc
    zmq_msg_init(&msg)
    with nogil:
        started = _now_ns()
        while count == 0 or received < count:
            rc = _receive(sock, &msg, &nbytes)
            if rc == 1:
                received += 1
                last = _now_ns()
                if received == 1:
                    first = last
                continue
            if rc < 0:
                break
            # the timeout counts from the last message: a slow device is still measured,
            # a stuck one ends the loop
            if _wait_in(sock, stop, (last if received else started) + idle) != 1:
                break
    zmq_msg_close(&msg)
    return received, nbytes, first, last


def sink(socket, uint64_t count, double timeout=30.0):
    """Receive up to `count` messages (a multipart message counts once).

    Returns (received, bytes, first_ns, last_ns), the stamps taken as the first and the
    last message arrived; stops early when `timeout` seconds pass without a message.
    """
    return _drain(socket_handle(socket), NULL, count, timeout)


def drain(socket, stop_socket=None, uint64_t count=0, double timeout=30.0):
    """Receive messages until `stop_socket` is readable, `count` (0: no limit) or idle timeout.

    Meant for a SUB on a monitor: returns (received, bytes, first_ns, last_ns) as `sink`.
    """
    cdef void* stop = socket_handle(stop_socket) if stop_socket is not None else NULL
    return _drain(socket_handle(socket), stop, count, timeout)
