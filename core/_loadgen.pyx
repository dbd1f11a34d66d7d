# cython: language_level=3
"""Load generator for `devmgr bench`: a sender, a sink and a monitor drain in C loops.

A Python sender tops out near 600k msg/s on a small machine, below what the devices
under test forward; these loops run without the GIL on `socket.underlying` so that the
generator and the sink are never what the benchmark measures.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
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


# --- round-trip latency: `devmgr bench --latency` -------------------------------------

cdef extern from "<time.h>" nogil:
    int clock_nanosleep(int clockid, int flags, const timespec* request, timespec* remain)
    enum:
        TIMER_ABSTIME

cdef enum:
    # frames kept per echoed message; a longer message is dropped (and counted)
    _MAX_FRAMES = 16


cdef inline void _sleep_until(int64_t when) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = when // 1000000000
    ts.tv_nsec = when % 1000000000
    while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR:
        pass


cdef inline bint _readable(void* sock) noexcept nogil:
    cdef zmq_pollitem_t item
    item.socket = sock
    item.fd = 0
    item.events = ZMQ_POLLIN
    item.revents = 0
    return zmq_poll(&item, 1, 0) > 0 and (item.revents & ZMQ_POLLIN) != 0


def echo(socket, stop_socket, int drop=-1, double timeout=60.0):
    """Send every message received on `socket` back on it, frames and all.

    A message whose last frame starts with the byte `drop` is dropped instead: that is
    the opposite stream of `bench --latency`, which must reach the worker but not come
    back. Runs until `stop_socket` is readable or `timeout` seconds pass without a
    message; returns (echoed, dropped).
    """
    cdef void* sock = socket_handle(socket)
    cdef void* stop = socket_handle(stop_socket)
    cdef zmq_msg_t frames[_MAX_FRAMES]
    cdef int n, i, rc
    cdef uint64_t echoed = 0, dropped = 0
    cdef int64_t idle = <int64_t>(timeout * 1e9)
    cdef bint keep, failed = False
    for i in range(_MAX_FRAMES):
        zmq_msg_init(&frames[i])
    with nogil:
        while not failed:
            rc = zmq_msg_recv(&frames[0], sock, ZMQ_DONTWAIT)
            if rc < 0:
                if zmq_errno() == EINTR:
                    continue
                if zmq_errno() != EAGAIN or _wait_in(sock, stop, _now_ns() + idle) != 1:
                    break
                continue
            n = 1
            keep = True
            while zmq_msg_more(&frames[n - 1]):
                if n == _MAX_FRAMES:
                    keep = False
                    n -= 1  # read the rest into the last frame, then drop the message
                rc = zmq_msg_recv(&frames[n], sock, 0)
                if rc < 0:
                    if zmq_errno() == EINTR:
                        continue
                    failed = True
                    break
                n += 1
            if failed:
                break
            if keep and drop >= 0 and zmq_msg_size(&frames[n - 1]) > 0:
                keep = (<unsigned char*>zmq_msg_data(&frames[n - 1]))[0] != drop
            if not keep:
                dropped += 1
                continue
            for i in range(n):
                while zmq_msg_send(&frames[i], sock, ZMQ_SNDMORE if i < n - 1 else 0) < 0:
                    if zmq_errno() != EINTR:
                        failed = True
                        break
                if failed:
                    break
            echoed += 1
    for i in range(_MAX_FRAMES):
        zmq_msg_close(&frames[i])
    return echoed, dropped


def ping(socket, uint64_t count, size_t size, int64_t interval_ns, double timeout=5.0):
    """Send `count` requests one at a time, paced, and time each one's round trip.

    Request i is sent at the start of its slot, `start + i * interval_ns` (at once when
    the previous reply came back after that), and its reply is awaited before the next.
    A request is `size` bytes (at least 1) starting with b"R". Returns the round-trip
    times in nanoseconds as native int64 bytes; fewer than `count` when a reply takes
    longer than `timeout` seconds or is not the request sent.
    """
    cdef void* sock = socket_handle(socket)
    cdef size_t length = size if size > 0 else 1
    cdef char* request = <char*>malloc(length)
    cdef int64_t* rtts = <int64_t*>malloc((count if count > 0 else 1) * sizeof(int64_t))
    cdef uint64_t done = 0, nbytes
    cdef int64_t start, slot, sent_at, deadline, limit = <int64_t>(timeout * 1e9)
    cdef int rc
    cdef zmq_msg_t reply
    if request == NULL or rtts == NULL:
        free(request)
        free(rtts)
        raise MemoryError()
    memset(request, 0x72, length)
    request[0] = 0x52
    zmq_msg_init(&reply)
    try:
        with nogil:
            start = _now_ns()
            while done < count:
                slot = start + <int64_t>done * interval_ns
                if _now_ns() < slot:
                    _sleep_until(slot)
                sent_at = _now_ns()
                rc = zmq_send(sock, request, length, 0)
                if rc < 0:
                    if zmq_errno() == EINTR:
                        continue
                    break
                deadline = sent_at + limit
                nbytes = 0
                rc = _receive(sock, &reply, &nbytes)
                while rc == 0:
                    if _wait_in(sock, NULL, deadline) != 1:
                        rc = -1
                        break
                    rc = _receive(sock, &reply, &nbytes)
                if rc != 1:
                    break
                rtts[done] = _now_ns() - sent_at
                if nbytes != length or (<char*>zmq_msg_data(&reply))[0] != 0x52:
                    break
                done += 1
        return (<char*>rtts)[:done * sizeof(int64_t)]
    finally:
        zmq_msg_close(&reply)
        free(request)
        free(rtts)


def stream(socket, stop_socket, uint64_t burst, int64_t period_ns, size_t size):
    """Send bursts of `burst` messages every `period_ns` until `stop_socket` is readable.

    The opposite stream of `bench --latency`: a burst never waits at the HWM (what does
    not fit is skipped), so the stream's rate is at most burst / period. The payload is
    the shared b"a" buffer. Returns (sent, skipped).
    """
    cdef void* sock = socket_handle(socket)
    cdef void* stop = socket_handle(stop_socket)
    cdef const char* payload = _payload_of(size)
    cdef uint64_t sent = 0, skipped = 0, i
    cdef int64_t tick
    cdef int rc
    with nogil:
        tick = _now_ns()
        while not _readable(stop):
            for i in range(burst):
                rc = zmq_send_const(sock, payload, size, ZMQ_DONTWAIT)
                if rc >= 0:
                    sent += 1
                elif zmq_errno() == EAGAIN:
                    skipped += burst - i
                    break
                elif zmq_errno() != EINTR:
                    break
            tick += period_ns
            if _now_ns() < tick:
                _sleep_until(tick)
    return sent, skipped
