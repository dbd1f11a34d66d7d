"""Start device children through multiprocessing's forkserver, without re-running __main__.

The stdlib's forkserver Popen sends each child "preparation data" naming the parent's
__main__ module, and the child imports it again (as __mp_main__) before running its
target: for `devmgr start` that is the console script, for an application embedding a
Manager it is the application's own main module, with its side effects and import cost.
A device child needs neither: its target lives in the preloaded devmgr._child. So this
Popen sends the preparation data without the main-module keys; the rest of `_launch` is
the stdlib's own (CPython 3.11-3.13, Lib/multiprocessing/popen_forkserver.py).
"""

from __future__ import annotations

import io
import os
from multiprocessing import context, forkserver, popen_forkserver, reduction, spawn, util
from typing import Any

_MAIN_KEYS = frozenset({"init_main_from_name", "init_main_from_path", "main_path"})


class _Popen(popen_forkserver.Popen):
    def _launch(self, process_obj: Any) -> None:
        prep_data = {
            k: v
            for k, v in spawn.get_preparation_data(process_obj._name).items()
            if k not in _MAIN_KEYS
        }
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]  # stdlib private, untyped
        # the stdlib keeps a duplicate of the write end as the parent's sentinel
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(
            self,
            util.close_fds,  # type: ignore[attr-defined]  # stdlib private, untyped
            (parent_w, self.sentinel),
        )
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class DeviceProcess(context.ForkServerProcess):
    """A forkserver child that does not import the parent's __main__."""

    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)


def helper_pids() -> list[int]:
    """Return the PIDs of this process's forkserver and resource tracker that run now."""
    from multiprocessing import resource_tracker

    server: Any = forkserver._forkserver  # stdlib private
    tracker: Any = resource_tracker._resource_tracker
    pids = (getattr(server, "_forkserver_pid", None), getattr(tracker, "_pid", None))
    return [pid for pid in pids if pid]


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` for our child `pid` to exit and reap it; False if it still runs."""
    import select
    import time

    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return True  # reaped elsewhere, or not ours
            if done:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd >= 0:
                select.select([pidfd], [], [], left)  # readable once it has exited
            else:  # pragma: no cover - kernels before 5.3
                time.sleep(min(left, 0.01))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def stop_helpers(pids: list[int], timeout: float = 2.0) -> None:
    """Stop the forkserver and resource tracker among `pids`, and reap them.

    Both exit once every holder of their "alive" pipe has closed it: the manager closes
    its end here (device children dropped theirs at start). Waited for within `timeout`
    each, then SIGKILLed, so `devmgr start` never exits while a process it started runs.
    """
    import signal
    from multiprocessing import resource_tracker

    server: Any = forkserver._forkserver  # stdlib private
    tracker: Any = resource_tracker._resource_tracker
    owners: tuple[tuple[Any, str, str], ...] = (
        (server, "_forkserver_alive_fd", "_forkserver_pid"),
        (tracker, "_fd", "_pid"),
    )
    # The forkserver first: it holds the tracker's pipe too.
    for owner, fd_attr, pid_attr in owners:
        with owner._lock:
            pid = getattr(owner, pid_attr, None)
            if not pid or pid not in pids:
                continue
            fd = getattr(owner, fd_attr, None)
            if fd is not None:
                os.close(fd)
                setattr(owner, fd_attr, None)
            if not _wait_exit(pid, timeout):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_exit(pid, timeout)
            setattr(owner, pid_attr, None)
            if owner is server:
                address = getattr(server, "_forkserver_address", None)
                if address and not address.startswith("\0"):
                    try:
                        os.unlink(address)
                    except OSError:
                        pass
                server._forkserver_address = None
