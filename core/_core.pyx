# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""devmgr's forwarding loop: one loop for every device kind, without the GIL.

The loop relays whole messages in both directions between an in-socket and an
out-socket, copies each one to an optional monitor socket behind its direction's
prefix frame (pyzmq's monitored_queue semantics, ROUTER-ROUTER identity swap included),
answers the device control commands (docs/protocol.md) on an optional control socket,
and wakes up on an optional signal fd. See `proxy` for the rules it keeps.
"""

from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport ENOMEM, errno
from libc.limits cimport INT_MAX
from libc.signal cimport SIGINT, SIGTERM
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport read

import os

include "libzmq.pxi"

_resolve_libzmq()

# libzmq's proxy forwards at most this many messages per direction per wake-up, so one
# busy direction cannot starve the other or the control socket.
cdef enum:
    BURST = 1000
# When a socket reports POLLOUT yet refuses the held message with EAGAIN, POLLOUT cannot
# tell us when to retry; a short timer does, without spinning. Two cases: a
# ROUTER_MANDATORY out-socket (some peer has room, the addressee has none), and an XPUB
# monitor with XPUB_NODROP (always writable, yet full while a subscriber is at its HWM).
cdef enum:
    BACKOFF_MS = 1
    STAT_COUNT = 8

cdef enum:
    SLOT_IN = 0
    SLOT_OUT = 1
    SLOT_MON = 2
    SLOT_CTRL = 3
    SLOT_SIGNAL = 4
    SLOT_COUNT = 5

cdef enum:
    STAGE_RECV = 0      # idle or receiving: waits for POLLIN on its source
    STAGE_DST = 1       # holding a whole message, sending it to its destination
    STAGE_MON = 2       # sent on; now copying it to the monitor

cdef enum:
    ADV_DONE = 0        # one message went all the way through
    ADV_WAIT = 1        # cannot progress until its socket is ready
    ADV_FAIL = 2        # libzmq error, in Loop.err

cdef enum:
    REPLY_OK = 0
    REPLY_PONG = 1
    REPLY_ERROR = 2
    REPLY_STATS = 3

# Statistics slots, in the order of devmgr/_wire.py's STAT_KEYS (docs/protocol.md; pinned
# by tests/test_wire.py): messages then bytes received, messages then bytes sent, for the
# in-socket (0-3) and the out-socket (4-7).
cdef enum:
    STAT_IN_RECEIVED = 0
    STAT_IN_SENT = 2
    STAT_OUT_RECEIVED = 4
    STAT_OUT_SENT = 6


cdef struct FrameBuf:
    zmq_msg_t *frames   # `cap` initialised messages; the first `count` hold data
    size_t cap
    size_t count


cdef struct Direction:
    int index
    bint enabled
    void *src
    void *dst
    int src_slot
    int dst_slot
    int stat_received
    int stat_sent
    FrameBuf buf
    int stage
    size_t dst_sent
    size_t mon_sent     # frames on the monitor so far, the prefix included
    bint dropped        # the destination refused this message (EHOSTUNREACH)
    bint backoff        # see BACKOFF_MS: retry this stage on a timer, not on POLLOUT
    bint drained        # terminating, and its source's last read gave EAGAIN
    bint requests       # two-way: the clients' side, whose new requests a drain refuses
    bint closed         # draining: this direction reads no more (see drain_finished)
    zmq_msg_t prefix


cdef struct Loop:
    void *ins
    void *outs
    void *mon
    void *ctrl
    int signal_fd
    bint drain_on_signals  # a SIGTERM/SIGINT byte on signal_fd starts a drain
    bint swap_ids
    bint ctrl_is_router
    Direction dirs[2]
    zmq_pollitem_t items[SLOT_COUNT]
    zmq_pollitem_t active[SLOT_COUNT]
    int active_slot[SLOT_COUNT]
    int mon_owner       # direction in the middle of a monitor message, or -1
    bint paused
    bint terminating
    bint has_deadline
    double drain_timeout
    double deadline
    bint two_way        # both directions relayed: a drain waits for a quiet period
    double drain_quiet  # seconds both directions must stay idle before a drain ends
    double idle_since   # when both directions became idle while draining, or -1
    uint64_t reads_seen # messages read (both sockets) when idle_since was last set
    FrameBuf ctrlbuf    # the control request being answered
    FrameBuf termbuf    # envelopes of the TERMINATE requests to answer at the end, in a row
    size_t *term_env    # frames of each of those envelopes (0 for a non-ROUTER socket)
    size_t term_count   # TERMINATE requests to answer OK when the loop returns
    size_t term_cap
    zmq_msg_t scratch
    uint64_t stats[STAT_COUNT]
    int err


cdef inline int poll_ms(double ms) noexcept nogil:
    """Turn a wait in milliseconds into zmq_poll's int: never negative, at most INT_MAX.

    A huge (or infinite) drain_timeout must not overflow the conversion; zmq_poll is
    simply called again once INT_MAX milliseconds (~24.8 days) have passed.
    """
    if not ms > 0:
        return 0
    if ms >= <double>INT_MAX:
        return INT_MAX
    return <int>ms


cdef double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef int check_signals() except -1 with gil:
    """Run pending Python signal handlers; propagate what they raise."""
    PyErr_CheckSignals()
    return 0


cdef int raise_os_error(int errnum) except -1 with gil:
    raise OSError(errnum, os.strerror(errnum))


cdef int raise_zmq(int errnum) except -1 with gil:
    if errnum == ENOMEM:
        raise MemoryError("devmgr's loop could not grow a frame buffer")
    raise zmq_error_for(errnum)


# --- frame buffers -----------------------------------------------------------------

cdef int framebuf_init(FrameBuf *buf, size_t cap) noexcept nogil:
    cdef size_t i
    buf.frames = <zmq_msg_t *>malloc(cap * sizeof(zmq_msg_t))
    if buf.frames == NULL:
        return -1
    for i in range(cap):
        zmq_msg_init(&buf.frames[i])
    buf.cap = cap
    buf.count = 0
    return 0


cdef int framebuf_grow(FrameBuf *buf) noexcept nogil:
    """Double the capacity, moving the frames held so far (a message of many parts)."""
    cdef size_t i, cap = buf.cap * 2
    cdef zmq_msg_t *frames = <zmq_msg_t *>malloc(cap * sizeof(zmq_msg_t))
    if frames == NULL:
        return -1
    for i in range(cap):
        zmq_msg_init(&frames[i])
    for i in range(buf.cap):
        zmq_msg_move(&frames[i], &buf.frames[i])
        zmq_msg_close(&buf.frames[i])
    free(buf.frames)
    buf.frames = frames
    buf.cap = cap
    return 0


cdef void framebuf_clear(FrameBuf *buf) noexcept nogil:
    """Release the frames of a message that will not be sent (dropped or abandoned)."""
    cdef size_t i
    for i in range(buf.count):
        zmq_msg_close(&buf.frames[i])
        zmq_msg_init(&buf.frames[i])
    buf.count = 0


cdef void framebuf_free(FrameBuf *buf) noexcept nogil:
    cdef size_t i
    if buf.frames == NULL:
        return
    for i in range(buf.cap):
        zmq_msg_close(&buf.frames[i])
    free(buf.frames)
    buf.frames = NULL
    buf.cap = buf.count = 0


# --- one direction -----------------------------------------------------------------

cdef inline bint reading_allowed(Loop *L, Direction *D) noexcept nogil:
    # a drain reads whatever the pause state: what it leaves unread would be lost
    if L.terminating:
        return not D.closed
    return not L.paused


cdef int advance(Loop *L, Direction *D) noexcept nogil:
    """Move this direction's current message as far as it goes without blocking.

    A message is received whole first (libzmq delivers all parts of a multipart message
    at once), then sent on, then copied to the monitor. Sending on before the monitor
    means a direction blocked by its destination never leaves a half-written message on
    the shared monitor socket, so the other direction keeps flowing.
    """
    cdef int rc, flags
    cdef size_t i, n
    cdef zmq_msg_t *frame
    if D.stage == STAGE_RECV:
        if not reading_allowed(L, D):
            return ADV_WAIT
        while True:
            if D.buf.count == D.buf.cap and framebuf_grow(&D.buf) < 0:
                L.err = ENOMEM
                return ADV_FAIL
            frame = &D.buf.frames[D.buf.count]
            rc = zmq_msg_recv(frame, D.src, ZMQ_DONTWAIT)
            if rc < 0:
                rc = zmq_errno()
                if rc == EAGAIN:
                    if D.buf.count == 0 and L.terminating:
                        D.drained = True
                        # what was queued at the stop is read; a request read from
                        # now on could not get its reply back before the device ends
                        D.closed = D.requests
                    return ADV_WAIT
                L.err = rc
                return ADV_FAIL
            D.buf.count += 1
            D.drained = False
            L.stats[D.stat_received + 1] += <uint64_t>rc
            if not zmq_msg_more(frame):
                break
        L.stats[D.stat_received] += 1
        if L.swap_ids and D.buf.count >= 2:
            # ROUTER to ROUTER: the sender's identity goes second, the addressee's first.
            zmq_msg_move(&L.scratch, &D.buf.frames[0])
            zmq_msg_move(&D.buf.frames[0], &D.buf.frames[1])
            zmq_msg_move(&D.buf.frames[1], &L.scratch)
        D.stage = STAGE_DST
        D.dst_sent = 0
        D.dropped = False

    if D.stage == STAGE_DST:
        n = D.buf.count
        while D.dst_sent < n:
            i = D.dst_sent
            flags = ZMQ_DONTWAIT if i + 1 == n else ZMQ_DONTWAIT | ZMQ_SNDMORE
            if L.mon != NULL:
                # the original stays for the monitor; a copy shares its data
                if zmq_msg_copy(&L.scratch, &D.buf.frames[i]) < 0:
                    L.err = zmq_errno()
                    return ADV_FAIL
                rc = zmq_msg_send(&L.scratch, D.dst, flags)
            else:
                rc = zmq_msg_send(&D.buf.frames[i], D.dst, flags)
            if rc < 0:
                rc = zmq_errno()
                if rc == EAGAIN:
                    return ADV_WAIT
                if rc == EHOSTUNREACH and i == 0:
                    # ROUTER_MANDATORY and no such peer: drop this message, go on.
                    D.dropped = True
                    break
                L.err = rc
                return ADV_FAIL
            L.stats[D.stat_sent + 1] += <uint64_t>rc
            D.dst_sent += 1
        if not D.dropped:
            L.stats[D.stat_sent] += 1
        if L.mon == NULL:
            if D.dropped:
                framebuf_clear(&D.buf)
            D.buf.count = 0
            D.stage = STAGE_RECV
            return ADV_DONE
        D.stage = STAGE_MON
        D.mon_sent = 0

    # STAGE_MON: the monitor is shared, so one message at a time goes onto it whole.
    if L.mon_owner >= 0 and L.mon_owner != D.index:
        return ADV_WAIT
    n = D.buf.count
    while D.mon_sent <= n:
        if D.mon_sent == 0:
            if zmq_msg_copy(&L.scratch, &D.prefix) < 0:
                L.err = zmq_errno()
                return ADV_FAIL
            rc = zmq_msg_send(&L.scratch, L.mon, ZMQ_DONTWAIT | ZMQ_SNDMORE)
        else:
            i = D.mon_sent - 1
            flags = ZMQ_DONTWAIT if i + 1 == n else ZMQ_DONTWAIT | ZMQ_SNDMORE
            rc = zmq_msg_send(&D.buf.frames[i], L.mon, flags)
        if rc < 0:
            rc = zmq_errno()
            if rc == EAGAIN:
                return ADV_WAIT
            L.err = rc
            return ADV_FAIL
        if D.mon_sent == 0:
            L.mon_owner = D.index
        D.mon_sent += 1
    L.mon_owner = -1
    D.buf.count = 0
    D.stage = STAGE_RECV
    return ADV_DONE


cdef inline size_t stage_progress(Direction *D) noexcept nogil:
    """Frames of the held message already sent in its current stage."""
    return D.dst_sent if D.stage == STAGE_DST else D.mon_sent


cdef int serve(Loop *L, Direction *D) except -1 nogil:
    """Forward up to BURST messages in one direction, then let the others have a turn.

    A direction that was woken in a sending stage (by POLLOUT or its backoff timer) and
    could not send a single frame backs off: its socket claims room it does not have.
    Any progress clears the backoff, so the next wait is on POLLOUT again.
    """
    cdef int n = 0, r
    cdef int stage_before = D.stage
    cdef size_t progress_before = stage_progress(D)
    while n < BURST:
        r = advance(L, D)
        if r == ADV_DONE:
            n += 1
            continue
        if r == ADV_FAIL:
            if L.err == EINTR:
                check_signals()
                continue
            raise_zmq(L.err)
        D.backoff = (stage_before != STAGE_RECV and n == 0 and D.stage == stage_before
                     and stage_progress(D) == progress_before)
        return 0
    D.backoff = False
    return 0


# --- control and signals -----------------------------------------------------------

cdef int ctrl_send(Loop *L, int kind, zmq_msg_t *env, size_t env_count) except -1 nogil:
    """Send one reply after `env_count` envelope frames (a ROUTER request's); never block.

    A reply that cannot be queued at once is dropped: a control peer that went away or
    stopped reading loses its reply rather than stalling the data path. The envelope
    frames are consumed when sent; the caller releases what is left of them.
    """
    cdef size_t i = 0
    cdef int j = 0, parts, rc, e, flags
    cdef const char *data
    cdef size_t size
    cdef bint dropped = False
    while i < env_count:
        rc = zmq_msg_send(&env[i], L.ctrl, ZMQ_DONTWAIT | ZMQ_SNDMORE)
        if rc < 0:
            e = zmq_errno()
            if e == EINTR:
                check_signals()
                continue
            if e == ETERM:
                raise_zmq(e)
            dropped = True
            break
        i += 1
    parts = STAT_COUNT if kind == REPLY_STATS else 1
    while not dropped and j < parts:
        if kind == REPLY_STATS:
            data = <const char *>&L.stats[j]
            size = sizeof(uint64_t)
        elif kind == REPLY_OK:
            data = b"OK"
            size = 2
        elif kind == REPLY_PONG:
            data = b"PONG"
            size = 4
        else:
            data = b"ERROR"
            size = 5
        flags = ZMQ_DONTWAIT if j + 1 == parts else ZMQ_DONTWAIT | ZMQ_SNDMORE
        rc = zmq_send(L.ctrl, data, size, flags)
        if rc < 0:
            e = zmq_errno()
            if e == EINTR:
                check_signals()
                continue
            if e == ETERM:
                raise_zmq(e)
            break
        j += 1
    return 0


cdef inline bint is_word(zmq_msg_t *msg, const char *word, size_t size) noexcept nogil:
    return zmq_msg_size(msg) == size and memcmp(zmq_msg_data(msg), word, size) == 0


cdef void start_terminating(Loop *L) noexcept nogil:
    if not L.terminating:
        L.terminating = True
        L.deadline = monotonic() + L.drain_timeout


cdef int keep_terminate(Loop *L, size_t env) except -1 nogil:
    """Keep a TERMINATE request's envelope (moved out of ctrlbuf) for its OK at the end."""
    cdef FrameBuf *T = &L.termbuf
    cdef size_t i, cap
    cdef size_t *grown
    if L.term_count == L.term_cap:
        cap = L.term_cap * 2 if L.term_cap else 4
        grown = <size_t *>realloc(L.term_env, cap * sizeof(size_t))
        if grown == NULL:
            raise_zmq(ENOMEM)
        L.term_env = grown
        L.term_cap = cap
    for i in range(env):
        if T.count == T.cap and framebuf_grow(T) < 0:
            raise_zmq(ENOMEM)
        zmq_msg_move(&T.frames[T.count], &L.ctrlbuf.frames[i])
        T.count += 1
    L.term_env[L.term_count] = env
    L.term_count += 1
    return 0


cdef int answer_terminates(Loop *L) except -1 nogil:
    """Send OK to every TERMINATE received, in order: the loop is about to return."""
    cdef FrameBuf *T = &L.termbuf
    cdef size_t k, offset = 0
    for k in range(L.term_count):
        ctrl_send(L, REPLY_OK, &T.frames[offset], L.term_env[k])
        offset += L.term_env[k]
    L.term_count = 0
    framebuf_clear(T)
    return 0


cdef int handle_ctrl(Loop *L) except -1 nogil:
    """Answer up to BURST commands waiting on the control socket, draining or not.

    The bound is the data sockets' own: a control peer that keeps sending cannot starve
    forwarding, since the rest waits for the next wake-up (POLLIN stays set).
    While the loop drains, PING and STATISTICS are answered as usual, PAUSE and RESUME
    get ERROR (a draining loop reads its inputs whatever the pause state), and every
    TERMINATE is answered OK when the loop returns.
    """
    cdef FrameBuf *B = &L.ctrlbuf
    cdef int rc, kind, n = 0
    cdef size_t i, env
    cdef zmq_msg_t *cmd
    while n < BURST:
        n += 1
        framebuf_clear(B)
        while True:
            if B.count == B.cap and framebuf_grow(B) < 0:
                raise_zmq(ENOMEM)
            rc = zmq_msg_recv(&B.frames[B.count], L.ctrl, ZMQ_DONTWAIT)
            if rc < 0:
                rc = zmq_errno()
                if rc == EINTR:
                    check_signals()
                    continue
                if rc == EAGAIN:
                    framebuf_clear(B)
                    return 0
                raise_zmq(rc)
            B.count += 1
            if not zmq_msg_more(&B.frames[B.count - 1]):
                break
        env = 0
        if L.ctrl_is_router and B.count >= 2:
            # identity, then (from a REQ peer) an empty delimiter, then the command
            env = 1
            for i in range(1, B.count - 1):
                if zmq_msg_size(&B.frames[i]) == 0:
                    env = i + 1
                    break
        kind = REPLY_ERROR  # a multipart command is consumed whole and refused
        if B.count - env == 1:
            cmd = &B.frames[env]
            if is_word(cmd, b"PING", 4):
                kind = REPLY_PONG
            elif is_word(cmd, b"STATISTICS", 10):
                kind = REPLY_STATS
            elif is_word(cmd, b"PAUSE", 5) and not L.terminating:
                L.paused = True
                kind = REPLY_OK
            elif is_word(cmd, b"RESUME", 6) and not L.terminating:
                L.paused = False
                kind = REPLY_OK
            elif is_word(cmd, b"TERMINATE", 9):
                keep_terminate(L, env)
                start_terminating(L)
                continue
        ctrl_send(L, kind, B.frames, env)
    framebuf_clear(B)
    return 0


cdef int handle_signal_fd(Loop *L) except -1 nogil:
    """Empty the wakeup fd, run Python's handlers, and (if asked) drain on SIGTERM/SIGINT.

    End-of-file (every write end closed) leaves the fd readable for good: the loop stops
    polling it rather than spin, and goes on. A read error other than EAGAIN is raised.
    """
    cdef unsigned char data[64]
    cdef Py_ssize_t n, k
    cdef bint stop = False
    cdef int e
    while True:
        n = read(L.signal_fd, data, sizeof(data))
        if n == 0:
            L.signal_fd = -1
            L.items[SLOT_SIGNAL].fd = -1
            break
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                break
            raise_os_error(e)
        for k in range(n):
            if data[k] == SIGTERM or data[k] == SIGINT:
                stop = True
        if n < <Py_ssize_t>sizeof(data):
            break
    check_signals()
    if stop and L.drain_on_signals:
        start_terminating(L)
    return 0


# --- the loop ----------------------------------------------------------------------

cdef bint drain_finished(Loop *L) noexcept nogil:
    """Tell whether a drain is over: every direction idle, and for two ways, quietly so.

    A direction is idle when it holds nothing and its last read gave EAGAIN. With both
    directions relayed, one idle moment is not enough: a reply to a request forwarded a
    moment ago is still on its way back. So both must stay idle for `drain_quiet`
    seconds; any message read starts the quiet period over. drain_timeout caps it all.
    The requests side (see `requests`) is read until its first EAGAIN only, so clients
    that keep sending cannot hold the drain open while their replies are still owed.

    A pass of the loop that reads messages also ends with the read that gives EAGAIN,
    so this check, made between passes, never sees a direction busy: it tells a read by
    the message counters having moved since the quiet period began.
    """
    cdef int d
    cdef double now
    cdef uint64_t reads
    for d in range(2):
        if L.dirs[d].enabled and not (L.dirs[d].drained and L.dirs[d].stage == STAGE_RECV):
            L.idle_since = -1.0
            return False
    if not L.two_way:
        return True
    now = monotonic()
    reads = L.stats[STAT_IN_RECEIVED] + L.stats[STAT_OUT_RECEIVED]
    if L.idle_since < 0 or reads != L.reads_seen:
        L.idle_since = now
        L.reads_seen = reads
    return now - L.idle_since >= L.drain_quiet


cdef inline bint runnable(Loop *L, Direction *D) noexcept nogil:
    if not D.enabled:
        return False
    if D.stage == STAGE_RECV:
        if not reading_allowed(L, D):
            return False
        # while draining, a source is tried once so that its EAGAIN is seen; once it
        # has given EAGAIN, it is read again when POLLIN says so (the quiet period)
        return ((L.terminating and not D.drained)
                or (L.items[D.src_slot].revents & ZMQ_POLLIN) != 0)
    if D.backoff:
        return True  # woken by its timer (or by something else: trying again is cheap)
    if D.stage == STAGE_DST:
        return (L.items[D.dst_slot].revents & ZMQ_POLLOUT) != 0
    return (L.items[SLOT_MON].revents & ZMQ_POLLOUT) != 0


cdef int run_loop(Loop *L) except -1 nogil:
    cdef int d, s, nactive, timeout, rc, e, wait_ms
    cdef Direction *D
    while True:
        if L.terminating and (drain_finished(L) or
                              (L.has_deadline and monotonic() >= L.deadline)):
            break
        for s in range(SLOT_COUNT):
            L.items[s].events = 0
            L.items[s].revents = 0
        timeout = -1
        if L.ctrl != NULL:
            L.items[SLOT_CTRL].events = ZMQ_POLLIN
        if L.signal_fd >= 0:
            L.items[SLOT_SIGNAL].events = ZMQ_POLLIN
        for d in range(2):
            D = &L.dirs[d]
            if not D.enabled:
                continue
            if D.stage == STAGE_RECV:
                if reading_allowed(L, D):
                    L.items[D.src_slot].events |= ZMQ_POLLIN
                    if L.terminating and not D.drained:
                        timeout = 0
            elif D.backoff:
                if timeout < 0 or timeout > BACKOFF_MS:
                    timeout = BACKOFF_MS
            elif D.stage == STAGE_DST:
                L.items[D.dst_slot].events |= ZMQ_POLLOUT
            else:
                L.items[SLOT_MON].events |= ZMQ_POLLOUT
        if L.terminating and L.idle_since >= 0:
            wait_ms = poll_ms((L.idle_since + L.drain_quiet - monotonic()) * 1000.0 + 1.0)
            if timeout < 0 or wait_ms < timeout:
                timeout = wait_ms
        if L.terminating and L.has_deadline:
            wait_ms = poll_ms((L.deadline - monotonic()) * 1000.0 + 1.0)
            if timeout < 0 or wait_ms < timeout:
                timeout = wait_ms
        # Poll only what is waited on: each socket item costs zmq_poll a syscall or two.
        nactive = 0
        for s in range(SLOT_COUNT):
            if L.items[s].events:
                L.active[nactive] = L.items[s]
                L.active_slot[nactive] = s
                nactive += 1
        if nactive == 0 and timeout < 0:
            timeout = 100  # nothing to wait on (cannot happen): re-check without spinning
        rc = zmq_poll(L.active, nactive, timeout)
        if rc < 0:
            e = zmq_errno()
            if e == EINTR:
                check_signals()
                continue
            raise_zmq(e)
        for s in range(nactive):
            L.items[L.active_slot[s]].revents = L.active[s].revents
        if L.items[SLOT_CTRL].revents & ZMQ_POLLIN:
            handle_ctrl(L)
        if L.items[SLOT_SIGNAL].revents & ZMQ_POLLIN:
            handle_signal_fd(L)
        for d in range(2):
            D = &L.dirs[d]
            if runnable(L, D):
                serve(L, D)
    if L.ctrl != NULL:
        handle_ctrl(L)  # what arrived since the last poll is answered too, then the OKs
        answer_terminates(L)
    return 0


# --- routing ids ---------------------------------------------------------------------

def seed_routing_ids():
    """Seed libc's rand(), from which libzmq draws a new ROUTER's peer routing ids.

    libzmq (4.3.5, the copy pyzmq's wheels bundle) starts each ROUTER's automatic peer
    ids at a value from libc's rand() and never seeds it, so every fresh process hands
    its first peer the same id (0x006b8b4567 with glibc). Seeding from os.urandom, in
    the very libc libzmq calls, gives each process ids of its own. Call it before the
    first ROUTER socket (a REP included) of the process exists; it changes what libc's
    rand() returns for the whole process.
    """
    libzmq_srand(<unsigned int>int.from_bytes(os.urandom(4), "little"))


# --- set-up and the Python entry point -----------------------------------------------

cdef int init_prefix(zmq_msg_t *msg, object prefix, str name) except -1:
    cdef Py_buffer view
    if isinstance(prefix, str):
        raise TypeError(f"{name} must be bytes, not str (encode it)")
    PyObject_GetBuffer(prefix, &view, PyBUF_ANY_CONTIGUOUS)
    try:
        zmq_msg_close(msg)
        if zmq_msg_init_size(msg, <size_t>view.len) < 0:
            raise zmq_error_for(zmq_errno())
        if view.len:
            memcpy(zmq_msg_data(msg), view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


# Socket types that can receive / send at all; a direction is relayed only when its
# source can receive and its destination can send (a FORWARDER's PUB out-socket has
# nothing to read, a STREAMER's PUSH neither).
_CAN_RECV = frozenset({ZMQ_PAIR, ZMQ_SUB, ZMQ_REQ, ZMQ_REP, ZMQ_DEALER, ZMQ_ROUTER,
                       ZMQ_PULL, ZMQ_XPUB, ZMQ_XSUB, ZMQ_STREAM})
_CAN_SEND = frozenset({ZMQ_PAIR, ZMQ_PUB, ZMQ_REQ, ZMQ_REP, ZMQ_DEALER, ZMQ_ROUTER,
                       ZMQ_PUSH, ZMQ_XPUB, ZMQ_XSUB, ZMQ_STREAM})


cdef void loop_free(Loop *L) noexcept nogil:
    cdef int d
    for d in range(2):
        framebuf_free(&L.dirs[d].buf)
        zmq_msg_close(&L.dirs[d].prefix)
    framebuf_free(&L.ctrlbuf)
    framebuf_free(&L.termbuf)
    free(L.term_env)
    L.term_env = NULL
    zmq_msg_close(&L.scratch)


def proxy(in_socket, out_socket, mon_socket=None, ctrl_socket=None,
          in_prefix=b"in", out_prefix=b"out", *, signal_fd=-1, drain_timeout=1.0,
          drain_quiet=0.1, drain_on_signals=True, swap_ids=True):
    """Relay messages between two sockets until TERMINATE, a stop signal or ETERM.

    Both directions are relayed (a direction whose source cannot receive or whose
    destination cannot send, such as a FORWARDER's PUB side, is skipped). Each whole
    message is copied to `mon_socket` behind its direction's prefix frame, and ROUTER to
    ROUTER swaps the first two frames, as pyzmq's monitored_queue does; with
    `swap_ids=False` nothing is swapped, as in pyzmq's zmq.proxy (its plain devices).
    Multipart messages are never split or interleaved, on any socket.

    Rules where pyzmq's loop is silent or dies:
    - Backpressure: a direction whose destination is full (HWM of a blocking type) holds
      its current message and waits for POLLOUT, without spinning, while the other
      direction and the control socket are served.
    - Monitor: a PUB monitor never blocks (PUB drops at its HWM). A monitor that can
      block (DEALER, PUSH, PAIR) holds each direction's next copy until it has room,
      and so holds that direction; the control socket is still served. A socket that
      reports POLLOUT yet refuses the message (an XPUB monitor with XPUB_NODROP whose
      subscriber is at its HWM, a ROUTER_MANDATORY peer that is full) is retried every
      millisecond instead of polled, so a stall costs no CPU to speak of.
    - ROUTER_MANDATORY: a message its ROUTER cannot route (EHOSTUNREACH) is dropped and
      not counted as sent; it is still copied to the monitor. The loop goes on. Drops
      have no counter of their own: they are the messages received on one socket less
      those sent on the other, less the one message a direction may be holding.
    - Control (`ctrl_socket`, any type; a ROUTER's envelope is answered through): PAUSE
      (stop reading both sockets; a message already read is still delivered), RESUME,
      PING -> PONG, STATISTICS -> 8 native-endian uint64 frames (docs/protocol.md),
      TERMINATE -> drain, then OK and return. Anything else, multipart included, gets
      ERROR. A reply that cannot be queued at once (peer gone or not reading) is dropped.
      The control socket is served while draining too: PING and STATISTICS as usual,
      PAUSE and RESUME -> ERROR (draining reads the inputs whatever the pause state),
      and each TERMINATE, the second included, -> OK just before the loop returns. Every
      command read gets exactly one reply; commands still queued when the drain ends
      are read and answered (up to 1000 of them) before the OKs.
    - Drain (TERMINATE or a SIGTERM/SIGINT byte on `signal_fd`): stop when everything
      read has been sent and the inputs give EAGAIN. When both directions are relayed
      (a ROUTER/DEALER queue), the requests side (the in-socket, or the out-socket when
      it alone is a ROUTER) is read until it first gives EAGAIN, which takes in what was
      queued in the device at the stop, and no further: requests that come later stay
      unread (their clients time out and resend, to the next process), so the drain
      never forwards one whose reply it cannot wait for. The other side (the replies)
      is read until both have stayed idle for `drain_quiet` seconds (default 0.1), each
      message read starting that wait over, so that replies to every request forwarded
      get back. Never longer than `drain_timeout` seconds (None or inf: no limit; any
      size is fine, waits are clamped to what zmq_poll takes); what is still held then
      is dropped. A one-way device reads its input until it first gives EAGAIN. PAUSE
      does not hold a drain: it reads the inputs as above.
    - `signal_fd` (-1 or None: none) must be non-blocking, like the fd given to
      signal.set_wakeup_fd (its read end, typically); a blocking one is a ValueError.
      At end-of-file (its write end closed) the loop stops polling it and goes on; a
      read error other than EAGAIN (EBADF, say) is raised as OSError.
    - Fairness: each wake-up reads at most 1000 messages per data socket and 1000
      commands from the control socket, so no peer, a chatty control peer included,
      can starve the others.
    - `signal_fd` readable: read it out, run Python's signal handlers (raising what they
      raise), and, when `drain_on_signals` is true (the default, what a device process
      such as devmgr's child wants), drain and return on a SIGTERM or SIGINT byte. With
      `drain_on_signals=False` the handlers alone decide: one that raises ends the loop,
      one that returns lets it go on (what pyzmq's loops do in a foreground program).
      EINTR also runs the handlers, then the loop goes on.

    Returns None after TERMINATE or a stop signal, once drained.

    Raises:
        zmq.ContextTerminated: a socket's context was terminated (as pyzmq's loops).
        TypeError: a prefix is a str, or a socket is not a zmq socket.
        ValueError: nothing can be relayed between these socket types, a bad
            drain_timeout or drain_quiet, or a blocking signal_fd.
        OSError: signal_fd is not an open file descriptor, or reading it failed.
        zmq.ZMQError: ENOTSOCK for a closed socket (as pyzmq), or any other libzmq error.
    """
    cdef Loop L
    cdef int d
    cdef int in_type, out_type
    memset(&L, 0, sizeof(Loop))
    L.mon_owner = -1
    L.signal_fd = -1
    for d in range(2):
        zmq_msg_init(&L.dirs[d].prefix)
    zmq_msg_init(&L.scratch)
    try:
        init_prefix(&L.dirs[0].prefix, in_prefix, "in_prefix")
        init_prefix(&L.dirs[1].prefix, out_prefix, "out_prefix")
        L.ins = socket_handle(in_socket)
        L.outs = socket_handle(out_socket)
        if mon_socket is not None:
            L.mon = socket_handle(mon_socket)
        if ctrl_socket is not None:
            L.ctrl = socket_handle(ctrl_socket)
            L.ctrl_is_router = ctrl_socket.type == ZMQ_ROUTER
        L.signal_fd = -1 if signal_fd is None else int(signal_fd)
        if L.signal_fd >= 0 and os.get_blocking(L.signal_fd):
            # the loop reads it out until EAGAIN, without the GIL: a blocking fd would
            # hang the device (signal.set_wakeup_fd refuses one for the same reason)
            raise ValueError(
                f"signal_fd {L.signal_fd} must be non-blocking "
                "(os.set_blocking(fd, False), or sock.setblocking(False) for a socketpair)"
            )
        L.drain_on_signals = bool(drain_on_signals)
        L.drain_quiet = float(drain_quiet)
        if not L.drain_quiet >= 0:
            raise ValueError(f"drain_quiet must be >= 0, not {drain_quiet!r}")
        if drain_timeout is None:
            L.has_deadline = False
        else:
            L.drain_timeout = float(drain_timeout)
            if not L.drain_timeout >= 0:
                raise ValueError(f"drain_timeout must be >= 0 or None, not {drain_timeout!r}")
            L.has_deadline = True
            if L.drain_quiet > L.drain_timeout:
                L.drain_quiet = L.drain_timeout
        in_type = in_socket.type
        out_type = out_socket.type
        L.swap_ids = bool(swap_ids) and in_type == ZMQ_ROUTER and out_type == ZMQ_ROUTER

        L.items[SLOT_IN].socket = L.ins
        L.items[SLOT_OUT].socket = L.outs
        L.items[SLOT_MON].socket = L.mon
        L.items[SLOT_CTRL].socket = L.ctrl
        L.items[SLOT_SIGNAL].fd = L.signal_fd

        L.dirs[0].src, L.dirs[0].dst = L.ins, L.outs
        L.dirs[0].src_slot, L.dirs[0].dst_slot = SLOT_IN, SLOT_OUT
        L.dirs[0].stat_received, L.dirs[0].stat_sent = STAT_IN_RECEIVED, STAT_OUT_SENT
        L.dirs[0].enabled = in_type in _CAN_RECV and out_type in _CAN_SEND
        L.dirs[1].src, L.dirs[1].dst = L.outs, L.ins
        L.dirs[1].src_slot, L.dirs[1].dst_slot = SLOT_OUT, SLOT_IN
        L.dirs[1].stat_received, L.dirs[1].stat_sent = STAT_OUT_RECEIVED, STAT_IN_SENT
        # one socket for both sides (pyzmq's Device with out_type < 0): relay it to itself
        L.dirs[1].enabled = (L.ins != L.outs and out_type in _CAN_RECV
                             and in_type in _CAN_SEND)
        L.two_way = L.dirs[0].enabled and L.dirs[1].enabled
        if L.two_way:
            # clients meet a queue at its ROUTER, which is the in-socket by convention
            L.dirs[1 if out_type == ZMQ_ROUTER and in_type != ZMQ_ROUTER else 0].requests = True
        L.idle_since = -1.0
        if not (L.dirs[0].enabled or L.dirs[1].enabled):
            raise ValueError(
                f"nothing to relay between socket types {in_type} and {out_type}")
        for d in range(2):
            L.dirs[d].index = d
            if framebuf_init(&L.dirs[d].buf, 8) < 0:
                raise MemoryError()
        if framebuf_init(&L.ctrlbuf, 4) < 0 or framebuf_init(&L.termbuf, 4) < 0:
            raise MemoryError()
        with nogil:
            run_loop(&L)
    finally:
        loop_free(&L)
    return None

