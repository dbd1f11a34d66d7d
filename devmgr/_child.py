"""The body of one device child process: build the sockets of a plan, report, run the loop.

Runs in a process forked by the manager's zygote (devmgr._zygote), which preloads this
module so a start costs a fork rather than an interpreter start-up. It imports no pydantic: the
manager hands over a `DevicePlan` of plain values.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import json
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

import zmq

from devmgr import _core
from devmgr._paths import IpcPathTaken, bind_outside, safe_bind, unlink_if_ours
from devmgr._proctitle import set_process_title

# Exit status of a child whose sockets could not be set up (sysexits' EX_CONFIG).
EXIT_START_FAILED = 78
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SocketPlan:
    """One socket as the child builds it: type, options in order, endpoints."""

    zmq_type: int
    options: tuple[tuple[int, int | bytes], ...] = ()
    bind: tuple[str, ...] = ()
    connect: tuple[str, ...] = ()


@dataclass(frozen=True)
class DevicePlan:
    """What a child needs to run one device; built by the manager from a DeviceSpec."""

    name: str
    in_: SocketPlan
    out: SocketPlan
    mon: SocketPlan | None = None
    in_prefix: bytes = b"in"
    out_prefix: bytes = b"out"
    drain_timeout: float = 1.0
    drain_quiet: float = 0.1
    linger_ms: int = 1000
    kind: str = "monitored_queue"
    ipc_bind_dirs: tuple[str, ...] | None = None  # [manager] ipc_bind_dirs, when set


def _die_with_parent(expected_parent: int) -> None:
    """Ask the kernel for SIGKILL when our parent dies, then check it has not already.

    The parent is the manager's zygote, which exits as soon as the manager's end of its
    socket closes, however the manager died. SIGKILL rather than SIGTERM: a manager that
    died cannot have asked for a drain, a new one must be able to bind our endpoints at
    once, and SIGKILL ends even a wedged or SIGSTOPped device.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if expected_parent and os.getppid() != expected_parent:
        os._exit(0)  # the parent died between fork and prctl: nobody supervises us


def name_process(plan: DevicePlan) -> None:
    """Show this child as `devmgr: NAME (kind)` in ps; its comm name is `devmgr: NAME`.

    The comm name (top, pgrep) holds 15 bytes: the device's name matters more there.
    """
    set_process_title(f"devmgr: {plan.name} ({plan.kind})", comm=f"devmgr: {plan.name}")


def _build(
    ctx: zmq.Context[zmq.Socket[bytes]],
    side: str,
    plan: SocketPlan,
    bound: list[tuple[str, tuple[int, int] | None]],
    ipc_bind_dirs: tuple[str, ...] | None = None,
) -> zmq.Socket[bytes]:
    """Make one socket of the plan; the ipc files it binds are added to `bound`."""
    sock = ctx.socket(plan.zmq_type)
    mine: list[tuple[str, tuple[int, int] | None]] = []
    where = f"{side}.options"
    try:
        for opt, value in plan.options:
            sock.setsockopt(opt, value)
        if plan.zmq_type == zmq.SUB and not any(o == zmq.SUBSCRIBE for o, _ in plan.options):
            sock.setsockopt(zmq.SUBSCRIBE, b"")  # a SUB device input forwards everything
        for endpoint in plan.bind:
            where = f"{side}.bind {endpoint}"
            file = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
            if ipc_bind_dirs is not None and file and not file.startswith(("@", "*")):
                outside = bind_outside(file, ipc_bind_dirs)
                if outside is not None:
                    raise PermissionError(errno_mod.EACCES, outside)
            # libzmq would unlink whatever is at an ipc path: a file, another's socket
            ipc_file = safe_bind(sock, endpoint)
            if ipc_file is not None:
                mine.append(ipc_file)
        for endpoint in plan.connect:
            where = f"{side}.connect {endpoint}"
            sock.connect(endpoint)
    except (zmq.ZMQError, OSError, TypeError, ValueError, OverflowError) as exc:
        sock.close(linger=0)
        for path, file_id in mine:
            unlink_if_ours(path, file_id)
        if isinstance(exc, IpcPathTaken):
            raise _StartFailure(where, exc.errno, exc.strerror or str(exc)) from exc
        if isinstance(exc, zmq.ZMQError):
            raise _StartFailure(where, exc.errno, exc.strerror) from exc
        if isinstance(exc, OSError):
            raise _StartFailure(where, exc.errno, exc.strerror or str(exc)) from exc
        # a bad option value at run time
        raise _StartFailure(where, errno_mod.EINVAL, str(exc)) from exc
    bound.extend(mine)
    return sock


