"""devmgr's own fork server (the "zygote"): device children forked from a preloaded process.

A fresh interpreter costs ~110 ms and plain fork() of the manager (threads, a zmq context)
is unsafe, so device processes are forked by a small single-threaded helper that has
devmgr._child, pyzmq and the Cython core imported already: a start costs one fork.

One zygote serves every manager of a process. It is started lazily with
`subprocess.Popen` (`python -c`, so no __main__ of the parent is ever imported) and is
given the parent's sys.path. The manager talks to it over a SOCK_SEQPACKET socket pair:

- A spawn request is one message: the pickled arguments of `devmgr._child.main`, with
  file descriptors attached (SCM_RIGHTS): a per-child status socket, then optionally the
  fd the child gets as its stderr.
- The zygote forks and writes the child's pid (8 bytes, signed) on the status socket;
  when it reaps the child it writes the exit code (as `Popen.returncode`: negative for a
  signal) and closes the socket. The manager's end is the child's sentinel: readable when
  the child ended, at EOF without a code when the zygote itself died.
- EOF on the request socket (the manager process is gone, however it died) makes the
  zygote SIGKILL and reap its remaining children and exit. Each child also asks for
  PR_SET_PDEATHSIG (devmgr._child), so a SIGKILLed zygote takes its children along.
- The zygote ignores SIGINT, SIGTERM and SIGHUP: a terminal's Ctrl-C or a service
  manager's SIGTERM to the whole group must let the manager drain its devices first.
"""

from __future__ import annotations

import atexit
import errno
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from typing import Any

_INT = struct.Struct("<q")
# The manager's to act on; the zygote ignores them.
_IGNORED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_REQUEST_MAX = 256 * 1024
_MAX_FDS = 2
# Waits of the manager's loop thread on the zygote: its start-up (an interpreter and the
# imports), then each fork.
_READY_TIMEOUT = 30.0
_REPLY_TIMEOUT = 10.0
# The interpreter's only code: take the parent's sys.path, then serve.
_BOOT = (
    "import pickle, socket, sys; s = socket.socket(fileno=int(sys.argv[1])); "
    "sys.path[:] = pickle.loads(s.recv(1 << 20)); "
    "from devmgr._zygote import serve; serve(s)"
)


class ZygoteError(OSError):
    """The zygote could not be started or did not answer."""


# ---- the manager's side --------------------------------------------------------------


