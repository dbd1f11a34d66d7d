"""Scale: N devices under one manager: start-up time, idle CPU, manager RSS, device USS.

Usage: python tests/bench/bench_scale.py [--devices 200] [--idle 30] [--json OUT]

The manager runs in this process (nothing else does), so this process's CPU time over the
idle period is the manager's. Goals (issue 4): all running <= 5 s after start(), idle CPU
<= 2 %, per-device USS <= 8 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

import devmgr
from devmgr._config import parse_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
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
    startup = time.perf_counter() - t0
    try:
        status = manager.status()
        running = sum(d["state"] == "running" for d in status["devices"])
        time.sleep(2.0)  # let the start-up settle before the idle window opens
        cpu0 = me.cpu_times()
        w0 = time.perf_counter()
        time.sleep(args.idle)  # the measurement window itself: idle by definition
        cpu1 = me.cpu_times()
        wall = time.perf_counter() - w0
        idle_cpu = 100.0 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall
        rss = me.memory_info().rss
        uss = []
        for d in manager.status()["devices"]:
            try:
                uss.append(psutil.Process(d["pid"]).memory_full_info().uss)
            except psutil.Error:
                pass
    finally:
        t1 = time.perf_counter()
        manager.stop()
        shutdown = time.perf_counter() - t1
    figures = {
        "devices": args.devices,
        "running_after_start": running,
        "startup_s": round(startup, 3),
        "idle_cpu_percent": round(idle_cpu, 2),
        "idle_window_s": round(wall, 1),
        "health_interval_s": args.health_interval,
        "manager_rss_mb": round(rss / 2**20, 1),
        "device_uss_mb_median": round(statistics.median(uss) / 2**20, 2),
        "device_uss_mb_max": round(max(uss) / 2**20, 2),
        "shutdown_s": round(shutdown, 3),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