class _StartFailure(Exception):
    def __init__(self, where: str, errno: int | None, message: str) -> None:
        self.where = where
        self.errno = errno
        self.endpoint = where.split(" ", 1)[1] if " " in where else None
        super().__init__(f"{where}: {message}")


def main(plan: DevicePlan, ctrl_endpoint: str, ident: bytes, expected_parent: int) -> None:
    """Run one device until TERMINATE, SIGTERM or the manager's death; exit 0 when drained."""
    _die_with_parent(expected_parent)
    name_process(plan)
    # Before any socket exists: every child forked from the zygote would otherwise
    # hand its first ROUTER peer the same routing id as the last incarnation did, and a
    # reply a worker still holds for the old process's client would reach a new one.
    _core.seed_routing_ids()
    # Ctrl-C and a terminal's hang-up reach the whole process group; the manager decides
    # and drains us through the control socket, so the device ignores SIGINT and SIGHUP.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A signal may land on one of libzmq's I/O threads and never interrupt zmq_poll in
    # this one, so the loop watches Python's wakeup fd instead; the handler is a no-op
    # that only keeps SIGTERM from killing us before the loop has drained.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    # The manager serves every device's control channel on one ROUTER; our routing id
    # tells it which device (and which incarnation) speaks.
    ctrl = ctx.socket(zmq.DEALER)
    ctrl.setsockopt(zmq.ROUTING_ID, ident)
    ctrl.setsockopt(zmq.LINGER, 1000)
    ctrl.connect(ctrl_endpoint)
    sockets: list[zmq.Socket[bytes]] = []
    bound: list[tuple[str, tuple[int, int] | None]] = []  # ipc files to remove at the end
    status = 0
    try:
        try:
            ins = _build(ctx, "in", plan.in_, bound, plan.ipc_bind_dirs)
            sockets.append(ins)
            outs = _build(ctx, "out", plan.out, bound, plan.ipc_bind_dirs)
            sockets.append(outs)
            mons = (
                _build(ctx, "mon", plan.mon, bound, plan.ipc_bind_dirs)
                if plan.mon is not None
                else None
            )
            if mons is not None:
                sockets.append(mons)
        except _StartFailure as failure:
            report = {
                "where": failure.where,
                "endpoint": failure.endpoint,
                "errno": failure.errno,
                "errname": errno_mod.errorcode.get(failure.errno or 0, ""),
                "message": str(failure),
            }
            ctrl.send_multipart([b"FAILED", json.dumps(report).encode()])
            status = EXIT_START_FAILED
            return
        ctrl.send(b"READY")
        _core.proxy(
            ins,
            outs,
            mons,
            ctrl,
            plan.in_prefix,
            plan.out_prefix,
            signal_fd=wake_r.fileno(),
            drain_timeout=plan.drain_timeout,
            drain_quiet=plan.drain_quiet,
        )
    except BaseException:
        # the manager logs our stderr: a traceback here is the device's own last words
        traceback.print_exc(file=sys.stderr)
        status = 1
    finally:
        # Linger lets what the loop already handed to libzmq reach the peers.
        for sock in sockets:
            sock.close(linger=plan.linger_ms)
        # A FAILED report is the manager's only word on why: under load the connection
        # may not be up yet after 200 ms, and a lost report reads as a bare exit 78.
        ctrl.close(linger=2000 if status == EXIT_START_FAILED else 200)
        ctx.term()
        # With ZMQ_USE_FD libzmq leaves the files to us; only still-ours ones go.
        for path, file_id in bound:
            unlink_if_ours(path, file_id)
        wake_r.close()
        wake_w.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
