"""The per-user runtime folder cannot be planted, and survives `rm -rf` (issue 11 part 3)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from ctl_support import devmgr_command, manager_process, private_env, streamer, write_config

import devmgr
from devmgr._client import control_endpoint_of
from devmgr._config import parse_config

from conftest import wait_until

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$XDG_RUNTIME_DIR for this test; devmgr's folder is runtime/devmgr."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))
    return ipc_dir


def _default_config() -> devmgr.ManagerConfig:
    return parse_config({"manager": {"health_interval": 0.1, "stop_timeout": 2.0}, "devices": {}})


# ---- the manager side ---------------------------------------------------------------------


def test_a_planted_symlink_is_refused_not_followed(runtime: Path) -> None:
    target = runtime / "public_html"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    (runtime / "devmgr").symlink_to(target)
    manager = devmgr.Manager(_default_config())
    with pytest.raises(PermissionError, match="symbolic link"):
        manager.start()
    manager.stop()
    assert target.stat().st_mode & 0o777 == 0o755  # not chmodded to 0700
    assert list(target.iterdir()) == []  # and no sockets put there


def test_a_planted_symlink_to_a_file_is_refused(runtime: Path) -> None:
    (runtime / "victim").write_text("precious")
    (runtime / "devmgr").symlink_to(runtime / "victim")
    with pytest.raises(PermissionError, match="symbolic link"):
        devmgr.Manager(_default_config()).start()
    assert (runtime / "victim").read_text() == "precious"


@needs_root
def test_someone_elses_folder_is_refused(runtime: Path) -> None:
    folder = runtime / "devmgr"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match=f"belongs to uid {NOBODY}"):
        devmgr.Manager(_default_config()).start()
    assert folder.stat().st_uid == NOBODY and list(folder.iterdir()) == []


def test_an_open_folder_of_ours_is_made_private(runtime: Path) -> None:
    folder = runtime / "devmgr"
    folder.mkdir()
    folder.chmod(0o777)
    with devmgr.Manager(_default_config()):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_folders_for_a_custom_control_path_are_private_under_umask_000(ipc_dir: Path) -> None:
    control = ipc_dir / "a" / "b" / "control"
    config = write_config(
        ipc_dir / "devmgr.toml",
        {},
        {"control": f"ipc://{control}", "events": f"ipc://{control.parent}/events"},
    )
    code = (
        "import os, sys, devmgr; os.umask(0); m = devmgr.Manager(sys.argv[1]); m.start(); "
        "print(oct(os.stat(sys.argv[2]).st_mode & 0o777), oct(os.stat(sys.argv[3]).st_mode "
        "& 0o777)); m.stop()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config), str(ipc_dir / "a"), str(ipc_dir / "a" / "b")],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0o700", "0o700"]


# ---- the client side ----------------------------------------------------------------------


def _ping(runtime: Path) -> subprocess.CompletedProcess[str]:
    env = private_env(runtime)
    env.pop("DEVMGR_ENDPOINT", None)
    return subprocess.run(
        [sys.executable, "-m", "devmgr", "ping", "--timeout", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=runtime,  # no ./devmgr.toml there
    )


@contextmanager
def _fake_manager(config: Path, runtime: Path) -> Iterator[None]:
    """Run `devmgr start -c config` (its own runtime dir) until its control socket listens."""
    control = Path(str(control_endpoint_of(config))[len("ipc://") :])
    proc = subprocess.Popen(
        [*devmgr_command(), "start", "-c", str(config)],
        env=private_env(runtime / "other"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listens() -> bool:
        assert proc.poll() is None, "the fake manager exited"
        with socket.socket(socket.AF_UNIX) as probe:
            return probe.connect_ex(str(control)) == 0

    try:
        wait_until(listens, timeout=20, what="the fake manager to listen")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fake_manager_in(runtime: Path, folder_mode: int, owner: int | None) -> Path:
    """Make runtime/devmgr (mode, owner) and a config for a manager whose control is there."""
    folder = runtime / "devmgr"
    folder.mkdir()
    folder.chmod(folder_mode)
    if owner is not None:
        os.chown(folder, owner, owner)
    other = runtime / "other"
    other.mkdir(mode=0o700)
    settings = {"control": f"ipc://{folder}/control", "events": f"ipc://{other}/events"}
    return write_config(other / "fake.toml", {}, settings)


@needs_root
def test_the_cli_refuses_a_squatted_runtime_folder(runtime: Path) -> None:
    # someone else made /tmp/devmgr-$UID and runs a "manager" in it
    config = _fake_manager_in(runtime, 0o755, NOBODY)
    with _fake_manager(config, runtime):
        result = _ping(runtime)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "refusing to talk to" in result.stderr and f"uid {NOBODY}" in result.stderr
        assert "pong" not in result.stdout
        for endpoint in (None, f"ipc://{runtime}/devmgr/control"):  # default or named
            with pytest.raises(devmgr.ManagerUnreachable, match="refusing"):
                devmgr.Client(endpoint, timeout=2).ping()


def test_the_client_refuses_a_runtime_folder_others_may_enter(runtime: Path) -> None:
    config = _fake_manager_in(runtime, 0o777, None)
    with _fake_manager(config, runtime):
        result = _ping(runtime)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "open to other users" in result.stderr
        with pytest.raises(devmgr.ManagerUnreachable, match="open to other users"):
            devmgr.Client(timeout=2).ping()


def test_the_client_trusts_its_own_private_folder(runtime: Path) -> None:
    with devmgr.Manager(_default_config()):
        assert devmgr.Client(timeout=5).ping() == "pong"
        assert _ping(runtime).returncode == 0


# ---- rm -rf of the runtime folder ---------------------------------------------------------


def test_supervision_survives_rm_rf_of_the_runtime_folder(runtime: Path) -> None:
    devices = {"a": streamer(runtime / "data", "a")}
    (runtime / "data").mkdir()
    config = parse_config(
        {
            "manager": {"health_interval": 0.1, "stop_timeout": 2.0},
            "devices": devices,
        }
    )
    with devmgr.Manager(config) as manager:
        (before,) = manager.status()["devices"]
        assert before["state"] == "running"
        shutil.rmtree(runtime / "devmgr")
        os.kill(before["pid"], signal.SIGKILL)

        def restarted() -> bool:
            (dev,) = manager.status()["devices"]
            assert dev["state"] == "running", dev
            return bool(dev["pid"] != before["pid"])

        wait_until(restarted, timeout=15, what="the killed device to run again")
        assert psutil.pid_exists(manager.status()["devices"][0]["pid"])
        # the manager's own sockets are back (at its next beat), in a private folder
        control = runtime / "devmgr" / "control"
        wait_until(control.exists, timeout=10, what="the control socket to be bound again")
        assert (runtime / "devmgr").stat().st_mode & 0o777 == 0o700
        assert control.stat().st_mode & 0o777 == 0o600

        def answers() -> bool:
            try:
                return devmgr.Client(timeout=2).ping() == "pong"
            except devmgr.ManagerUnreachable:
                return False

        wait_until(answers, timeout=10, what="the default control socket to answer")
    assert not (runtime / "devmgr" / "control").exists()


def test_the_cli_says_the_runtime_folder_is_missing(runtime: Path) -> None:
    result = _ping(runtime)
    assert result.returncode == 3
    assert f"{runtime}/devmgr is missing too" in result.stderr


def test_cli_manager_survives_rm_rf(runtime: Path) -> None:
    (runtime / "data").mkdir()
    config = write_config(
        runtime / "data" / "devmgr.toml",
        {"a": streamer(runtime / "data", "a")},
        {"health_interval": 0.1, "stop_timeout": 2.0},
    )
    with manager_process(config, private_env(runtime)):
        shutil.rmtree(runtime / "devmgr")
        wait_until(lambda: _ping(runtime).returncode == 0, timeout=15, what="devmgr ping")

        def running() -> bool:
            status = devmgr.Client(timeout=5).status()
            assert [d["state"] for d in status["devices"]] == ["running"]
            return True

        wait_until(running, timeout=15, what="the device to run")
