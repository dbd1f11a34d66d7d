"""The ZeroMQ Guide's Lazy Pirate programs, unmodified, across planned devmgr restarts.

Usage (root, Linux: the servers run in network namespaces of their own):
    python tests/bench/guide_restart.py --zguide DIR [--clients 3] [--restarts 8]
        [--interval 4] [--drain-quiet S] [--base CHECKOUT] [--phase-s 32]

DIR is a checkout of github:booksbyus/zguide; its examples/Python/lpclient.py and
lpserver.py are copied into a temp dir and run as they are (nothing from them is part
of devmgr). lpclient.py connects a REQ to tcp://localhost:5555; lpserver.py binds a REP
on tcp://*:5555, answers after 1 s (sometimes 3 s) and now and then exits to simulate a
crash (this harness starts it again). So the clients can meet a devmgr `queue` bound on
127.0.0.1:5555 while each server keeps its own port 5555, every server runs in a
network namespace of its own (`unshare -n`), reached from the queue's out-socket
through a byte relay in that namespace (an ipc socket outside, tcp 127.0.0.1:5555
inside; one tcp connection per ipc connection, closed together).

Two phases of `--phase-s` seconds each: no restarts (the programs' own failure rate),
then a planned `restart` of the queue every `--interval` s. Figures from the programs'
own log lines: "No response from server" (a client timeout, 2.5 s), "Malformed reply"
(a reply that was not the client's), "abandoning" (a client gave up; it is started
again). `--base CHECKOUT` runs the same first against another devmgr checkout
(PYTHONPATH), for a baseline from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RELAY = r"""
import os, socket, sys, threading
listen_path = sys.argv[1]
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve(conn):
    try:
        up = socket.create_connection(("127.0.0.1", 5555))
    except OSError:
        conn.close()
        return
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    pump(up, conn)
    conn.close(); up.close()
if os.path.exists(listen_path):
    os.unlink(listen_path)
srv = socket.socket(socket.AF_UNIX)
srv.bind(listen_path)
srv.listen(64)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

DEVICE = r"""
import json, sys, time, devmgr
from devmgr._config import parse_config
folder, servers, quiet, interval, restarts, phase = sys.argv[1:7]
table = {"kind": "queue",
         "in": {"type": "ROUTER", "bind": ["tcp://127.0.0.1:5555"]},
         "out": {"type": "DEALER",
                 "connect": [f"ipc://{folder}/s{i}.sock" for i in range(int(servers))]}}
if quiet != "none":
    table["drain_quiet"] = float(quiet)
config = parse_config({"manager": {"control": f"ipc://{folder}/control",
                                   "events": f"ipc://{folder}/events", "stop_timeout": 5.0},
                       "devices": {"q": table}})
with devmgr.Manager(config) as manager:
    (entry,) = manager.status(["q"])["devices"]
    maps = open(f"/proc/{entry['pid']}/maps").read().splitlines()
    print("CORE", sorted({ln.split()[-1] for ln in maps if "/devmgr/_core" in ln}), flush=True)
    print("READY", flush=True)
    sys.stdin.readline()  # the harness says when the restart phase begins
    for _ in range(int(restarts)):
        began = time.monotonic()
        manager.restart("q")
        print("RESTART", round(time.monotonic() - began, 3), flush=True)
        time.sleep(max(0.0, float(interval) - (time.monotonic() - began)))
    print("DONE", flush=True)
    sys.stdin.readline()
"""


