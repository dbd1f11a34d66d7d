"""tcp control needs CURVE on any address, or a loud opt-out (issue 11 part 2)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ctl_support import private_env, write_config

import devmgr
from devmgr._config import parse_config


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


LOOPBACKS = ["127.0.0.1", "127.0.0.2", "localhost"]  # [::1]: devmgr binds IPv4 only


def _settings(host: str, **extra: object) -> dict[str, object]:
    return {
        "control": f"tcp://{host}:{free_tcp_port()}",
        "events": f"tcp://127.0.0.1:{free_tcp_port()}",
        **extra,
    }


@pytest.mark.parametrize("host", LOOPBACKS)
def test_loopback_tcp_control_without_curve_is_refused(host: str) -> None:
    with pytest.raises(devmgr.ConfigError) as info:
        parse_config({"manager": _settings(host), "devices": {}})
    places = [p.where for p in info.value.problems]
    assert "manager.control" in places, places
    text = str(info.value)
    assert "every user of this machine" in text and "insecure_tcp_control" in text


def test_the_opt_out_admits_loopback_only() -> None:
    config = parse_config(
        {"manager": _settings("127.0.0.1", insecure_tcp_control=True), "devices": {}}
    )
    assert config.manager.insecure_tcp_control is True
    with pytest.raises(devmgr.ConfigError) as info:
        parse_config({"manager": _settings("0.0.0.0", insecure_tcp_control=True), "devices": {}})
    assert "[manager.curve]" in str(info.value)


def _validate(config: Path, runtime: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devmgr", "validate", "-c", str(config)],
        env=private_env(runtime),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_validate_refuses_and_warns(ipc_dir: Path) -> None:
    config = write_config(ipc_dir / "devmgr.toml", {}, _settings("127.0.0.1"))
    refused = _validate(config, ipc_dir)
    assert refused.returncode == 2
    assert "manager.control" in refused.stdout and "insecure_tcp_control" in refused.stdout

    write_config(config, {}, _settings("127.0.0.1", insecure_tcp_control=True))
    accepted = _validate(config, ipc_dir)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "warning: manager.insecure_tcp_control" in accepted.stderr
    assert "every local user" in accepted.stderr

    quiet = write_config(ipc_dir / "ipc.toml", {}, {"control": f"ipc://{ipc_dir}/control"})
    assert "warning" not in _validate(quiet, ipc_dir).stderr


def test_the_manager_logs_the_opt_out(ipc_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings("127.0.0.1", insecure_tcp_control=True)
    config = parse_config({"manager": settings, "devices": {}})
    caplog.set_level(logging.WARNING, logger="devmgr")
    with devmgr.Manager(config), devmgr.Client(str(settings["control"])) as client:
        assert client.ping() == "pong"
    assert any("insecure_tcp_control" in r.getMessage() for r in caplog.records)


def test_ipc_control_is_the_default_and_private(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))
    config = parse_config({"devices": {}})
    assert config.manager.control == f"ipc://{ipc_dir}/devmgr/control"
    with devmgr.Manager(config):
        assert (ipc_dir / "devmgr").stat().st_mode & 0o777 == 0o700
        assert (ipc_dir / "devmgr" / "control").stat().st_mode & 0o777 == 0o600
        assert (ipc_dir / "devmgr" / "events").stat().st_mode & 0o777 == 0o600
