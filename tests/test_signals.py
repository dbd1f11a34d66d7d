"""Signals to `devmgr start` (issue 11 part 4, issue 13 items 3 and 10), on real processes.

Each test runs `python -m devmgr start` as a subprocess and signals it the way an
operator, a terminal or a stray `kill` does: SIGHUP reloads, stray signals are ignored,
SIGTERM (once or as a storm) drains and exits 0, and when it exits nothing it started
is still running.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from reliability.support import (
    ManagerProc,
    alive,
    descendants,
    device_children,
    endpoints,
    manager_settings,
    pipeline_device,
    write_config,
)

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _config(root: Path, names: list[str]) -> dict[str, Any]:
    return {
        "manager": manager_settings(root),
        "devices": {n: pipeline_device(endpoints(root, n)) for n in names},
    }


def _start(root: Path, names: list[str], **kwargs: Any) -> tuple[ManagerProc, Path]:
    config = _config(root, names)
    path = write_config(root / "sig.toml", config)
    return ManagerProc(path, control=config["manager"]["control"], **kwargs), path


def _pids(mgr: ManagerProc) -> dict[str, int]:
    return {name: dev["pid"] for name, dev in mgr.devices().items()}


def test_stray_signals_are_logged_and_ignored(ipc_dir: Path) -> None:
    """SIGUSR1, SIGUSR2 and other signals whose default is to terminate (no drain, socket
    files left behind) leave the manager and its devices as they were."""
    mgr, _ = _start(ipc_dir, ["a", "b"])
    stray = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPROF, signal.SIGIO]
    with mgr:
        before = {n: d["pid"] for n, d in mgr.wait_running(2).items()}
        for sig in stray:
            mgr.proc.send_signal(sig)  # type: ignore[union-attr]
        wait_until(
            lambda: all(f"{s.name} ignored" in mgr.log() for s in stray),
            timeout=10,
            what="a log line per ignored signal",
        )
        assert mgr.proc.poll() is None, mgr.log()[-2000:]  # type: ignore[union-attr]
        assert _pids(mgr) == before
        assert mgr.terminate(timeout=10) == 0
    assert not (ipc_dir / "control").exists() and not (ipc_dir / "events").exists()


def test_sighup_reloads_the_config_file(ipc_dir: Path) -> None:
    """SIGHUP re-reads the file as `devmgr reload` does (only what changed is touched) and
    logs the outcome; an invalid file is logged and the running config stays."""
    mgr, path = _start(ipc_dir, ["keep", "gone"])
    with mgr:
        before = {n: d["pid"] for n, d in mgr.wait_running(2).items()}
        write_config(path, _config(ipc_dir, ["keep", "new"]))
        mgr.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

        def reloaded() -> dict[str, Any]:
            # the file is read off the loop: a status may come before the reload is applied
            running = mgr.wait_running(2)
            assert set(running) == {"keep", "new"}
            return running

        after = wait_until(reloaded, timeout=10, what="the reloaded devices")
        assert after["keep"]["pid"] == before["keep"]  # unchanged: not restarted
        wait_until(lambda: "SIGHUP: reloaded" in mgr.log(), timeout=10, what="the reload log")
        assert "added new" in mgr.log() and "removed gone" in mgr.log()

        path.write_text("[devices.bad]\nkind = 'no such kind'\n")
        mgr.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "SIGHUP: reload failed" in mgr.log(), timeout=10, what="the error")
        assert mgr.proc.poll() is None  # type: ignore[union-attr]
        assert {n: d["pid"] for n, d in mgr.wait_running(2).items()} == {
            n: d["pid"] for n, d in after.items()
        }
        assert mgr.terminate(timeout=10) == 0


def test_terminal_hangup_of_the_process_group_keeps_every_device(ipc_dir: Path) -> None:
    """Closing the terminal (or SSH session) sends SIGHUP to the whole process group:
    the manager reloads, and the zygote, whose death would take every device with
    it, outlives the hang-up, so the devices keep running and keep their PIDs."""
    mgr, _ = _start(ipc_dir, ["a", "b"], new_session=True)
    with mgr:
        before = {n: d["pid"] for n, d in mgr.wait_running(2).items()}
        helpers = {p.pid for p in psutil.Process(mgr.pid).children()}
        os.killpg(mgr.pid, signal.SIGHUP)
        wait_until(lambda: "SIGHUP: reloaded" in mgr.log(), timeout=10, what="the reload log")
        assert _pids(mgr) == before
        assert set(alive(helpers)) == helpers, mgr.log()[-2000:]
        assert all(d["last_exit"] is None for d in mgr.devices().values())
        assert mgr.terminate(timeout=10) == 0


def test_sigterm_storm_still_exits_0(ipc_dir: Path) -> None:
    """A SIGTERM repeated every 5 ms from the first one until the manager is gone drains
    once and ends in exit 0 (it ended in -15: a repeat killed the interpreter on its way
    out)."""
    mgr, _ = _start(ipc_dir, ["a", "b", "c"])
    with mgr:
        mgr.wait_running(3)
        proc = mgr.proc
        assert proc is not None
        sent, deadline = 0, time.monotonic() + 20.0
        while proc.poll() is None and sent < 4000 and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            sent += 1
            time.sleep(0.005)  # the storm's period, not a wait for a condition
        assert proc.wait(10) == 0, mgr.log()[-2000:]
        assert sent > 1
        assert mgr.log().count("SIGTERM: stopping") == 1


def test_nothing_it_started_outlives_devmgr_start(ipc_dir: Path) -> None:
    """After a bounded chaos run (15 SIGKILLs over 5 devices) and a SIGTERM, no process
    the manager started (device, zygote) is still running at the
    moment `devmgr start` has exited: every PID seen below it is checked right then."""
    names = [f"d{i}" for i in range(5)]
    mgr, _ = _start(ipc_dir, names)
    rng = random.Random(13)
    with mgr:
        mgr.wait_running(5)
        for _ in range(15):
            name = rng.choice(names)
            pid = wait_until(lambda n=name: mgr.devices()[n]["pid"], timeout=10, what="a pid")
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda n=name, p=pid: mgr.devices()[n]["pid"] != p, timeout=10, what="the exit"
            )
        mgr.wait_running(5)
        proc = mgr.proc
        assert proc is not None
        seen = {p.pid for p in descendants(mgr.pid)} | set(device_children(mgr.pid))
        assert len(seen) >= 6  # five devices, the zygote
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= {p.pid for p in descendants(mgr.pid)}  # any started during the stop
        code = proc.wait(5)
        left = alive(seen)  # at once: the moment of exit, not a second later
        assert left == [], [(p, psutil.Process(p).cmdline()) for p in left]
        assert code == 0


def _socket_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_socket())


def test_a_stopped_device_leaves_no_socket_files(ipc_dir: Path) -> None:
    """A device's ipc socket files go when it stops, however it stopped: drained, SIGKILLed
    with policy `never`, or SIGKILLed by the manager at `stop_timeout` because it hung
    (a dead socket is removed only once a connect to it is refused); and when the manager
    exits, no socket file of its own or of a device is left."""
    never = {"policy": "never"}
    config = {
        "manager": manager_settings(ipc_dir),
        "devices": {
            "killed": pipeline_device(endpoints(ipc_dir, "killed"), restart=never),
            "hung": pipeline_device(endpoints(ipc_dir, "hung")),
            "fine": pipeline_device(endpoints(ipc_dir, "fine")),
        },
    }
    path = write_config(ipc_dir / "files.toml", config)
    mgr = ManagerProc(path, control=config["manager"]["control"])
    suffixes = ("-in", "-out", "-mon")
    with mgr:
        devices = mgr.wait_running(3)
        every = {f"{n}{s}" for n in devices for s in suffixes} | {"control", "events"}
        assert set(_socket_files(ipc_dir)) == every
        os.kill(devices["killed"]["pid"], signal.SIGKILL)
        wait_until(lambda: mgr.devices()["killed"]["state"] == "stopped", timeout=10)
        os.kill(devices["hung"]["pid"], signal.SIGSTOP)
        with mgr.client(timeout=15) as client:
            client.stop("hung")  # drained in vain, SIGKILLed at stop_timeout
        assert mgr.devices()["hung"]["last_exit"]["signal"] == signal.SIGKILL
        left = set(_socket_files(ipc_dir))
        assert not {f for f in left if f.startswith(("killed-", "hung-"))}, left
        assert mgr.terminate(timeout=15) == 0
    assert _socket_files(ipc_dir) == []