class Counts:
    def __init__(self) -> None:
        self.ok = self.timeouts = self.malformed = self.abandoned = 0

    def add(self, text: str) -> None:
        self.ok += len(re.findall(r"Server replied OK", text))
        self.timeouts += len(re.findall(r"No response from server", text))
        self.malformed += len(re.findall(r"Malformed reply", text))
        self.abandoned += len(re.findall(r"abandoning", text))

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def run(args: argparse.Namespace, checkout: Path | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="dm-guide-", dir="/tmp"))
    for name in ("lpclient.py", "lpserver.py"):
        shutil.copy(args.zguide / "examples" / "Python" / name, work / name)
    (work / "relay.py").write_text(RELAY)
    (work / "device.py").write_text(DEVICE)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work), "PYTHONSAFEPATH": "1"}
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    procs: list[subprocess.Popen[str]] = []
    logs: list[Path] = []

    def server_ns(i: int) -> subprocess.Popen[str]:
        # one namespace per server: the relay, and lpserver started again whenever it exits
        script = (
            f"ip link set lo up; {sys.executable} relay.py {work}/s{i}.sock & "
            f"n=0; while [ $n -lt 200 ]; do {sys.executable} lpserver.py; n=$((n+1)); done"
        )
        log = work / f"server{i}.log"
        logs.append(log)
        return subprocess.Popen(
            ["unshare", "-n", "sh", "-c", script],
            cwd=work,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    device = subprocess.Popen(
        [
            sys.executable,
            "device.py",
            str(work),
            str(args.clients),
            "none" if args.drain_quiet is None else str(args.drain_quiet),
            str(args.interval),
            str(args.restarts),
            str(args.phase_s),
        ],
        cwd=work,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert device.stdout is not None and device.stdin is not None
        core = device.stdout.readline().strip()  # the device process's own devmgr
        assert device.stdout.readline().strip() == "READY"
        procs.extend(server_ns(i) for i in range(args.clients))
        time.sleep(1.0)  # the relays listen and the queue has connected

        def clients(phase: str) -> list[subprocess.Popen[str]]:
            out = []
            for i in range(args.clients):
                log = work / f"client{i}-{phase}.log"
                out.append(
                    subprocess.Popen(
                        [sys.executable, "lpclient.py"],
                        cwd=work,
                        stdout=log.open("w"),
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            return out

        def phase(name: str, seconds: float) -> Counts:
            running = clients(name)
            end = time.monotonic() + seconds
            restarted = 0
            while time.monotonic() < end:
                for i, proc in enumerate(running):  # an abandoning client starts again
                    if proc.poll() is not None and restarted < 50:
                        restarted += 1
                        log = work / f"client{i}-{name}-{restarted}.log"
                        running[i] = subprocess.Popen(
                            [sys.executable, "lpclient.py"],
                            cwd=work,
                            stdout=log.open("w"),
                            stderr=subprocess.STDOUT,
                            text=True,
                        )
                time.sleep(0.1)
            for proc in running:
                proc.send_signal(signal.SIGINT)
            for proc in running:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            counts = Counts()
            for log in work.glob(f"client*-{name}*.log"):
                counts.add(log.read_text(errors="replace"))
            return counts

        quiet = phase("quiet", args.phase_s)
        device.stdin.write("go\n")
        device.stdin.flush()
        restarting = phase("restarts", args.phase_s)
        restart_s = []
        while True:
            line = device.stdout.readline().strip()
            if line.startswith("RESTART"):
                restart_s.append(float(line.split()[1]))
            if line == "DONE" or not line:
                break
        device.stdin.write("end\n")
        device.stdin.flush()
        device.wait(30)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: relay and lpserver
            except ProcessLookupError:
                pass
            proc.wait()
        if device.poll() is None:
            device.kill()
            device.wait()
    n = len(restart_s)
    return {
        "devmgr": str(checkout) if checkout else "this",
        "device_core": core,
        "drain_quiet": args.drain_quiet,
        "no_restarts": quiet.as_dict(),
        "restarts": n,
        "with_restarts": restarting.as_dict(),
        "extra_timeouts_per_restart": round((restarting.timeouts - quiet.timeouts) / max(1, n), 2),
        "malformed_per_restart": round(restarting.malformed / max(1, n), 2),
        "restart_call_s": sorted(restart_s)[n // 2] if n else None,
        "work": str(work),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zguide", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=3, help="lpclient.py and lpserver.py each")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--interval", type=float, default=4.0)
    parser.add_argument("--phase-s", type=float, default=32.0)
    parser.add_argument("--drain-quiet", type=float, default=None)
    parser.add_argument("--base", type=Path, default=None)
    args = parser.parse_args()
    results = []
    if args.base is not None:
        base_args = argparse.Namespace(**{**vars(args), "drain_quiet": None})
        results.append(run(base_args, args.base.resolve()))
    results.append(run(args, None))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
