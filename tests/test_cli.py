"""The `devmgr` client commands as subprocesses: output and exit statuses 0, 1, 2, 3."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from ctl_support import devmgr_command, monitored, private_env, streamer, to_toml, write_config

import devmgr
from devmgr._config import load_config

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[devmgr.Manager]:
    """An embedded manager with a streamer `a` and a monitored queue `q`."""
    devices = {"a": streamer(ipc_dir, "a"), "q": monitored(ipc_dir, "q")}
    path = write_config(ipc_dir / "devmgr.toml", devices)
    with devmgr.Manager(load_config(path)) as running:
        yield running


def run(
    ipc_dir: Path, *argv: str, timeout: float = 20, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `devmgr ARGV...` with the test's private runtime dir; capture its output."""
    return subprocess.run(
        [*devmgr_command(), *argv],
        env=private_env(ipc_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ctl(ipc_dir: Path) -> list[str]:
    return ["-e", f"ipc://{ipc_dir}/control"]


def test_status_table_and_json(ipc_dir: Path, manager: devmgr.Manager) -> None:
    done = run(ipc_dir, "status", *ctl(ipc_dir))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    for column in (
        "NAME",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "MSGS IN",
        "MSGS OUT",
        "CPU",
        "RSS",
        "LAST EXIT",
    ):
        assert column in header
    assert len(rows) == 2
    status = manager.status()
    for row, dev in zip(rows, status["devices"], strict=True):
        cells = row.split()
        assert cells[0] == dev["name"] and cells[1] == "running" and cells[2] == str(dev["pid"])
    # columns line up: each row's state starts where the header's STATE does
    assert all(row.index("running") == header.index("STATE") for row in rows)

    done = run(ipc_dir, "status", "--json", "q", *ctl(ipc_dir))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["manager"]["pid"] == os.getpid()
    assert [d["name"] for d in result["devices"]] == ["q"]

    # the endpoint found through -c (relative to nothing: the file names it absolutely)
    done = run(ipc_dir, "status", "-c", str(ipc_dir / "devmgr.toml"))
    assert done.returncode == 0 and "running" in done.stdout
    # ... through $DEVMGR_ENDPOINT, and through ./devmgr.toml in the working folder
    done = run(ipc_dir, "ping", DEVMGR_ENDPOINT=f"ipc://{ipc_dir}/control")
    assert (done.returncode, done.stdout) == (0, "pong\n")
    done = subprocess.run(
        [*devmgr_command(), "ping"],
        env=private_env(ipc_dir),
        cwd=ipc_dir,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "pong\n"), done.stderr


def test_device_commands(ipc_dir: Path, manager: devmgr.Manager) -> None:
    def ok(*argv: str) -> str:
        done = run(ipc_dir, *argv, *ctl(ipc_dir))
        assert done.returncode == 0, (argv, done.stderr)
        return done.stdout

    assert ok("pause", "a") == "a: paused\n"
    assert ok("resume", "a") == "a: running\n"
    assert ok("stop", "a").startswith("a: stopped")
    assert ok("start", "a").startswith("a: running (pid ")
    out = ok("restart", "--all")
    assert sorted(line.split(":")[0] for line in out.splitlines()) == ["a", "q"]
    assert ok("stop", "--all").count("stopped") == 2
    assert ok("start", "a", "q").count("running") == 2
    stats = ok("stats", "a")
    assert "in_msgs_received" in stats and "out_bytes_sent" in stats
    assert set(json.loads(ok("stats", "a", "--json"))) == set(
        devmgr.Client(f"ipc://{ipc_dir}/control").stats("a")
    )
    assert ok("version") == f"devmgr {devmgr.__version__} (protocol 1)\n"
    assert ok("ping") == "pong\n"


def test_add_remove_reload_shutdown(ipc_dir: Path, manager: devmgr.Manager) -> None:
    extra = ipc_dir / "extra.toml"
    # relative ipc paths in FILE are relative to FILE's folder
    table = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": ["ipc://b-in"]},
        "out": {"type": "PUSH", "bind": ["ipc://b-out"]},
    }
    extra.write_text(to_toml({"devices.b": table}))
    done = run(ipc_dir, "add", str(extra), *ctl(ipc_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("b: added, running (pid ")
    (b,) = manager.status(["b"])["devices"]
    assert b["endpoints"]["in"]["bind"] == [f"ipc://{ipc_dir}/b-in"]

    # the same again: the manager refuses (exit 1, its error on stderr)
    done = run(ipc_dir, "add", str(extra), *ctl(ipc_dir))
    assert done.returncode == 1
    assert done.stderr.startswith("error: conflict: ")

    done = run(ipc_dir, "remove", "b", *ctl(ipc_dir))
    assert (done.returncode, done.stdout) == (0, "b: removed\n")

    done = run(ipc_dir, "reload", *ctl(ipc_dir))
    assert done.returncode == 0, done.stderr
    assert "unchanged: a, q" in done.stdout

    done = run(ipc_dir, "shutdown", *ctl(ipc_dir))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not manager.running, what="the manager to stop")


def test_exit_1_on_error_replies(ipc_dir: Path, manager: devmgr.Manager) -> None:
    for argv in (
        ["status", "nope"],
        ["pause", "nope"],
        ["stop", "a", "nope"],
        ["stats", "nope"],
        ["remove", "nope"],
        ["start", "nope"],
    ):
        done = run(ipc_dir, *argv, *ctl(ipc_dir))
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        assert done.stderr.startswith("error: unknown_device: "), done.stderr
        assert "Traceback" not in done.stderr


def test_exit_2_on_usage_and_bad_config(ipc_dir: Path) -> None:
    bad = ipc_dir / "bad.toml"
    bad.write_text("[devices.x]\nkind = 'bogus'\n")
    broken = ipc_dir / "broken.toml"
    broken.write_text("[manager\n")
    for argv in (
        ["stop"],  # neither names nor --all
        ["restart", "a", "--all"],
        ["start", "--all"],  # start has no --all
        ["frobnicate"],
        ["status", "--timeout", "0"],
        ["status", "-c", str(ipc_dir / "missing.toml")],
        ["status", "-c", str(broken)],
        ["add", str(bad)],
        ["add", str(ipc_dir / "missing.toml")],
        ["status", "--curve-client", str(bad)],  # the other half of the pair is missing
        [],
    ):
        done = run(ipc_dir, *argv)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
    done = run(ipc_dir, "add", str(bad))
    assert "devices.x.kind" in done.stderr


def test_exit_3_when_no_manager_answers(ipc_dir: Path) -> None:
    for argv in (["status"], ["ping"], ["stop", "--all"], ["tap", "q"], ["events"]):
        started = time.monotonic()
        done = run(ipc_dir, *argv, "-e", f"ipc://{ipc_dir}/nobody", "--timeout", "0.3")
        assert done.returncode == 3, (argv, done.stderr)
        assert "nothing listens" in done.stderr
        assert time.monotonic() - started < 5
    # a CURVE manager without CURVE options: also no answer, with the reason
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, zmq.curve_keypair()[1])
    sock.bind(f"ipc://{ipc_dir}/curvy")
    try:
        done = run(ipc_dir, "ping", "-e", f"ipc://{ipc_dir}/curvy", "--timeout", "0.5")
        assert done.returncode == 3
        assert "CURVE" in done.stderr
    finally:
        sock.close()
        ctx.term()


def _stream(
    ipc_dir: Path, argv: list[str], poke: Any, expected: int, timeout: float = 15
) -> list[str]:
    """Run a streaming command (tap, events) until it has printed `expected` lines.

    `poke()` makes something happen; it is called until the command has printed enough,
    as a subscriber only sees what happens after its subscription reached the publisher.
    """
    proc = subprocess.Popen(
        [*devmgr_command(), *argv, "--count", str(expected)],
        env=private_env(ipc_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert banner, f"no banner from {argv}"
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"{argv} did not print {expected} lines"
            poke()
            try:
                proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        return out.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tap_prints_what_passes(ipc_dir: Path, manager: devmgr.Manager) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    front = ctx.socket(zmq.DEALER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
    front.connect(f"ipc://{ipc_dir}/q-in")
    back.connect(f"ipc://{ipc_dir}/q-out")

    def poke() -> None:
        front.send_multipart([b"hello world", b"\x00\xffbin"])
        if back.poll(50):
            back.recv_multipart()

    try:
        lines = _stream(ipc_dir, ["tap", "q", *ctl(ipc_dir)], poke, 3)
        assert len(lines) == 3
        for line in lines:
            # in-prefix, the ROUTER's identity frame (binary: hex), then the two frames
            direction, rest = line.split(maxsplit=1)
            assert direction == "in"
            frames = rest.split(" | ")
            assert frames[0].startswith("0x") and frames[1:] == ["hello world", "0x00ff62696e"]
        lines = _stream(ipc_dir, ["tap", "q", "--json", *ctl(ipc_dir)], poke, 1)
        entry = json.loads(lines[0])
        assert entry["direction"] == "in"
        assert entry["frames"][1:] == ["hello world", "0x00ff62696e"]
        assert entry["hex"][1:] == [b"hello world".hex(), "00ff62696e"]
    finally:
        front.close()
        back.close()
        ctx.term()
    # a device without a monitor socket cannot be tapped
    done = run(ipc_dir, "tap", "a", *ctl(ipc_dir))
    assert done.returncode == 2 and "no monitor" in done.stderr


def test_events_prints_lifecycle(ipc_dir: Path, manager: devmgr.Manager) -> None:
    client = devmgr.Client(f"ipc://{ipc_dir}/control", timeout=10)
    try:
        lines = _stream(ipc_dir, ["events", *ctl(ipc_dir)], lambda: client.restart("a"), 4)
        assert len(lines) == 4
        topics = [line.split()[1] for line in lines]
        assert all(t.startswith("device.") for t in topics), lines
        assert all(line.split()[2] == "a" for line in lines)
        running = next(line for line in lines if " device.running " in line)
        assert "pid=" in running
        lines = _stream(
            ipc_dir, ["events", "--json", *ctl(ipc_dir)], lambda: client.restart("a"), 2
        )
        for line in lines:
            event = json.loads(line)
            assert event["event"].startswith("device.") and event["device"] == "a"
            assert isinstance(event["at"], float)
    finally:
        client.close()


def test_keygen(ipc_dir: Path) -> None:
    folder = ipc_dir / "keys"
    done = run(ipc_dir, "keygen", str(folder), "--name", "manager")
    assert done.returncode == 0, done.stderr
    public, secret = folder / "manager.key", folder / "manager.key_secret"
    assert public.exists() and secret.exists()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    import zmq.auth

    pub_key, sec_key = zmq.auth.load_certificate(str(secret))
    assert zmq.auth.load_certificate(str(public)) == (pub_key, None) and sec_key
    done = run(ipc_dir, "keygen", str(folder), "--name", "manager")
    assert done.returncode == 2 and "exists" in done.stderr
    assert zmq.auth.load_certificate(str(secret)) == (pub_key, sec_key)  # not overwritten
