"""Scale: N devices under one manager: start-up, idle CPU, status, a restart storm, stop.

Usage: python tests/bench/bench_scale.py [--devices 1000] [--idle 30] [--storm 100]
                                         [--json OUT]

The manager runs in this process (nothing else does), so this process's CPU time over the
idle period is the manager's. Measured, in order: `start()` to all running; idle CPU
over --idle seconds; manager RSS, its open fds (and per device), device USS; the
`Client.status()` round trip (all devices, and one by name) and `devmgr status` as a whole
command; a restart storm (--storm devices SIGKILLed at once: time until all are running
again, and the slowest `ping` answered meanwhile, pinged every 10 ms); `stop()` of all.
Goals (issue 17, 1,000 devices): start <= 5 s, idle CPU <= 2 %, status median <= 10 ms,
`devmgr status` <= 150 ms, status NAME <= 0.3 ms, RSS <= 200 MiB, device USS median
<= 4 MiB, storm recovered <= 2 s with ping <= 50 ms, stop <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import devmgr
from devmgr._config import parse_config


def _running(status: dict) -> int:
    return sum(d["state"] == "running" for d in status["devices"])


def _ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median": round(statistics.median(ordered) * 1e3, 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
    }


def _status_figures(tmp: Path, roundtrips: int) -> dict[str, object]:
    """Time Client.status() (all, and one device by name) and `devmgr status` (command)."""
    endpoint = f"ipc://{tmp}/control"
    with devmgr.Client(endpoint) as client:
        client.status()  # connected and warm
        every = []
        for _ in range(roundtrips):
            t = time.perf_counter()
            client.status()
            every.append(time.perf_counter() - t)
        one = []
        for _ in range(roundtrips * 10):
            t = time.perf_counter()
            client.status("d0")
            one.append(time.perf_counter() - t)
    command = [str(Path(sys.executable).parent / "devmgr"), "status", "-e", endpoint]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=False, timeout=60)  # warm caches
    whole = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=False, timeout=60)
        whole.append(time.perf_counter() - t)
    return {
        "client_status_all_ms": _ms(every),
        "client_status_one_ms": _ms(one),
        "devmgr_status_command_ms": _ms(whole),
    }


def _storm(manager: devmgr.Manager, tmp: Path, count: int) -> dict[str, object]:
    """SIGKILL `count` devices at once; time until all run again, and the slowest ping."""
    status = manager.status()
    victims = [d for d in status["devices"] if d["state"] == "running"][:count]
    total = len(status["devices"])
    pings = []
    with devmgr.Client(f"ipc://{tmp}/control") as client:
        client.ping()
        t0 = time.perf_counter()
        for d in victims:
            os.kill(d["pid"], signal.SIGKILL)
        deadline = t0 + 30.0
        recovered = None
        old = {d["name"]: d["pid"] for d in victims}
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            client.ping()
            pings.append(time.perf_counter() - t)
            now = client.status()
            back = all(
                d["state"] == "running" and d["pid"] != old.get(d["name"], -1)
                for d in now["devices"]
            )
            if back and _running(now) == total:
                recovered = time.perf_counter() - t0
                break
            time.sleep(0.01)
    return {
        "storm_killed": len(victims),
        "storm_recovered_s": round(recovered, 3) if recovered is not None else None,
        "storm_ping_ms_max": round(max(pings) * 1e3, 2) if pings else None,
        "storm_ping_ms_median": round(statistics.median(pings) * 1e3, 3) if pings else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--storm", type=int, default=100, help="devices SIGKILLed at once")
    parser.add_argument("--roundtrips", type=int, default=50, help="status calls timed")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU sampling")
    parser.add_argument("--health-interval", type=float, default=1.0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dmscale-", dir="/tmp"))
    os.environ["XDG_RUNTIME_DIR"] = str(tmp)
    devices = {
        f"d{i}": {
            "kind": "streamer",
            "in": {"type": "PULL", "bind": [f"ipc://{tmp}/d{i}-in"]},
            "out": {"type": "PUSH", "bind": [f"ipc://{tmp}/d{i}-out"]},
        }
        for i in range(args.devices)
    }
    config = parse_config(
        {
            "manager": {
                "control": f"ipc://{tmp}/control",
                "events": f"ipc://{tmp}/events",
                "health_interval": args.health_interval,
            },
            "devices": devices,
        }
    )
    me = psutil.Process()
    manager = devmgr.Manager(config)
    t0 = time.perf_counter()
    manager.start()
    figures: dict[str, object] = {"devices": args.devices}
    figures["startup_s"] = round(time.perf_counter() - t0, 3)
    try:
        status = manager.status()
        figures["running_after_start"] = _running(status)
        time.sleep(2.0)  # let the start-up settle before the idle window opens
        cpu0 = me.cpu_times()
        w0 = time.perf_counter()
        time.sleep(args.idle)  # the measurement window itself: idle by definition
        cpu1 = me.cpu_times()
        wall = time.perf_counter() - w0
        figures["idle_cpu_percent"] = round(
            100.0 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall, 2
        )
        figures["idle_window_s"] = round(wall, 1)
        figures["health_interval_s"] = args.health_interval
        figures["manager_rss_mb"] = round(me.memory_info().rss / 2**20, 1)
        fds = me.num_fds()
        figures["manager_fds"] = fds
        figures["manager_fds_per_device"] = round(fds / args.devices, 2)
        uss = []
        for d in manager.status()["devices"]:
            try:
                uss.append(psutil.Process(d["pid"]).memory_full_info().uss)
            except psutil.Error:
                pass
        figures["device_uss_mb_median"] = round(statistics.median(uss) / 2**20, 2)
        figures["device_uss_mb_max"] = round(max(uss) / 2**20, 2)
        figures.update(_status_figures(tmp, args.roundtrips))
        figures.update(_storm(manager, tmp, args.storm))
    finally:
        t1 = time.perf_counter()
        manager.stop()
        figures["stop_s"] = round(time.perf_counter() - t1, 3)
    figures["cpu_count"] = os.cpu_count()
    figures["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
