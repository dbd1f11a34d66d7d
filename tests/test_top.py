"""`devmgr top`: in a real terminal (tmux: send-keys, capture-pane) and piped (--once).

A real `devmgr start`, real traffic through a streamer, the command run as a user runs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
from ctl_support import devmgr_command, manager_process, private_env, streamer, write_config

from devmgr._top import RateTracker, format_rate

from conftest import wait_until

TMUX = shutil.which("tmux")


@pytest.fixture
def running(ipc_dir: Path) -> Iterator[Path]:
    """A `devmgr start` with streamers `a` and `b`, health ticks every 0.2 s."""
    config = write_config(
        ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a"), "b": streamer(ipc_dir, "b")}
    )
    with manager_process(config, private_env(ipc_dir)):
        yield config


@contextmanager
def traffic(ipc_dir: Path, name: str) -> Iterator[None]:
    """Push messages through streamer `name` (and drain its output) until the block ends."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
    push.connect(f"ipc://{ipc_dir}/{name}-in")
    pull.connect(f"ipc://{ipc_dir}/{name}-out")
    stop = threading.Event()

    def pump() -> None:
        payload = b"x" * 100
        # bounded: at most 100,000 rounds of up to 100 messages, each round waiting up to
        # 1 ms for output (the pace of a modest producer, not a CPU-bound flood)
        for _ in range(100_000):
            if stop.is_set():
                return
            for _ in range(100):
                try:
                    push.send(payload, zmq.NOBLOCK)
                except zmq.Again:
                    break
            while pull.poll(1):
                pull.recv()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows by device name, split into cells (cells hold no double blanks)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 10 and cells[0] in ("a", "b"):
            rows[cells[0]] = cells
    return rows


# ---- piped ---------------------------------------------------------------------------


