"""Issue 11, part 5: no request or file can stall supervision or swell the manager's memory.

Each test runs a real `devmgr start` process (or the real CLI) and bounds the time it
waits: a manager that hangs on a FIFO, or stalls its loop on a huge request, fails the
test by missing a deadline instead of hanging it.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest
from ctl_support import devmgr_command, manager_process, private_env, streamer, write_config

import devmgr
from devmgr._files import MAX_CONFIG_BYTES


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _limit_memory() -> None:
    # today's code reads /dev/zero until MemoryError: keep that from eating the machine
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _cli(ipc_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*devmgr_command(), *args],
        env=private_env(ipc_dir),
        check=False,
        capture_output=True,
        text=True,
        timeout=20,  # a FIFO used to block `validate` and `start` for ever
        preexec_fn=_limit_memory,
    )


def _odd_file(ipc_dir: Path, kind: str) -> Path:
    if kind == "fifo":
        path = ipc_dir / "devmgr.toml"
        os.mkfifo(path)
        return path
    if kind == "dev-zero":
        return Path("/dev/zero")
    if kind == "folder":
        return ipc_dir
    path = ipc_dir / "devmgr.toml"  # a sparse file one byte over the limit
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    return path


REASONS = {
    "fifo": "a FIFO (named pipe), not a regular file",
    "dev-zero": "a character device, not a regular file",
    "folder": "a folder, not a regular file",
    "too-big": f"{MAX_CONFIG_BYTES + 1} bytes; devmgr reads files of at most 8 MiB",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("command", ["validate", "start", "add", "ping"])
def test_config_that_is_not_a_regular_file_is_refused_at_once(
    ipc_dir: Path, kind: str, command: str
) -> None:
    path = _odd_file(ipc_dir, kind)
    args = [command, str(path)] if command == "add" else [command, "-c", str(path)]
    result = _cli(ipc_dir, *args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    out = result.stdout + result.stderr
    assert f"{path}: {REASONS[kind]}" in out, out
    assert "Traceback" not in out and "MemoryError" not in out, out


def test_reload_of_a_config_that_became_a_fifo_answers_and_supervision_goes_on(
    ipc_dir: Path,
) -> None:
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with manager_process(config, private_env(ipc_dir)):
        config.unlink()
        os.mkfifo(config)
        with devmgr.Client(f"ipc://{ipc_dir}/control", timeout=5.0) as client:
            with pytest.raises(devmgr.ControlError) as caught:
                client.reload()  # used to freeze the manager's loop in open()
            assert caught.value.code == "invalid_spec"
            assert "a FIFO (named pipe), not a regular file" in caught.value.message
            assert client.ping() == "pong"
            assert [d["name"] for d in client.status()["devices"]] == ["a"]
