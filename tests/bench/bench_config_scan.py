"""What reading the config costs `devmgr status -c FILE`: beside `-e ENDPOINT`, same run.

Starts a manager on a config in a temporary folder, then runs the whole command against
it RUNS times as `devmgr status -c FILE` (the endpoint read from the file with tomllib)
and RUNS times as `devmgr status -e ENDPOINT` (no file read: the most a faster reader
could save), alternating, and prints the medians of wall time and CPU time (user +
system of the child) of each, and their ratio.

    python tests/bench/bench_config_scan.py --runs 40
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CONFIG = """
[manager]
control = "ipc://{folder}/control"
events = "ipc://{folder}/events"

[devices.s]
kind = "streamer"
in = {{ type = "PULL", bind = ["ipc://{folder}/in"] }}
out = {{ type = "PUSH", bind = ["ipc://{folder}/out"] }}
"""
_RUN = "from devmgr._cli import main; raise SystemExit(main(['status', {how!r}, {what!r}]))"


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each variant (40)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dm-scan-") as folder:
        path = Path(folder) / "devmgr.toml"
        path.write_text(_CONFIG.format(folder=folder))
        manager = subprocess.Popen(
            [sys.executable, "-m", "devmgr", "start", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=folder,
        )
        try:
            deadline = time.monotonic() + 30
            while subprocess.run(
                [sys.executable, "-m", "devmgr", "ping", "-c", str(path)],
                capture_output=True,
                check=False,
            ).returncode:
                if time.monotonic() > deadline or manager.poll() is not None:
                    raise SystemExit("the manager did not answer")
                time.sleep(0.1)  # poll interval of this bounded wait
            variants = {
                "-e ENDPOINT": _RUN.format(how="-e", what=f"ipc://{folder}/control"),
                "-c FILE": _RUN.format(how="-c", what=str(path)),
            }
            wall: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.runs):
                for name, code in variants.items():
                    cpu0, wall0 = _child_cpu(), time.perf_counter()
                    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
                    wall[name].append((time.perf_counter() - wall0) * 1000)
                    cpu[name].append((_child_cpu() - cpu0) * 1000)
        finally:
            subprocess.run(
                [sys.executable, "-m", "devmgr", "shutdown", "-c", str(path)],
                capture_output=True,
                check=False,
            )
            try:
                manager.wait(30)
            except subprocess.TimeoutExpired:
                manager.kill()
                manager.wait()
    base = statistics.median(cpu["-e ENDPOINT"])
    for name in variants:
        print(
            f"{name:12s} wall median {statistics.median(wall[name]):6.1f} ms  "
            f"CPU median {statistics.median(cpu[name]):6.1f} ms  "
            f"(min {min(cpu[name]):5.1f})  CPU ratio {statistics.median(cpu[name]) / base:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
