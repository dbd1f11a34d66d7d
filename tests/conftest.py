"""Shared test support: deadline waits, short ipc paths, and a no-leftover-children check."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

T = TypeVar("T")

# Subprocesses such as `python -m devmgr` must import the installed package, not the
# source folder they happen to start in (which has no compiled core after `pip install .`).
os.environ["PYTHONSAFEPATH"] = "1"


def process_gone(pid: int) -> bool:
    """True once `pid` has exited: no such process, or a zombie (dead, not yet reaped).

    A device orphaned by a SIGKILLed manager is reaped by PID 1, which on some machines
    does so seconds after it died; psutil.pid_exists counts it until then.
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(
    predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """Call `predicate` until it returns a truthy value or stops raising AssertionError.

    Re-raises the last AssertionError (or fails naming `what`) when `timeout` runs out, so
    a failing wait says what it was waiting for instead of sleeping blindly.
    """
    deadline = time.monotonic() + timeout
    last_error: AssertionError | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except AssertionError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            if last_error is not None:
                raise last_error
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short private folder for ipc:// endpoints (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# multiprocessing's own helpers, started by the process device classes' "forkserver"
# start method, as their command lines name them
_MP_HELPERS = ("from multiprocessing.forkserver import", "from multiprocessing.resource_tracker")


def _helper_pids() -> set[int]:
    """PIDs of the long-lived helpers, which are not leftovers: devmgr's zygote and
    multiprocessing's forkserver and resource tracker."""
    from devmgr._zygote import ZYGOTE

    pids = {ZYGOTE.pid} if ZYGOTE.pid else set()
    for child in psutil.Process(os.getpid()).children(recursive=False):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(helper in cmdline for helper in _MP_HELPERS):
            pids.add(child.pid)
    return pids


def _leftovers() -> list[psutil.Process]:
    helpers = _helper_pids()
    out = []
    for child in psutil.Process(os.getpid()).children(recursive=False):
        if child.pid in helpers:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                child.wait(0)  # reap: ours, and already dead
                continue
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            continue
        out.append(child)
    # grandchildren forked by the zygote (or multiprocessing's forkserver) on our behalf
    for helper in helpers:
        try:
            out.extend(psutil.Process(helper).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a child process behind (after a short grace period)."""
    yield
    try:
        wait_until(lambda: not _leftovers(), timeout=5.0, interval=0.02)
    except AssertionError:
        left = _leftovers()
        for proc in left:  # end only what this test started, by PID
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"test left processes behind: {[(p.pid, p.name()) for p in left]}")
