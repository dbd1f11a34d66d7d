"""Shared helpers of the control-plane tests: configs, a `devmgr start` subprocess, raw sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from conftest import wait_until


def devmgr_command() -> list[str]:
    """Return the argv prefix of the installed `devmgr` command (no pyenv shim in between)."""
    script = Path(sys.executable).parent / "devmgr"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "devmgr"]


def streamer(folder: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A streamer device table bound on ipc paths in `folder`."""
    table: dict[str, Any] = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{folder}/{name}-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{folder}/{name}-out"]},
    }
    table.update(extra)
    return table


def monitored(folder: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A monitored queue (ROUTER in, DEALER out, PUB monitor) bound on ipc paths."""
    table: dict[str, Any] = {
        "kind": "monitored_queue",
        "in": {"type": "ROUTER", "bind": [f"ipc://{folder}/{name}-in"]},
        "out": {"type": "DEALER", "bind": [f"ipc://{folder}/{name}-out"]},
        "mon": {"type": "PUB", "bind": [f"ipc://{folder}/{name}-mon"]},
    }
    table.update(extra)
    return table


def manager_settings(folder: Path, **extra: Any) -> dict[str, Any]:
    """Manager settings with control and events in `folder` and quick timings."""
    return {
        "control": f"ipc://{folder}/control",
        "events": f"ipc://{folder}/events",
        "health_interval": 0.2,
        "stop_timeout": 2.0,
        **extra,
    }


def make_config(folder: Path, devices: Mapping[str, Any], **manager: Any) -> Any:
    """Return a validated ManagerConfig."""
    from devmgr._config import parse_config

    return parse_config({"manager": manager_settings(folder, **manager), "devices": dict(devices)})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Write `{"manager": {...}, "devices.a": {...}}` as TOML tables of inline values."""
    out = []
    for header, table in tables.items():
        out.append(f"[{header}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


def write_config(
    path: Path, devices: Mapping[str, Any], manager: Mapping[str, Any] | None = None
) -> Path:
    """Write a config file with the given manager settings and device tables."""
    folder = path.parent
    tables: dict[str, Mapping[str, Any]] = {
        "manager": manager if manager is not None else manager_settings(folder)
    }
    tables.update({f"devices.{name}": table for name, table in devices.items()})
    path.write_text(to_toml(tables))
    return path


def private_env(runtime: Path, **extra: str) -> dict[str, str]:
    """The environment for devmgr subprocesses: a private runtime dir, no inherited config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMGR_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env.update(extra)
    return env


@contextmanager
def manager_process(config: Path, env: dict[str, str], timeout: float = 20.0) -> Iterator[Any]:
    """Run `devmgr start -c CONFIG` until the block ends; yield its Popen once it answers."""
    from devmgr import Client, ManagerUnreachable
    from devmgr._client import control_endpoint_of

    endpoint = control_endpoint_of(config)
    proc = subprocess.Popen(
        [*devmgr_command(), "start", "-c", str(config), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with Client(endpoint, timeout=0.5) as client:

            def answers() -> bool:
                assert proc.poll() is None, f"devmgr start exited: {proc.stderr.read()!r}"  # type: ignore[union-attr]
                try:
                    return client.ping() == "pong"
                except ManagerUnreachable:
                    return False

            wait_until(answers, timeout=timeout, what="the manager to answer ping")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


class RawClient:
    """A DEALER or REQ socket speaking the control protocol frame by frame."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, kind: int = zmq.DEALER) -> None:
        self.kind = kind
        self.sock: zmq.Socket[bytes] = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv_frames(self, timeout: float = 5.0) -> list[bytes]:
        assert self.sock.poll(timeout * 1000), "no reply in time"
        return self.sock.recv_multipart()

    def call_raw(self, frames: list[bytes], timeout: float = 5.0) -> dict[str, Any]:
        """Send frames, return the decoded reply (the single JSON frame)."""
        self.send_frames(frames)
        reply = self.recv_frames(timeout)
        assert len(reply) == 1, f"reply frames: {reply!r}"
        decoded = json.loads(reply[0])
        assert isinstance(decoded, dict)
        return decoded

    def call(self, cmd: str, args: Any = None, id: Any = 1, timeout: float = 5.0) -> dict[str, Any]:
        request: dict[str, Any] = {"v": 1, "id": id, "cmd": cmd}
        if args is not None:
            request["args"] = args
        return self.call_raw([json.dumps(request).encode()], timeout)