def test_once_piped_is_plain_text_with_rates(ipc_dir: Path, running: Path) -> None:
    with traffic(ipc_dir, "a"):
        done = subprocess.run(
            [*devmgr_command(), "top", "--once", "--interval", "0.5", "-c", str(running)],
            env=private_env(ipc_dir),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # no terminal control codes in a pipe
    lines = done.stdout.splitlines()
    assert lines[0].startswith("devmgr top - ") and str(running) in lines[0]
    assert lines[1].startswith("devices: 2 (2 running)")
    header = lines[3].split()
    assert header[:5] == ["NAME", "STATE", "PID", "UPTIME", "RESTARTS"]
    for column in ("MSG/S IN", "MSG/S OUT", "B/S IN", "B/S OUT", "CPU", "RSS"):
        assert column in lines[3]
    rows = _rows(done.stdout)
    assert set(rows) == {"a", "b"}
    a, b = rows["a"], rows["b"]
    assert a[1] == "running" and b[1] == "running"
    # traffic through a only: its rates are positive, b's are zero
    assert float(a[5].rstrip("kM")) > 0 and a[7].endswith("/s") and a[7] != "0B/s"
    assert b[5:9] == ["0", "0", "0B/s", "0B/s"]
    assert a[9].endswith("%") and a[10].endswith("MiB")


def test_piped_frames_follow_one_another_and_a_closed_pipe_ends_quietly(
    ipc_dir: Path, running: Path
) -> None:
    proc = subprocess.Popen(
        [*devmgr_command(), "top", "--interval", "0.1", "-c", str(running)],
        env=private_env(ipc_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        frames, lines = 0, []
        while frames < 3:  # bounded by the test's timeout; a frame comes every 0.1 s
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
            frames += line.startswith("devmgr top - ")
        assert "\x1b" not in "".join(lines)
        assert lines[-1].startswith("devmgr top - ") and lines[-2] == "\n"  # a blank between
        proc.stdout.close()  # as `| head` does once it has its lines
        assert proc.wait(15) == 0
        assert proc.stderr.read() == ""  # no BrokenPipeError traceback
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_once_without_a_manager_exits_3(ipc_dir: Path) -> None:
    done = subprocess.run(
        [*devmgr_command(), "top", "--once", "-e", f"ipc://{ipc_dir}/none", "--timeout", "0.5"],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith("error: ")


def test_bad_interval_is_a_usage_error(ipc_dir: Path) -> None:
    done = subprocess.run(
        [*devmgr_command(), "top", "--interval", "0"],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "--interval" in done.stderr


def test_rates_come_from_the_loop_counters_between_two_readings() -> None:
    tracker = RateTracker()

    def dev(pid: int | None, at: float | None, msgs: int) -> dict[str, Any]:
        stats = {
            "in_msgs_received": msgs,
            "out_msgs_sent": msgs,
            "in_bytes_received": msgs * 10,
            "out_bytes_sent": msgs * 10,
        }
        return {"name": "a", "pid": pid, "stats_at": at, "stats": stats}

    assert tracker.update([dev(1, 100.0, 0)]) == {"a": None}  # one reading: no rate
    assert tracker.update([dev(1, 100.5, 50)]) == {"a": (100.0, 100.0, 1000.0, 1000.0)}
    # no new reading since: the last rate stands (not a spurious zero)
    assert tracker.update([dev(1, 100.5, 50)]) == {"a": (100.0, 100.0, 1000.0, 1000.0)}
    # a restart (new pid, counters from zero) has no rate until its second reading
    assert tracker.update([dev(2, 101.0, 3)]) == {"a": None}
    assert tracker.update([dev(None, None, 0)]) == {"a": None}
    assert format_rate(None) == "-" and format_rate(0) == "0" and format_rate(12345) == "12.3k"
    assert format_rate(2048, "B") == "2.0KiB"


# ---- in a terminal -------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one command in a sized pane."""

    def __init__(self, folder: Path) -> None:
        assert TMUX is not None, "tmux is needed for the terminal tests"
        self.socket = str(folder / "tmux.sock")
        # the server, started by the first command, hands this environment to its panes
        self.env = private_env(folder)

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [TMUX, "-S", self.socket, "-f", "/dev/null", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, command: str, width: int, height: int) -> None:
        # `; echo; read` keeps the pane after the command ends, to read its exit status
        shell = f'{command}; echo "exit status $?"; read _'
        self.run("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), shell)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def history(self) -> str:
        """Everything the pane shows and has scrolled off (the normal screen's history)."""
        return self.run("capture-pane", "-p", "-S", "-", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def kill(self) -> None:
        subprocess.run(
            [TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=10, check=False
        )


@pytest.fixture
def tmux(ipc_dir: Path) -> Iterator[Tmux]:
    session = Tmux(ipc_dir)
    try:
        yield session
    finally:
        session.kill()


def test_live_in_a_terminal_refreshes_in_place_and_quits_on_ctrl_c(
    ipc_dir: Path, running: Path, tmux: Tmux
) -> None:
    command = " ".join([*devmgr_command(), "top", "--interval", "0.2", "-c", str(running)])
    tmux.start(command, 120, 30)
    with traffic(ipc_dir, "b"):

        def moving() -> dict[str, list[str]]:
            rows = _rows(tmux.screen())
            assert set(rows) == {"a", "b"}, tmux.screen()
            assert rows["b"][5] not in ("-", "0"), rows
            return rows

        rows = wait_until(moving, timeout=20, what="b's rates on the screen")
    assert rows["a"][1] == rows["b"][1] == "running"
    first = tmux.screen().splitlines()[0]
    assert first.startswith("devmgr top - ")

    # in place: the clock moves, and the pane never holds more than one table
    wait_until(lambda: tmux.screen().splitlines()[0] != first, timeout=10, what="a refresh")
    screen = tmux.screen()
    assert screen.count("devmgr top - ") == 1 and screen.count("NAME ") == 1

    tmux.keys("C-c")
    wait_until(lambda: "exit status 0" in tmux.screen(), timeout=10, what="top to exit 0")
    # the alternate screen is gone, and no frame went into the scrollback either
    assert "devmgr top - " not in tmux.history()
    assert "NAME " not in tmux.history()


def test_q_quits_and_a_narrow_terminal_gets_cut_lines(
    ipc_dir: Path, running: Path, tmux: Tmux
) -> None:
    command = " ".join(
        [*devmgr_command(), "top", "--interval", "0.2", "-e", f"ipc://{ipc_dir}/control"]
    )
    tmux.start(command, 50, 8)
    wait_until(lambda: "RESTARTS" in tmux.screen(), timeout=20, what="the table")
    lines = tmux.screen().splitlines()
    assert all(len(line) <= 50 for line in lines)
    # 2 header lines, a blank, the column header and 2 rows: 6 of 8 lines, no wrapping
    assert lines[0].startswith("devmgr top - ")
    assert lines[3].startswith("NAME")
    assert lines[4].startswith("a ") and lines[5].startswith("b ")
    tmux.keys("q")
    wait_until(lambda: "exit status 0" in tmux.screen(), timeout=10, what="top to exit 0")


def test_a_short_terminal_says_what_did_not_fit(ipc_dir: Path, running: Path, tmux: Tmux) -> None:
    command = " ".join([*devmgr_command(), "top", "--interval", "0.2", "-c", str(running)])
    tmux.start(command, 120, 5)
    wait_until(lambda: "more lines" in tmux.screen(), timeout=20, what="the cut table")
    lines = [line for line in tmux.screen().splitlines() if line]
    assert lines[-1] == "... 2 more lines" and len(tmux.screen().splitlines()) <= 5
    tmux.keys("C-c")
    wait_until(lambda: "exit status 0" in tmux.screen(), timeout=10, what="top to exit 0")


def test_a_dumb_terminal_gets_plain_frames_one_after_another(
    ipc_dir: Path, running: Path, tmux: Tmux
) -> None:
    top = " ".join([*devmgr_command(), "top", "--interval", "0.2", "-c", str(running)])
    tmux.start(f"TERM=dumb {top}", 120, 30)
    # no cursor addressing on a dumb terminal: the frames scroll, as piped output does
    wait_until(lambda: tmux.history().count("devmgr top - ") >= 3, timeout=20, what="three frames")
    tmux.keys("C-c")
    wait_until(lambda: "exit status 0" in tmux.screen(), timeout=10, what="top to exit 0")
    assert "Traceback" not in tmux.history()
