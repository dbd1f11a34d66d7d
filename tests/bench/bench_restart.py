"""Restart latency: SIGKILL a device while a probe sends through it every millisecond.

Usage: python tests/bench/bench_restart.py [--kills 20] [--contenders devmgr,supervisord]

A contender `devmgr@TREE` runs the devmgr of another source tree (with its core built
in place, e.g. a `git worktree` of an older commit) through PYTHONPATH, for an old-vs-new
comparison in the same run; a contender named twice is run twice (`name#2`).

For each contender a streamer device (PULL in, PUSH out, both bound on ipc paths) runs
under its supervisor; a probe PUSHes a timestamp every millisecond into it and PULLs
from it (reconnect interval 1 ms). Each kill is a SIGKILL of the device's current pid;
the figure is the time from the kill to the arrival of the first probe message sent
after the kill. Kills are spaced so the device has run stably (>= 1.5 s) before each.
supervisord and circus run only when their executables are installed (pip install
supervisor circus); each supervises the same device as a plain `zmq.proxy` program:
supervisord with its defaults plus autorestart=true, circus with its default
check_delay and with check_delay = 0.1 s. A contender that is missing is reported as
such. Goal (issue 4): devmgr median <= 30 ms, max <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

DEVICE_PROGRAM = """
import sys, zmq
ctx = zmq.Context()
ins = ctx.socket(zmq.PULL); ins.bind(sys.argv[1])
outs = ctx.socket(zmq.PUSH); outs.bind(sys.argv[2])
zmq.proxy(ins, outs)
"""


class Probe:
    """Send a timestamp every millisecond through the device; record arrivals."""

    def __init__(self, ctx: zmq.Context[Any], in_ep: str, out_ep: str) -> None:
        self.ctx = ctx
        self.in_ep, self.out_ep = in_ep, out_ep
        self.arrivals: list[tuple[int, int]] = []  # (sent_ns, arrived_ns)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1)
        sock.connect(endpoint)
        return sock

    def _send(self) -> None:
        sock = self._socket(zmq.PUSH, self.in_ep)
        sock.setsockopt(zmq.SNDTIMEO, 1)
        next_at = time.monotonic_ns()
        while not self.stop.is_set():
            next_at += 1_000_000
            try:
                sock.send(time.monotonic_ns().to_bytes(8, "little"))
            except zmq.Again:
                pass
            delay = (next_at - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)  # the probe's own 1 ms pace, not a wait for a condition
        sock.close()

    def _recv(self) -> None:
        sock = self._socket(zmq.PULL, self.out_ep)
        sock.setsockopt(zmq.RCVTIMEO, 50)
        while not self.stop.is_set():
            try:
                data = sock.recv()
            except zmq.Again:
                continue
            arrived = time.monotonic_ns()
            with self.lock:
                self.arrivals.append((int.from_bytes(data, "little"), arrived))
        sock.close()

    def first_after(self, t_ns: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                later = [a for s, a in self.arrivals[-5000:] if s >= t_ns]
            if later:
                return min(later) - t_ns
            time.sleep(0.001)
        return None

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)


def _request(ctx: zmq.Context[Any], endpoint: str, cmd: str) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2000)
    sock.connect(endpoint)
    try:
        sock.send(json.dumps({"v": 1, "id": 1, "cmd": cmd}).encode())
        return json.loads(sock.recv())
    finally:
        sock.close()


def run_devmgr(
    tmp: Path, kills: int, ctx: zmq.Context[Any], tree: str | None = None
) -> list[float]:
    in_ep, out_ep = f"ipc://{tmp}/dm-in", f"ipc://{tmp}/dm-out"
    control = f"ipc://{tmp}/control"
    cfg = tmp / "devmgr.toml"
    cfg.write_text(
        "[manager]\n"
        f'control = "{control}"\nevents = "ipc://{tmp}/events"\n'
        "[devices.probe]\n"
        'kind = "streamer"\n'
        f'in = {{ type = "PULL", bind = ["{in_ep}"] }}\n'
        f'out = {{ type = "PUSH", bind = ["{out_ep}"] }}\n'
        "[devices.probe.restart]\nmax_restarts = 1000\n"
    )
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp))
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"  # not the current folder's devmgr
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmgr", "start", "-c", str(cfg), "--log-level", "warning"],
        env=env,
        stderr=subprocess.DEVNULL,
    )

    def current_pid() -> int | None:
        try:
            devices = _request(ctx, control, "status")["result"]["devices"]
        except (zmq.Again, KeyError, TypeError):
            return None
        dev = devices[0]
        return dev["pid"] if dev["state"] == "running" else None

    try:
        return _kill_loop(ctx, in_ep, out_ep, kills, current_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def run_supervisord(tmp: Path, kills: int, ctx: zmq.Context[Any]) -> list[float]:
    exe = shutil.which("supervisord")
    if exe is None:
        raise RuntimeError("supervisord is not installed")
    in_ep, out_ep = f"ipc://{tmp}/sv-in", f"ipc://{tmp}/sv-out"
    prog = tmp / "device.py"
    prog.write_text(DEVICE_PROGRAM)
    sock = tmp / "supervisor.sock"
    conf = tmp / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={sock}\n"
        f"[supervisord]\nlogfile={tmp}/sv.log\npidfile={tmp}/sv.pid\nnodaemon=true\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[supervisorctl]\nserverurl=unix://{sock}\n"
        f"[program:probe]\ncommand={sys.executable} {prog} {in_ep} {out_ep}\n"
        "autorestart=true\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    me = psutil.Process(proc.pid)

    def current_pid() -> int | None:
        children = me.children()
        if len(children) == 1 and children[0].status() != psutil.STATUS_ZOMBIE:
            return children[0].pid
        return None

    try:
        return _kill_loop(ctx, in_ep, out_ep, kills, current_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def run_circus(
    tmp: Path, kills: int, ctx: zmq.Context[Any], check_delay: float | None
) -> list[float]:
    exe = shutil.which("circusd") or shutil.which("circusd", path=str(Path(sys.executable).parent))
    if exe is None:
        raise RuntimeError("circusd is not installed")
    in_ep, out_ep = f"ipc://{tmp}/ci-in", f"ipc://{tmp}/ci-out"
    prog = tmp / "device.py"
    prog.write_text(DEVICE_PROGRAM)
    ini = tmp / "circus.ini"
    delay = "" if check_delay is None else f"check_delay = {check_delay}\n"
    ini.write_text(
        "[circus]\n"
        f"endpoint = ipc://{tmp}/circus-ctl\npubsub_endpoint = ipc://{tmp}/circus-pub\n"
        "statsd = False\n" + delay + "\n"
        f"[watcher:probe]\ncmd = {sys.executable} {prog} {in_ep} {out_ep}\n"
        "numprocesses = 1\n"
    )
    proc = subprocess.Popen([exe, str(ini)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    me = psutil.Process(proc.pid)

    def current_pid() -> int | None:
        children = [
            c
            for c in me.children()
            if c.status() != psutil.STATUS_ZOMBIE and "device.py" in " ".join(c.cmdline())
        ]
        return children[0].pid if len(children) == 1 else None

    try:
        return _kill_loop(ctx, in_ep, out_ep, kills, current_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_loop(
    ctx: zmq.Context[Any],
    in_ep: str,
    out_ep: str,
    kills: int,
    current_pid: Callable[[], int | None],
) -> list[float]:
    probe = Probe(ctx, in_ep, out_ep)
    probe.start()
    latencies: list[float] = []
    try:
        for _ in range(kills):
            deadline = time.monotonic() + 30
            pid = None
            while pid is None and time.monotonic() < deadline:
                pid = current_pid()
                if pid is None:
                    time.sleep(0.01)
            if pid is None:
                raise RuntimeError("the device never came back")
            # run stably before the kill, and check traffic flows
            time.sleep(1.5)
            if probe.first_after(time.monotonic_ns() - 50_000_000, 5.0) is None:
                raise RuntimeError("no probe traffic through the device")
            t_kill = time.monotonic_ns()
            os.kill(pid, signal.SIGKILL)
            gap = probe.first_after(t_kill, 30.0)
            if gap is None:
                raise RuntimeError("no probe message came through within 30 s of a kill")
            latencies.append(gap / 1e6)
    finally:
        probe.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--contenders", default="devmgr,supervisord,circus,circus-0.1s")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    runners = {
        "devmgr": run_devmgr,
        "supervisord": run_supervisord,
        "circus": lambda t, k, c: run_circus(t, k, c, None),
        "circus-0.1s": lambda t, k, c: run_circus(t, k, c, 0.1),
    }
    results: dict[str, Any] = {}
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        for name in args.contenders.split(","):
            key, n = name, 1
            while key in results:
                n += 1
                key = f"{name}#{n}"
            tmp = Path(tempfile.mkdtemp(prefix=f"dmr-{name[:2]}-", dir="/tmp"))
            try:
                if name.startswith("devmgr@"):
                    lat = run_devmgr(tmp, args.kills, ctx, tree=name[len("devmgr@") :])
                else:
                    lat = runners[name](tmp, args.kills, ctx)
            except RuntimeError as exc:
                results[key] = {"error": str(exc)}
                continue
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            results[key] = {
                "kills": len(lat),
                "median_ms": round(statistics.median(lat), 1),
                "p99_ms": (
                    round(statistics.quantiles(lat, n=100, method="inclusive")[98], 1)
                    if len(lat) > 1
                    else None
                ),
                "max_ms": round(max(lat), 1),
                "min_ms": round(min(lat), 1),
                "all_ms": [round(x, 1) for x in lat],
            }
    finally:
        ctx.destroy(linger=0)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
