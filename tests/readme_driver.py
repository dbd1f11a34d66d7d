"""Run one shell block of the README, command by command, the way a user at a terminal does.

Started by tests/test_readme.py inside fresh network and mount namespaces (`unshare`),
so that the fixed ports and /tmp paths the README's examples use are this run's alone.
`python readme_driver.py BLOCK_FILE WORKDIR` prints one JSON object per command.

- `devmgr start` without device names runs a manager in the foreground: the driver starts
  it in the background and goes on once `devmgr ping` answers (a user opens another
  terminal). When the block ends, a manager still running gets SIGINT (Ctrl-C) and must
  exit 0; one that a `shutdown` ended must have exited 0.
- `devmgr tap` and `devmgr events` print until Ctrl-C: the driver sends SIGINT once they
  have printed their banner (exit 130, as after a Ctrl-C).
- Every other command must exit 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_START_OPTIONS_WITH_VALUE = {"-c", "--config", "-e", "--endpoint", "--timeout", "--log-level"}
_START_OPTIONS_WITH_VALUE |= {"--log-format", "--curve-client", "--curve-server"}


def loopback_up() -> None:
    """Bring up `lo` in this (new) network namespace, as `ip link set lo up` does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def commands(text: str) -> list[str]:
    """Split a block into commands: one a line, a here-document with its line."""
    found: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "<<'EOF'" in line:
            body = [line]
            for more in lines:
                body.append(more)
                if more == "EOF":
                    break
            found.append("\n".join(body))
        else:
            found.append(line)
    return found


def runs_a_manager(command: str) -> bool:
    words = shlex.split(command, comments=True)
    if words[:2] != ["devmgr", "start"]:
        return False
    rest, names = iter(words[2:]), []
    for word in rest:
        if word in _START_OPTIONS_WITH_VALUE:
            next(rest, None)
        elif not word.startswith("-"):
            names.append(word)
    return not names


def until_ctrl_c(command: str) -> bool:
    return shlex.split(command, comments=True)[:2] in (["devmgr", "tap"], ["devmgr", "events"])


def main() -> int:
    block, workdir = Path(sys.argv[1]).read_text(), sys.argv[2]
    loopback_up()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMGR_")}
    env.pop("XDG_RUNTIME_DIR", None)  # the default endpoint, in this run's private /tmp
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    manager: subprocess.Popen[str] | None = None
    results = []

    def record(command: str, status: int | None, expected: int, out: str, err: str) -> None:
        results.append(
            {"command": command, "status": status, "expected": expected, "out": out, "err": err}
        )

    for command in commands(block):
        if runs_a_manager(command):
            manager = subprocess.Popen(
                ["bash", "-c", command],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and manager.poll() is None:
                ping = subprocess.run(
                    ["devmgr", "ping", "--timeout", "1"],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    check=False,
                )
                if ping.returncode == 0:
                    break
                time.sleep(0.05)  # poll interval of this bounded wait for the manager
            if manager.poll() is not None:
                out, err = manager.communicate()
                record(command, manager.returncode, 0, out, err + "\n(ended before answering)")
                manager = None
            continue
        if until_ctrl_c(command):
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stderr is not None
            banner = proc.stderr.readline()  # "... (Ctrl-C to stop)" once it listens
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            record(command, proc.returncode, 130, out, banner + err)
            continue
        try:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            record(command, done.returncode, 0, done.stdout, done.stderr)
        except subprocess.TimeoutExpired as exc:
            record(command, None, 0, str(exc.stdout), f"timed out: {exc}")
    if manager is not None:
        if manager.poll() is None:
            manager.send_signal(signal.SIGINT)  # the user's Ctrl-C in the manager's terminal
        try:
            out, err = manager.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            manager.kill()
            out, err = manager.communicate()
        record("(the manager, at the end)", manager.returncode, 0, out, err[-2000:])
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