class Child:
    """One device process as the manager sees it: pid, sentinel, exit code, signals."""

    def __init__(self, pid: int, status: socket.socket) -> None:
        self.pid = pid
        self._status: socket.socket | None = status
        self.sentinel = status.fileno()
        self.exitcode: int | None = None
        #: True when the zygote died before reporting this child's exit (the child then
        #: died of its PR_SET_PDEATHSIG SIGKILL, which is what exitcode says).
        self.lost = False
        self._pidfd: int | None = None
        try:  # signals through a pidfd cannot reach a recycled pid
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone; its exit code is on the way
            self._pidfd = -1
        except (AttributeError, OSError):  # pragma: no cover - kernel < 5.3
            self._pidfd = None

    def poll(self) -> int | None:
        """Return the exit code once the zygote reported it (never blocks)."""
        if self.exitcode is not None or self._status is None:
            return self.exitcode
        try:
            data = self._status.recv(_INT.size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if len(data) == _INT.size:
            (self.exitcode,) = _INT.unpack(data)
        else:
            self.exitcode = -signal.SIGKILL
            self.lost = True
        return self.exitcode

    def send_signal(self, signum: int) -> None:
        """Signal the child unless it is known to be gone."""
        if self.exitcode is not None or self._pidfd == -1:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            else:  # pragma: no cover - kernel < 5.3
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None
        if self._pidfd is not None and self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1  # no more signals


class Zygote:
    """The process-wide zygote: started on first use, replaced when it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._atexit = False

    @property
    def pid(self) -> int | None:
        """The pid of the running zygote, if one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def ensure_running(self) -> int:
        """Start the zygote unless it runs (one waitpid(WNOHANG) then); return its pid."""
        with self._lock:
            return self._ensure_running()

    def _ensure_running(self) -> int:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        self._close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A terminal's hang-up or Ctrl-C, or a SIGTERM to the whole group, must not kill
        # it (every device would die with it) even before serve() ignores them: it
        # starts with them blocked, a mask kept through fork and exec.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            theirs.close()
        self._proc, self._sock = proc, ours
        if not self._atexit:
            atexit.register(self.shutdown)
            self._atexit = True
        try:
            ours.sendall(pickle.dumps(sys.path))
            ours.settimeout(_READY_TIMEOUT)
            ready = ours.recv(16)
        except OSError as exc:
            self._kill_started()
            raise ZygoteError(f"the device zygote did not start: {exc}") from exc
        if ready != b"READY":
            self._kill_started()
            raise ZygoteError(
                f"the device zygote exited at start-up (exit code {proc.returncode});"
                " its stderr above says why"
            )
        ours.settimeout(_REPLY_TIMEOUT)
        return proc.pid

    def spawn(self, args: tuple[Any, ...], stderr_fd: int | None = None) -> Child:
        """Fork a child that runs `devmgr._child.main(*args, zygote_pid)`.

        A zygote found dead on the way (it may die between our check and our request)
        is replaced once; the request is then sent again.
        """
        payload = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > _REQUEST_MAX:
            raise ZygoteError(f"the device's plan is too large ({len(payload)} bytes)")
        for attempt in (1, 2):
            status, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds = [theirs.fileno()] + ([stderr_fd] if stderr_fd is not None else [])
            try:
                with self._lock:
                    self._ensure_running()
                    assert self._sock is not None
                    socket.send_fds(self._sock, [payload], fds)
            except ZygoteError:
                status.close()
                raise
            except OSError as exc:  # the zygote is gone: replace it, then try again
                status.close()
                self._reap_dead()
                if attempt == 2:
                    raise ZygoteError(f"the device zygote is gone: {exc}") from exc
                continue
            finally:
                theirs.close()
            try:
                status.settimeout(_REPLY_TIMEOUT)
                data = status.recv(_INT.size, socket.MSG_WAITALL)
            except OSError as exc:
                status.close()
                self._kill_wedged()
                raise ZygoteError(f"the device zygote did not answer: {exc}") from exc
            if len(data) != _INT.size:  # it died with our request
                status.close()
                self._reap_dead()
                if attempt == 2:
                    raise ZygoteError("the device zygote exited before forking")
                continue
            (pid,) = _INT.unpack(data)
            if pid <= 0:
                status.close()
                raise ZygoteError(-pid, f"fork failed: {os.strerror(-pid)}")
            status.setblocking(False)
            return Child(pid, status)
        raise AssertionError("unreachable")  # pragma: no cover

    def _reap_dead(self) -> None:
        """Wait (briefly) for a zygote whose socket broke, so the next use replaces it."""
        with self._lock:
            if self._proc is not None:
                try:
                    self._proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()

    def _kill_wedged(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()

    def _kill_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.poll()  # reap a dead one
            self._proc = None

    def forget(self) -> None:
        """Drop our handle on the zygote without stopping it (in a forked child)."""
        if self._sock is not None:
            self._sock.close()
        self._lock = threading.Lock()
        self._proc = self._sock = None

    def shutdown(self, timeout: float = 2.0) -> None:
        """Close the zygote (it SIGKILLs what it still runs) and wait for it to exit."""
        with self._lock:
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


ZYGOTE = Zygote()


# A process forked from the manager's (an application's own worker) must not hold the
# zygote's socket: the zygote, and so its devices, would outlive the manager.
os.register_at_fork(after_in_child=ZYGOTE.forget)


# ---- the zygote's side ---------------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """Run the zygote: fork a device child per request until the manager's end closes."""
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED)  # blocked since the start
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    from devmgr import _child  # the preload: what makes a start cost one fork
    from devmgr._proctitle import set_process_title

    set_process_title("devmgr: zygote")
    sock.setblocking(True)
    sock.send(b"READY")
    children: dict[int, socket.socket] = {}  # pid -> its status socket
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if wake_r in ready:
                _drain(wake_r)
                _reap(children)
            if sock.fileno() in ready:
                try:
                    msg, fds, flags, _ = socket.recv_fds(sock, _REQUEST_MAX, _MAX_FDS)
                except OSError:
                    break
                if not msg and not fds:
                    break  # EOF: the manager is gone
                if fds:
                    own = [sock.fileno(), wake_r, wake_w]
                    _fork_one(_child.main, msg, fds, flags, children=children, own=own)
    finally:
        _kill_all(children)
        os._exit(0)


def _fork_one(
    target: Any,
    msg: bytes,
    fds: list[int],
    flags: int,
    *,
    children: dict[int, socket.socket],
    own: list[int],
) -> None:
    """Fork the child one request asks for; answer its pid (or -errno) on its status socket."""
    status = socket.socket(fileno=fds[0])
    stderr_fd = fds[1] if len(fds) > 1 else None
    me = os.getpid()
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("truncated request")
        args = pickle.loads(msg)
        pid = os.fork()
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        _send(status, -(getattr(exc, "errno", None) or errno.EINVAL))
        pid = -1
    if pid == 0:
        close = own + [status.fileno()] + [s.fileno() for s in children.values()]
        _in_child(target, args, me, stderr_fd, close)
    if stderr_fd is not None:
        os.close(stderr_fd)
    if pid < 0:
        status.close()
        return
    _send(status, pid)
    children[pid] = status  # reaped (and reported) once SIGCHLD wakes us


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            return


def _in_child(
    target: Any, args: tuple[Any, ...], zygote: int, stderr_fd: int | None, close: list[int]
) -> None:
    """The forked child: shed the zygote's state, then become the device. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        if stderr_fd is not None:
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
        target(*args, zygote)
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    os._exit(0)


def _send(status: socket.socket, value: int) -> None:
    try:
        status.send(_INT.pack(value))
    except OSError:
        pass  # the manager gave up on this child


def _reap(children: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = children.pop(pid, None)
        if status is not None:
            _send(status, os.waitstatus_to_exitcode(wstatus))
            status.close()


def _kill_all(children: dict[int, socket.socket]) -> None:
    """SIGKILL and reap every child still running (the manager is gone)."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid, status in children.items():
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        status.close()
    children.clear()
