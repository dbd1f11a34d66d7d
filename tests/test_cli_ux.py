"""The CLI as an operator meets it (issue 13): fast, honest answers when no manager is
there, long operations that never look like a dead manager, help, tap's exact frames."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ctl_support import (
    devmgr_command,
    manager_process,
    manager_settings,
    private_env,
    streamer,
    write_config,
)


def run(
    ipc_dir: Path, *argv: str, cwd: Path | None = None, timeout: float = 60, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `devmgr ARGV...` in the test's private runtime dir; return it and its duration."""
    started = time.monotonic()
    done = subprocess.run(
        [*devmgr_command(), *argv],
        env=private_env(ipc_dir, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done, time.monotonic() - started


# ---- 13.1: no manager -----------------------------------------------------------------

HINT = "find it with the same -c FILE"


@pytest.mark.parametrize(
    "source", ["-e", "$DEVMGR_ENDPOINT", "-c", "$DEVMGR_CONFIG", "./devmgr.toml", "default"]
)
def test_no_manager_is_said_at_once_with_how_the_endpoint_was_found(
    source: str, ipc_dir: Path
) -> None:
    work = ipc_dir / "work"
    work.mkdir()
    config = write_config(work / "devmgr.toml", {}, manager_settings(ipc_dir / "nowhere"))
    argv: list[str] = ["status", "--timeout", "30"]
    env: dict[str, str] = {}
    cwd = ipc_dir
    if source == "-e":
        argv += ["-e", f"ipc://{ipc_dir}/nobody"]
        expected = "endpoint: given with -e"
    elif source == "$DEVMGR_ENDPOINT":
        env["DEVMGR_ENDPOINT"] = f"ipc://{ipc_dir}/nobody"
        expected = "endpoint: $DEVMGR_ENDPOINT"
    elif source == "-c":
        argv += ["-c", str(config)]
        expected = f"endpoint: [manager] control of -c {config}"
    elif source == "$DEVMGR_CONFIG":
        env["DEVMGR_CONFIG"] = str(config)
        expected = f"endpoint: [manager] control of $DEVMGR_CONFIG ({config})"
    elif source == "./devmgr.toml":
        cwd = work
        expected = "endpoint: [manager] control of ./devmgr.toml"
    else:
        expected = "endpoint: the default, as none of -e, -c, $DEVMGR_ENDPOINT"
    done, elapsed = run(ipc_dir, *argv, cwd=cwd, **env)
    assert done.returncode == 3, done.stderr
    assert elapsed < 10, elapsed  # at once, not after the 30 s timeout
    assert "nothing listens there (no such socket file)" in done.stderr, done.stderr
    assert expected in done.stderr, done.stderr
    # the hint about -c, unless the user named the endpoint or the file already
    assert (HINT in done.stderr) == (source not in ("-e", "-c")), done.stderr


def test_stale_socket_at_once_and_a_stopped_manager_times_out(ipc_dir: Path) -> None:
    """A SIGKILLed manager's socket file: said at once. A manager that listens but does
    not answer (SIGSTOP): the timeout, and the message says something listens."""
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with manager_process(config, private_env(ipc_dir)) as proc:
        done, _ = run(ipc_dir, "ping", "-c", str(config))
        assert done.returncode == 0 and done.stdout.strip() == "pong", done.stderr
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            done, elapsed = run(ipc_dir, "ping", "-c", str(config), "--timeout", "0.5")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert done.returncode == 3, done.stderr
        assert elapsed >= 0.5
        assert "no reply" in done.stderr and "something listens there" in done.stderr
        assert HINT not in done.stderr
        proc.kill()
        proc.wait(10)
    assert (ipc_dir / "control").exists()  # left behind by the SIGKILL
    done, elapsed = run(ipc_dir, "status", "-c", str(config), "--timeout", "30")
    assert done.returncode == 3, done.stderr
    assert elapsed < 10, elapsed
    assert "nothing listens there (connection refused: a stale socket file" in done.stderr
