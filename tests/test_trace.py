"""Every operation leaves a trace: events for pause, resume, add, remove and reload, log lines.

A real `devmgr start` subprocess, a real SUB socket on its events endpoint, the CLI run as a
user runs it, and the manager's own stderr read back.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
from ctl_support import devmgr_command, private_env, streamer, to_toml, write_config

from devmgr import Client, ControlError, ManagerUnreachable
from devmgr._manager import _log_event
from devmgr._protocol import Event, ReloadResult

from conftest import wait_until


@contextmanager
def running_manager(
    config: Path, env: dict[str, str], control: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`devmgr start -c CONFIG --log-level info`, its stderr in `log`, until the block ends."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*devmgr_command(), "start", "-c", str(config), "--log-level", "info"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        with Client(control, timeout=0.5) as client:

            def answers() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return client.ping() == "pong"
                except ManagerUnreachable:
                    return False

            wait_until(answers, timeout=20, what="the manager to answer ping")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Subscriber:
    """A SUB socket on the manager's events endpoint, decoding each event."""

    def __init__(self, endpoint: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.sock.poll(timeout * 1000), "no event in time"
        topic, payload = self.sock.recv_multipart()
        event = json.loads(payload)
        assert event["event"] == topic.decode()
        Event.model_validate(event)  # the documented schema
        return dict(event)

    def until(self, topic: str, device: str | None = None) -> list[dict[str, Any]]:
        """Events up to and including the first `topic` (of `device`); all of them."""
        seen = []
        while True:
            event = self.next()
            seen.append(event)
            if event["event"] == topic and (device is None or event.get("device") == device):
                return seen

    def sync(self, client: Client, device: str) -> int:
        """Pause and resume `device` until seen (the subscription is live); return how
        many times it took (each pause is logged)."""
        deadline = time.monotonic() + 10
        rounds = 0
        while True:
            assert time.monotonic() < deadline, "the subscription never reached the manager"
            client.pause(device)
            client.resume(device)
            rounds += 1
            if self.sock.poll(100):
                self.until("device.resumed", device)
                return rounds


def cli(ipc_dir: Path, *argv: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [*devmgr_command(), *argv],
        env=env or private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_operations_publish_events_and_log_lines(ipc_dir: Path) -> None:
    config = write_config(
        ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a"), "q": streamer(ipc_dir, "q")}
    )
    control, log = f"ipc://{ipc_dir}/control", ipc_dir / "manager.log"
    ctl = ["-e", control]
    sub = Subscriber(f"ipc://{ipc_dir}/events")
    try:
        with (
            running_manager(config, private_env(ipc_dir), control, log) as proc,
            Client(control, timeout=10) as client,
        ):
            wait_until(
                lambda: all(d["state"] == "running" for d in client.status()["devices"]),
                timeout=20,
                what="both devices running",
            )
            # from here on, every event is the doing of this test
            sync_rounds = sub.sync(client, "a")

            done = cli(ipc_dir, "pause", "a", *ctl)
            assert done.returncode == 0, done.stderr
            paused = sub.next()
            pid_a = client.status("a")["devices"][0]["pid"]
            assert (paused["event"], paused["device"], paused["pid"]) == (
                "device.paused",
                "a",
                pid_a,
            )
            # pausing what is paused changes nothing, and says nothing
            assert cli(ipc_dir, "pause", "a", *ctl).returncode == 0
            assert cli(ipc_dir, "resume", "a", *ctl).returncode == 0
            resumed = sub.next()
            assert (resumed["event"], resumed["device"]) == ("device.resumed", "a")

            extra = ipc_dir / "extra.toml"
            extra.write_text(to_toml({"devices.b": streamer(ipc_dir, "b")}))
            done = cli(ipc_dir, "add", str(extra), *ctl)
            assert done.returncode == 0, done.stderr
            seen = sub.until("device.added", "b")
            assert [e["event"] for e in seen] == [
                "device.starting",
                "device.running",
                "device.added",
            ]
            added = seen[-1]
            pid_b = seen[1]["pid"]
            assert (added["kind"], added["by"], added["pid"]) == ("streamer", "add", pid_b)

            done = cli(ipc_dir, "remove", "b", *ctl)
            assert done.returncode == 0, done.stderr
            seen = sub.until("device.removed", "b")
            assert [e["event"] for e in seen] == [
                "device.exited",
                "device.stopped",
                "device.removed",
            ]
            assert seen[-1]["by"] == "remove"

            # a refused add (its endpoint is a's) leaves no device.added behind
            clash = ipc_dir / "clash.toml"
            clash.write_text(
                to_toml(
                    {"devices.c": streamer(ipc_dir, "c", **{"in": streamer(ipc_dir, "a")["in"]})}
                )
            )
            assert cli(ipc_dir, "add", str(clash), *ctl).returncode == 1

            # reload: drop q, change a, add n
            write_config(
                config,
                {
                    "a": streamer(ipc_dir, "a", restart={"backoff_max": 5.0}),
                    "n": streamer(ipc_dir, "n", autostart=False),
                },
            )
            done = cli(ipc_dir, "reload", "-c", str(config), *ctl)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == f"reloaded {config}"
            seen = sub.until("manager.reloaded")
            reloaded = seen[-1]
            assert reloaded["config"] == str(config)
            assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
                ["n"],
                ["q"],
                ["a"],
            )
            assert reloaded.get("error") is None
            by_topic = {(e["event"], e.get("device")): e for e in seen}
            assert by_topic[("device.removed", "q")]["by"] == "reload"
            assert by_topic[("device.added", "n")]["by"] == "reload"
            assert by_topic[("device.added", "n")]["kind"] == "streamer"
            assert ("device.added", "a") not in by_topic  # changed is not added
            assert ("device.removed", "a") not in by_topic

            # the reload answer names the file it re-read
            assert ReloadResult.model_validate(client.reload()).config == str(config)
            sub.until("manager.reloaded")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    finally:
        sub.close()

    lines = log.read_text().splitlines()
    started = next(line for line in lines if "manager.started" in line)
    assert f"config={config}" in started
    assert f"control={control}" in started and f"events=ipc://{ipc_dir}/events" in started
    for needle in (
        f"INFO device.paused a pid={pid_a}",
        f"INFO device.resumed a pid={pid_a}",
        f"INFO device.added b pid={pid_b} kind=streamer by=add",
        "INFO device.removed b by=remove",
        "INFO add c refused: conflict: ",
        "INFO device.removed q by=reload",
        "INFO device.added n kind=streamer by=reload",
        f"INFO manager.reloaded config={config} added=n removed=q changed=a",
        f"INFO manager.reloaded config={config} added=- removed=- changed=-",
    ):
        assert any(needle in line for line in lines), (needle, lines)
    paused_lines = [line for line in lines if "device.paused" in line]
    assert len(paused_lines) == sync_rounds + 1, paused_lines  # the sync's, then the test's


def test_reload_of_another_file_says_so(ipc_dir: Path) -> None:
    # Neither file names its control socket: both resolve to the default endpoint, so
    # `reload -c other.toml` reaches the manager that runs mine.toml.
    mine = ipc_dir / "mine.toml"
    mine.write_text(to_toml({"devices.a": streamer(ipc_dir, "a")}))
    other = ipc_dir / "other.toml"
    other.write_text(to_toml({"devices.z": streamer(ipc_dir, "z")}))
    env = private_env(ipc_dir)
    control = f"ipc://{ipc_dir}/devmgr/control"
    with running_manager(mine, env, control, ipc_dir / "manager.log"):
        done = cli(ipc_dir, "reload", "-c", str(other), env=env)
        assert done.returncode == 1, done.stdout
        assert f"conflict: this manager runs {mine}, not {other}" in done.stderr
        assert done.stdout == ""
        with Client(control, timeout=10) as client:
            assert [d["name"] for d in client.status()["devices"]] == ["a"]  # untouched
            with pytest.raises(ControlError) as info:
                client.reload(other)
            assert info.value.code == "conflict"

        # $DEVMGR_CONFIG names a file just as -c does
        done = cli(ipc_dir, "reload", env={**env, "DEVMGR_CONFIG": str(other)})
        assert done.returncode == 1 and "not " + str(other) in done.stderr

        # the same file under another name (relative, through a symlink) is the same file
        (ipc_dir / "link.toml").symlink_to(mine)
        done = subprocess.run(
            [*devmgr_command(), "reload", "-c", "link.toml"],
            env=env,
            cwd=ipc_dir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == f"reloaded {mine}"


def test_the_start_up_line_names_the_embedded_default(caplog: pytest.LogCaptureFixture) -> None:
    # (a real manager on the embedded default would bind its fixed tcp ports)
    event = {
        "event": "manager.started",
        "at": 1.0,
        "pid": 7,
        "config": None,
        "control": "ipc:///run/devmgr/control",
        "events": "ipc:///run/devmgr/events",
    }
    with caplog.at_level(logging.INFO, logger="devmgr"):
        _log_event(event)
    assert caplog.messages == [
        "manager.started pid=7 config=(embedded default) "
        "control=ipc:///run/devmgr/control events=ipc:///run/devmgr/events"
    ]
