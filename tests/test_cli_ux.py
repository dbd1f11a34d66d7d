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

from conftest import wait_until


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


# ---- 13.2: long operations ------------------------------------------------------------


def _pid(config: Path, name: str) -> int:
    """The pid of device `name` once it is running (a manager answers before that)."""
    from devmgr import Client
    from devmgr._client import control_endpoint_of

    with Client(control_endpoint_of(config)) as client:

        def running() -> int:
            dev = client.status(name)["devices"][0]
            assert dev["state"] == "running", dev
            return int(dev["pid"])

        return wait_until(running, timeout=20, what=f"{name} running")


def _hung_device_config(ipc_dir: Path) -> Path:
    """A manager whose stop_timeout (1.5 s) is three times the clients' --timeout (0.5 s)."""
    settings = manager_settings(ipc_dir, stop_timeout=1.5)
    return write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")}, settings)


def test_restart_and_stop_of_a_hung_device_wait_for_the_manager(ipc_dir: Path) -> None:
    """A SIGSTOPped device ends by SIGKILL at stop_timeout: the CLI waits for that,
    however short its --timeout, while the manager answers; exit 0, not 3."""
    config = _hung_device_config(ipc_dir)
    with manager_process(config, private_env(ipc_dir)):
        old = _pid(config, "a")
        os.kill(old, signal.SIGSTOP)
        done, elapsed = run(ipc_dir, "restart", "a", "-c", str(config), "--timeout", "0.5")
        assert done.returncode == 0, done.stderr
        assert elapsed >= 1.5  # it did wait for the SIGKILL at stop_timeout
        name, state = done.stdout.split()[:2]
        assert (name, state) == ("a:", "running")
        new = _pid(config, "a")
        assert new != old and f"(pid {new})" in done.stdout
        assert "restart: waiting for a stopping" in done.stderr, done.stderr
        os.kill(new, signal.SIGSTOP)
        done, elapsed = run(ipc_dir, "stop", "--all", "-c", str(config), "--timeout", "0.5")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "a: stopped" and elapsed >= 1.5


def test_shutdown_with_a_hung_device_waits_for_the_manager(ipc_dir: Path) -> None:
    config = _hung_device_config(ipc_dir)
    with manager_process(config, private_env(ipc_dir)) as proc:
        os.kill(_pid(config, "a"), signal.SIGSTOP)
        done, elapsed = run(ipc_dir, "shutdown", "-c", str(config), "--timeout", "0.5")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "manager stopped" and elapsed >= 1.5
        assert proc.wait(10) == 0


