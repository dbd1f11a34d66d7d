"""`devmgr status` over several managers (issue 15): real `devmgr start` managers, each on
ipc endpoints in a folder of its own, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from ctl_support import devmgr_command, manager_process, private_env, streamer, write_config

from devmgr import Client


@pytest.fixture
def managers(ipc_dir: Path) -> Iterator[list[str]]:
    """Two running managers: m0 with device a0, m1 with a0 (autostart) and b1 (not)."""
    endpoints = []
    with ExitStack() as stack:
        for i in range(2):
            folder = ipc_dir / f"m{i}"
            folder.mkdir()
            devices = {f"a{i}": streamer(folder, f"a{i}")}
            if i == 1:
                devices["b1"] = streamer(folder, "b1", autostart=False)
            config = write_config(folder / "devmgr.toml", devices)
            stack.enter_context(manager_process(config, private_env(folder)))
            endpoints.append(f"ipc://{folder}/control")
        yield endpoints


def status(
    ipc_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*devmgr_command(), "status", *args],
        env=env or private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_one_table_with_a_manager_column(ipc_dir: Path, managers: list[str]) -> None:
    nobody = f"ipc://{ipc_dir}/nobody"
    done = status(ipc_dir, "-e", managers[0], "-e", nobody, "-e", managers[1], "--timeout", "30")
    assert done.returncode == 0, done.stderr  # some answered: not 3
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["MANAGER", "NAME", "STATE"]
    cells = [row.split() for row in rows]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        (managers[0], "a0", "running"),
        (nobody, "-", "unreachable"),
        (managers[1], "a1", "running"),
        (managers[1], "b1", "stopped"),
    ]
    assert "nothing listens there" in rows[1]
    assert f"{nobody}: unreachable" in done.stderr


def test_json_one_entry_per_manager(ipc_dir: Path, managers: list[str]) -> None:
    nobody = f"ipc://{ipc_dir}/nobody"
    done = status(ipc_dir, "-e", managers[0], "-e", managers[1], "-e", nobody, "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    assert [e["manager"] for e in entries] == [*managers, nobody]
    assert [e["ok"] for e in entries] == [True, True, False]
    assert [d["name"] for d in entries[1]["status"]["devices"]] == ["a1", "b1"]
    assert entries[2]["error"]["code"] == "unreachable"
    with Client(managers[0]) as client:
        assert entries[0]["status"]["manager"]["pid"] == client.status()["manager"]["pid"]


def test_env_endpoints_names_and_exit_statuses(ipc_dir: Path, managers: list[str]) -> None:
    env = private_env(ipc_dir, DEVMGR_ENDPOINT=",".join(managers))
    done = status(ipc_dir, env=env)
    assert done.returncode == 0, done.stderr
    assert {row.split()[0] for row in done.stdout.splitlines()[1:]} == set(managers)
    # a named device that is not running: 4, as for one manager
    done = status(ipc_dir, "-e", managers[1], "-e", managers[0], "b1")
    # m0 has no b1 (an error row), m1's b1 is stopped: 4
    assert done.returncode == 4, done.stderr
    assert "b1 (stopped)" in done.stderr
    assert "unknown_device" in done.stdout
    # no manager answers: 3, a row for each
    nobody = [f"ipc://{ipc_dir}/nobody{i}" for i in range(3)]
    started = time.monotonic()
    done = status(ipc_dir, *(a for e in nobody for a in ("-e", e)), "--timeout", "30")
    assert done.returncode == 3
    assert time.monotonic() - started < 20  # asked at once, and told at once
    assert [row.split()[2] for row in done.stdout.splitlines()[1:]] == ["unreachable"] * 3
    # one endpoint keeps the usual table (no MANAGER column)
    done = status(ipc_dir, "-e", managers[0])
    assert done.returncode == 0 and done.stdout.split()[0] == "NAME"


def test_asked_concurrently(ipc_dir: Path, managers: list[str]) -> None:
    """Frozen managers each cost the timeout once, not once each: they are asked at once."""
    import signal

    import psutil

    frozen = []
    for i in range(3):
        folder = ipc_dir / f"f{i}"
        folder.mkdir()
        frozen.append(folder)
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                manager_process(write_config(f / "devmgr.toml", {}), private_env(f))
            )
            for f in frozen
        ]
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            for proc in procs:
                from conftest import wait_until

                wait_until(
                    lambda p=proc: psutil.Process(p.pid).status() == psutil.STATUS_STOPPED,
                    what="the manager to stop",
                )
            started = time.monotonic()
            endpoints = [managers[0], *(f"ipc://{f}/control" for f in frozen)]
            done = status(ipc_dir, *(a for e in endpoints for a in ("-e", e)), "--timeout", "2")
            elapsed = time.monotonic() - started
        finally:
            for proc in procs:
                os.kill(proc.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    states = [row.split()[2] for row in done.stdout.splitlines()[1:]]
    assert states == ["running", "unreachable", "unreachable", "unreachable"]
    assert elapsed < 3 * 2  # one of each 2 s wait at a time would be 6 s
