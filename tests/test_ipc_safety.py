"""ipc binds replace nothing but a dead socket (issue 11 part 1).

libzmq unlinks whatever exists at an ipc path before binding it. These tests plant real
files, folders, symlinks and live sockets (of a second, SIGSTOPped process with a full
listen backlog) where a device or the manager binds, and check that they survive.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ctl_support import make_config, manager_process, private_env, streamer, write_config

import devmgr
from devmgr._config import parse_config

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _planted(ipc_dir: Path, kind: str) -> tuple[Path, Any]:
    """Put a `kind` thing at ipc_dir/victim; return its path and a check that it is intact."""
    path = ipc_dir / "victim"
    if kind == "file":
        path.write_text("precious")
        return path, lambda: path.read_text() == "precious" and not path.is_symlink()
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
        return path, lambda: (path / "inside").read_text() == "x"
    if kind == "symlink":
        target = ipc_dir / "target"
        target.write_text("precious")
        path.symlink_to(target)
        return path, lambda: path.is_symlink() and target.read_text() == "precious"
    if kind == "dangling symlink":
        path.symlink_to(ipc_dir / "nowhere")
        return path, lambda: path.is_symlink() and not (ipc_dir / "nowhere").exists()
    raise AssertionError(kind)


KINDS = ["file", "directory", "symlink", "dangling symlink"]


@pytest.mark.parametrize("kind", KINDS)
def test_add_refuses_to_bind_over_a_file(ipc_dir: Path, kind: str) -> None:
    path, intact = _planted(ipc_dir, kind)
    spec = {"name": "x", **streamer(ipc_dir, "x")}
    spec["out"] = {"type": "PUSH", "bind": [f"ipc://{path}"]}
    with devmgr.Manager(make_config(ipc_dir, {})) as manager:
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "conflict"
        assert f"ipc://{path}" in info.value.message
        assert intact(), f"the {kind} at {path} was replaced"
        assert manager.status()["devices"] == []
    assert intact()
    # the in-socket the device had bound before it met the file is gone with it
    assert not (ipc_dir / "x-in").exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_reload_refuses_to_bind_over_a_file(ipc_dir: Path, kind: str) -> None:
    path, intact = _planted(ipc_dir, kind)
    config_path = write_config(ipc_dir / "devmgr.toml", {}, make_settings(ipc_dir))
    with devmgr.Manager(config_path) as manager:
        bad = streamer(ipc_dir, "x")
        bad["in"] = {"type": "PULL", "bind": [f"ipc://{path}"]}
        write_config(config_path, {"x": bad}, make_settings(ipc_dir))
        with pytest.raises(devmgr.ControlError) as info:
            manager.reload()
        assert info.value.code == "conflict"
        assert f"ipc://{path}" in info.value.message
        assert intact()


def make_settings(ipc_dir: Path) -> dict[str, Any]:
    return {
        "control": f"ipc://{ipc_dir}/control",
        "events": f"ipc://{ipc_dir}/events",
        "health_interval": 0.2,
        "stop_timeout": 2.0,
    }


@pytest.mark.parametrize("which", ["control", "events"])
@pytest.mark.parametrize("kind", KINDS)
def test_start_refuses_a_control_or_events_path_that_is_a_file(
    ipc_dir: Path, kind: str, which: str
) -> None:
    path, intact = _planted(ipc_dir, kind)
    config = make_config(ipc_dir, {}, **{which: f"ipc://{path}"})
    manager = devmgr.Manager(config)
    with pytest.raises(devmgr.DevmgrError) as info:
        manager.start()
    assert f"manager.{which}" in str(info.value) and f"ipc://{path}" in str(info.value)
    assert intact()
    manager.stop()


def test_cli_start_refuses_a_control_path_that_is_a_file(ipc_dir: Path) -> None:
    path, intact = _planted(ipc_dir, "file")
    settings = {**make_settings(ipc_dir), "control": f"ipc://{path}"}
    config_path = write_config(ipc_dir / "devmgr.toml", {}, settings)
    result = subprocess.run(
        [sys.executable, "-m", "devmgr", "start", "-c", str(config_path)],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "manager.control" in result.stderr and "regular file" in result.stderr
    assert intact()


# ---- live sockets of another process ------------------------------------------------------


def _fill_backlog(path: Path) -> list[socket.socket]:
    """Connect to the (stopped) listener at `path` until its backlog refuses more."""
    clients: list[socket.socket] = []
    for _ in range(5000):  # libzmq listens with a backlog of 100
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        code = client.connect_ex(str(path))
        if code == errno.EAGAIN:
            client.close()
            return clients
        assert code == 0, os.strerror(code)
        clients.append(client)
    raise AssertionError("the backlog never filled")


class StoppedManager:
    """A second `devmgr start`, SIGSTOPped, with its control socket's backlog full."""

    def __init__(self, control: Path, proc: subprocess.Popen[bytes]) -> None:
        self.control = control
        self.proc = proc
        os.kill(proc.pid, signal.SIGSTOP)
        self.clients = _fill_backlog(control)

    def resume(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def stopped_manager(ipc_dir: Path) -> Iterator[StoppedManager]:
    other = ipc_dir / "other"
    other.mkdir(mode=0o700)
    config = write_config(other / "devmgr.toml", {}, make_settings(other))
    with manager_process(config, private_env(ipc_dir)) as proc:
        stopped = StoppedManager(other / "control", proc)
        try:
            yield stopped
        finally:
            stopped.resume()


def _answers(endpoint: str) -> bool:
    try:
        with devmgr.Client(endpoint, timeout=1) as client:
            return client.ping() == "pong"
    except devmgr.ManagerUnreachable:
        return False


def test_add_leaves_a_stopped_managers_control_socket(
    ipc_dir: Path, stopped_manager: StoppedManager
) -> None:
    control = stopped_manager.control
    before = control.lstat().st_ino
    spec: dict[str, Any] = {"name": "x", "kind": "streamer"}
    spec["in"] = {"type": "PULL", "bind": [f"ipc://{control}"]}
    spec["out"] = {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/x-out"]}
    with devmgr.Manager(make_config(ipc_dir, {})) as manager:
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "conflict"
        assert "in use" in info.value.message and f"ipc://{control}" in info.value.message
    assert control.lstat().st_ino == before
    stopped_manager.resume()
    wait_until(lambda: _answers(f"ipc://{control}"), timeout=10, what="the other manager")


def test_start_leaves_a_stopped_managers_control_socket(
    ipc_dir: Path, stopped_manager: StoppedManager
) -> None:
    control = stopped_manager.control
    before = control.lstat().st_ino
    manager = devmgr.Manager(make_config(ipc_dir, {}, control=f"ipc://{control}"))
    with pytest.raises(devmgr.DevmgrError, match="in use"):
        manager.start()
    manager.stop()
    assert control.lstat().st_ino == before
    stopped_manager.resume()
    # the other manager never lost its socket
    wait_until(lambda: _answers(f"ipc://{control}"), timeout=10, what="the other manager")


def test_a_dead_socket_is_reclaimed(ipc_dir: Path) -> None:
    # A process that died left its socket file behind: connect is refused, so it goes.
    code = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()"
    for name in ("control", "x-in"):
        subprocess.run([sys.executable, "-c", code, str(ipc_dir / name)], check=True, timeout=30)
        assert (ipc_dir / name).exists()
    with devmgr.Manager(make_config(ipc_dir, {"x": streamer(ipc_dir, "x")})) as manager:
        assert manager.status(["x"])["devices"][0]["state"] == "running"
        assert devmgr.Client(f"ipc://{ipc_dir}/control").ping() == "pong"
    assert not (ipc_dir / "control").exists() and not (ipc_dir / "x-in").exists()


def test_a_device_removes_only_its_own_socket_file(ipc_dir: Path) -> None:
    with devmgr.Manager(make_config(ipc_dir, {"x": streamer(ipc_dir, "x")})) as manager:
        (ipc_dir / "x-in").unlink()
        (ipc_dir / "x-in").write_text("someone else's now")
        manager.stop_device("x")
    assert (ipc_dir / "x-in").read_text() == "someone else's now"
    assert not (ipc_dir / "x-out").exists()


# ---- options a client must not set --------------------------------------------------------


@pytest.mark.parametrize("value", [0, 3, -1])
def test_use_fd_is_refused_at_validation(ipc_dir: Path, value: int) -> None:
    table = streamer(ipc_dir, "x")
    table["in"]["options"] = {"use_fd": value}
    with pytest.raises(devmgr.ConfigError) as info:
        parse_config({"manager": make_settings(ipc_dir), "devices": {"x": table}})
    assert "devices.x.in.options.use_fd" in str(info.value)


def test_use_fd_is_refused_by_add(ipc_dir: Path) -> None:
    spec: dict[str, Any] = {"name": "x", **streamer(ipc_dir, "x")}
    spec["in"]["options"] = {"use_fd": 0}
    with devmgr.Manager(make_config(ipc_dir, {})) as manager:
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "invalid_spec" and "use_fd" in info.value.message
        assert manager.status()["devices"] == []


# ---- [manager] ipc_bind_dirs --------------------------------------------------------------


def _restricted(ipc_dir: Path, devices: dict[str, Any]) -> devmgr.ManagerConfig:
    (ipc_dir / "allowed").mkdir(exist_ok=True)
    return make_config(ipc_dir, devices, ipc_bind_dirs=[str(ipc_dir / "allowed")])


def test_ipc_bind_dirs_refuses_binds_elsewhere_at_validation(ipc_dir: Path) -> None:
    inside = streamer(ipc_dir / "allowed", "ok")
    outside = streamer(ipc_dir / "allowed", "bad")
    outside["out"] = {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/elsewhere"]}
    wildcard = streamer(ipc_dir / "allowed", "wild")
    wildcard["in"] = {"type": "PULL", "bind": ["ipc://*"]}
    with pytest.raises(devmgr.ConfigError) as info:
        _restricted(ipc_dir, {"ok": inside, "bad": outside, "wild": wildcard})
    places = {p.where: p.message for p in info.value.problems}
    assert set(places) == {"devices.bad.out.bind[0]", "devices.wild.in.bind[0]"}, places
    assert "outside manager.ipc_bind_dirs" in places["devices.bad.out.bind[0]"]
    _restricted(ipc_dir, {"ok": inside})  # binds inside, and connects anywhere, are fine


def test_ipc_bind_dirs_refuses_an_add_elsewhere(ipc_dir: Path) -> None:
    with devmgr.Manager(_restricted(ipc_dir, {})) as manager:
        spec: dict[str, Any] = {"name": "x", **streamer(ipc_dir / "allowed", "x")}
        spec["in"] = {"type": "PULL", "bind": [f"ipc://{ipc_dir}/x-in"]}
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "invalid_spec"
        assert "devices.x.in.bind[0]" in info.value.message
        assert not (ipc_dir / "x-in").exists()
        good = {"name": "y", **streamer(ipc_dir / "allowed", "y")}
        assert manager.add(good)["state"] == "running"


def test_ipc_bind_dirs_is_checked_again_through_symlinks(ipc_dir: Path) -> None:
    (ipc_dir / "allowed").mkdir()
    (ipc_dir / "outside").mkdir()
    (ipc_dir / "allowed" / "link").symlink_to(ipc_dir / "outside")
    with devmgr.Manager(_restricted(ipc_dir, {})) as manager:
        spec = {"name": "x", **streamer(ipc_dir / "allowed" / "link", "x")}
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "invalid_spec"
        assert "outside manager.ipc_bind_dirs" in info.value.message
    assert list((ipc_dir / "outside").iterdir()) == []