def test_a_manager_that_stops_answering_mid_operation_is_exit_3(ipc_dir: Path) -> None:
    """Following a long operation is not waiting for ever: once the manager itself stops
    answering, the CLI gives up after --timeout of silence, exit 3, and says why."""
    config = _hung_device_config(ipc_dir)
    with manager_process(config, private_env(ipc_dir)) as proc:
        os.kill(_pid(config, "a"), signal.SIGSTOP)
        with subprocess.Popen(
            [*devmgr_command(), "restart", "a", "-c", str(config), "--timeout", "0.5"],
            env=private_env(ipc_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ) as cli:
            try:
                assert cli.stderr is not None
                line = cli.stderr.readline()  # the first progress line: the CLI follows
                assert "restart: waiting for a stopping" in line, line
                os.kill(proc.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                try:
                    cli.wait(20)
                    waited = time.monotonic() - stopped_at
                    err = cli.stderr.read()
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
            finally:
                if cli.poll() is None:
                    cli.kill()
        assert cli.returncode == 3, err
        assert "stopped answering while `restart` was under way" in err, err
        assert waited < 10


def test_every_long_command_is_followed() -> None:
    from devmgr._client import LONG_COMMANDS
    from devmgr._commands import COMMANDS

    # the client keeps its own copy (it does not import pydantic): the table's must agree
    assert {name for name, command in COMMANDS.items() if command.long} == LONG_COMMANDS
    assert set(COMMANDS) - LONG_COMMANDS == {
        "ping",
        "version",
        "status",
        "pause",
        "resume",
        "stats",
        "logs",
    }


# ---- 13.11: tap --json ----------------------------------------------------------------


def test_tap_json_gives_the_exact_frames(ipc_dir: Path) -> None:
    import json

    import zmq
    from ctl_support import monitored

    config = write_config(ipc_dir / "devmgr.toml", {"q": monitored(ipc_dir, "q")})
    frames = [b"", b"''", b"0xab", b"\x00\xff\xfe", "grüße".encode(), b"x" * 300]
    with manager_process(config, private_env(ipc_dir)):
        _pid(config, "q")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        front, back = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (front, back):
            sock.setsockopt(zmq.LINGER, 0)
        front.connect(f"ipc://{ipc_dir}/q-in")
        back.connect(f"ipc://{ipc_dir}/q-out")  # a peer to forward to: the queue moves
        try:
            lines: dict[bool, list[str]] = {}
            for as_json in (True, False):
                argv = ["tap", "q", "-c", str(config), "--count", "1"]
                with subprocess.Popen(
                    [*devmgr_command(), *argv, *(["--json"] if as_json else [])],
                    env=private_env(ipc_dir),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ) as tap:
                    try:
                        assert tap.stderr is not None and tap.stderr.readline()  # the banner

                        def printed() -> bool:
                            front.send_multipart(frames)  # until the subscription is in
                            while back.poll(0):
                                back.recv_multipart()
                            try:
                                tap.wait(0.1)
                            except subprocess.TimeoutExpired:
                                return False
                            return True

                        wait_until(printed, timeout=15, what="tap to print a message")
                        out, _ = tap.communicate(timeout=5)
                        assert tap.returncode == 0
                    finally:
                        if tap.poll() is None:
                            tap.kill()
                lines[as_json] = out.splitlines()
        finally:
            front.close()
            back.close()
            ctx.term()
    entry = json.loads(lines[True][0])
    assert entry["direction"] == "in"
    identity = bytes.fromhex(entry["hex"][0])  # the ROUTER's routing id comes first
    assert len(identity) == 5
    display = entry["frames"][1:]
    assert display[0] == ""  # an empty frame is "", not the two characters ''
    assert [bytes.fromhex(h) for h in entry["hex"]] == [identity, *frames]  # exact
    assert entry["sizes"] == [5, *map(len, frames)]
    assert display[1:5] == ["0x2727", "0x30786162", "0x00fffe", "grüße"]
    assert display[5] == "x" * 300  # JSON is never cut short
    text = lines[False][0]
    assert text.startswith("in ") and " | '' | 0x2727 | 0x30786162 | 0x00fffe | grüße | " in text
    assert text.endswith("...(300 bytes)")


# ---- 13.8: help that helps ------------------------------------------------------------


def _subparsers() -> list[tuple[str, object]]:
    import argparse

    from devmgr._cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subs.choices.items())


def test_every_subcommand_and_option_has_a_help_text_and_shows_its_default() -> None:
    import argparse

    for name, sub in _subparsers():
        assert isinstance(sub, argparse.ArgumentParser)
        assert sub.description, f"devmgr {name} --help has no description"
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"devmgr {name}: {action.dest} has no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS):
                shown = " ".join(map(str, default)) if isinstance(default, list) else default
                assert f"default: {shown})" in text or "(default" in (action.help or ""), (
                    name,
                    action.dest,
                )


def test_bench_help_shows_count_runs_and_contenders() -> None:
    done = subprocess.run(
        [*devmgr_command(), "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "messages per run (default: 500000)" in text
    assert "runs per contender (alternating) (default: 5)" in text
    assert "(default: devmgr,zmq_proxy,pyzmq_monitored_queue)" in text
    top = subprocess.run(
        [*devmgr_command(), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "exit statuses:" in top.stdout and "4  `status` only" in top.stdout


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["stauts"], "did you mean 'status'"),
        (["restrat", "a"], "did you mean 'restart'?"),
        (["ping", "--tiemout", "3"], "did you mean '--timeout'?"),
        (["status", "--jsno"], "did you mean '--json'?"),
        (["start", "--log-format", "jsn"], "did you mean 'json'?"),
        (["tap", "q", "--cuont", "3"], "did you mean '--count'?"),
    ],
)
def test_a_mistyped_command_or_option_gets_a_did_you_mean(
    argv: list[str], suggestion: str, ipc_dir: Path
) -> None:
    done, _ = run(ipc_dir, *argv)
    assert done.returncode == 2, done.stderr
    assert suggestion in done.stderr, done.stderr


def test_status_exit_status_tells_whether_every_autostart_device_runs(ipc_dir: Path) -> None:
    """0: every autostart device (or every named one) is running; 4: one is not."""
    import json

    devices = {"a": streamer(ipc_dir, "a"), "b": streamer(ipc_dir, "b", autostart=False)}
    config = write_config(ipc_dir / "devmgr.toml", devices)
    with manager_process(config, private_env(ipc_dir)):
        _pid(config, "a")

        def status(*argv: str) -> tuple[int, str, str]:
            done, _ = run(ipc_dir, "status", "-c", str(config), *argv)
            return done.returncode, done.stdout, done.stderr

        code, out, err = status()
        assert code == 0, err  # b is not autostart: its being stopped is fine
        assert status("b")[0] == 4  # named: it must run
        assert "not running: b (stopped)" in status("b")[2]
        assert run(ipc_dir, "stop", "a", "-c", str(config))[0].returncode == 0
        code, out, err = status()
        assert code == 4 and "not running: a (stopped)" in err
        assert out.splitlines()[0].startswith("NAME")  # the table is printed all the same
        code, out, err = status("--json")
        assert code == 4 and json.loads(out)["devices"]  # stdout stays clean JSON
        assert run(ipc_dir, "start", "a", "-c", str(config))[0].returncode == 0
        _pid(config, "a")
        assert status()[0] == 0
        assert run(ipc_dir, "pause", "a", "-c", str(config))[0].returncode == 0
        code, _, err = status("a")
        assert code == 4 and "a (paused)" in err
        assert run(ipc_dir, "resume", "a", "-c", str(config))[0].returncode == 0
        assert status("a")[0] == 0
