"""Lazy Pirate clients across planned restarts of a devmgr queue: misdeliveries and losses.

Usage: python tests/bench/bench_pirate_restart.py [--restarts 6] [--clients 4]
           [--workers 2] [--service 0.03] [--interval 1.0] [--timeout 1.0]
           [--drain-quiet SECONDS] [--pace SECONDS] [--worker-reconnect-ms MS]
           [--base CHECKOUT] [--json]

A devmgr `queue` (ROUTER in, DEALER out, ipc endpoints) runs under a Manager. `--workers`
echo workers connect REP sockets to its out-side (as the Guide's rrworker.py does) and
answer each request after `--service` seconds. `--clients` Lazy Pirate clients
(tests/pirate_support.py: REQ, a fresh socket and a resend after each `--timeout`, every
try with a body of its own) send back to back and check that each reply is the one they
sent. Every `--interval` seconds the queue gets a planned `restart`, `--restarts` times.

Figures, per planned restart:
- misdelivered: replies a client got that answered another client's request;
- lost after read: tries that timed out although a worker got the request (the device
  had read it, so only the restart lost its reply; the drain's job is to make this 0);
- timeouts: all tries that timed out.

`--base CHECKOUT` runs the same scenario first against another checkout (its devmgr with
a built core, e.g. a worktree of main before a change) in a subprocess with
PYTHONPATH=CHECKOUT, and prints both, so the baseline comes from the same run. Bounded:
at most `--restarts` restarts, each client stops at the end, a hard limit of
restarts x interval + 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from pirate_support import EchoWorker, LazyPirateClient  # noqa: E402


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    import devmgr
    from devmgr._config import parse_config

    folder = Path(tempfile.mkdtemp(prefix="dm-pb-", dir="/tmp"))
    os.environ["XDG_RUNTIME_DIR"] = str(folder)
    in_ep, out_ep = f"ipc://{folder}/q-in", f"ipc://{folder}/q-out"
    table: dict[str, Any] = {
        "kind": "queue",
        "in": {"type": "ROUTER", "bind": [in_ep]},
        "out": {"type": "DEALER", "bind": [out_ep]},
    }
    if args.drain_quiet is not None:
        table["drain_quiet"] = args.drain_quiet
    config = parse_config(
        {
            "manager": {
                "control": f"ipc://{folder}/control",
                "events": f"ipc://{folder}/events",
                "stop_timeout": args.stop_timeout,
            },
            "devices": {"q": table},
        }
    )
    ctx: zmq.Context[Any] = zmq.Context()
    stop = threading.Event()
    clients: list[LazyPirateClient] = []
    hard_limit = time.monotonic() + args.restarts * args.interval + 60

    def client_loop(client: LazyPirateClient) -> None:
        try:
            while not stop.is_set() and time.monotonic() < hard_limit:
                client.request(args.timeout, args.retries)
                if args.pace:
                    stop.wait(args.pace)
        finally:
            client.close()

    with devmgr.Manager(config) as manager:
        workers = [
            EchoWorker(
                ctx, out_ep, delay=args.service, reconnect_ivl_ms=args.worker_reconnect_ms
            ).start()
            for _ in range(args.workers)
        ]
        threads = []
        for n in range(args.clients):
            client = LazyPirateClient(ctx, in_ep, f"c{n}")
            clients.append(client)
            threads.append(threading.Thread(target=client_loop, args=(client,), daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(args.interval)  # traffic flowing before the first restart
        restart_s = []
        for _ in range(args.restarts):
            started = time.monotonic()
            manager.restart("q")
            restart_s.append(time.monotonic() - started)
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        # which devmgr the device process itself runs (its forkserver's sys.path decides)
        (entry,) = manager.status(["q"])["devices"]
        maps = Path(f"/proc/{entry['pid']}/maps").read_text().splitlines()
        device_core = sorted({ln.split()[-1] for ln in maps if "/devmgr/_core" in ln})
        stop.set()
        for thread in threads:
            thread.join(args.timeout * args.retries + 5)
        for worker in workers:
            worker.stop()
    ctx.destroy(linger=0)
    seen = {body for worker in workers for body in worker.received}
    tries = [t for c in clients for t in c.tries]
    timeouts = [body for body, outcome in tries if outcome == "timeout"]
    lost_after_read = sum(1 for body in timeouts if body in seen)
    misdelivered = sum(1 for _, outcome in tries if outcome == "misdelivered")
    n = args.restarts
    return {
        "devmgr": str(Path(devmgr.__file__).parent),
        "device_core": device_core,
        "drain_quiet": args.drain_quiet,
        "restarts": n,
        "tries": len(tries),
        "ok": sum(1 for _, outcome in tries if outcome == "ok"),
        "misdelivered": misdelivered,
        "lost_after_read": lost_after_read,
        "timeouts": len(timeouts),
        "misdelivered_per_restart": round(misdelivered / n, 2),
        "lost_after_read_per_restart": round(lost_after_read / n, 2),
        "timeouts_per_restart": round(len(timeouts) / n, 2),
        "restart_call_s_median": round(sorted(restart_s)[len(restart_s) // 2], 3),
    }


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"{label:<10} tries {r['tries']:>5}  ok {r['ok']:>5}  misdelivered {r['misdelivered']:>3} "
        f"({r['misdelivered_per_restart']}/restart)  lost after read {r['lost_after_read']:>3} "
        f"({r['lost_after_read_per_restart']}/restart)  timeouts {r['timeouts']:>3} "
        f"({r['timeouts_per_restart']}/restart)  restart call {r['restart_call_s_median']} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--service", type=float, default=0.03, help="worker seconds per request")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between restarts")
    parser.add_argument("--timeout", type=float, default=1.0, help="client seconds per try")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--stop-timeout", type=float, default=5.0)
    parser.add_argument(
        "--worker-reconnect-ms",
        type=int,
        default=100,
        help="workers' RECONNECT_IVL (libzmq's default 100); above the clients' 100 ms, "
        "clients are back first, as when workers sit behind a slower network",
    )
    parser.add_argument(
        "--pace", type=float, default=0.0, help="seconds a client waits between requests"
    )
    parser.add_argument("--drain-quiet", type=float, default=None)
    parser.add_argument("--base", type=Path, default=None, help="baseline checkout")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(scenario(args)))
        return 0
    results: dict[str, Any] = {}
    if args.base is not None:
        argv = [a for a in sys.argv[1:] if not a.startswith("--base")]
        if "--base" in sys.argv:  # "--base PATH" as two words
            i = sys.argv.index("--base")
            argv = sys.argv[1:i] + sys.argv[i + 2 :]
        argv = [a for a in argv if a != "--json"]
        if args.drain_quiet is not None:  # the baseline may not know the key
            i = argv.index("--drain-quiet")
            argv = argv[:i] + argv[i + 2 :]
        # PYTHONSAFEPATH and a neutral folder: the device children (forked by a server
        # started with `python -c`) must not find this checkout's devmgr through '' first
        env = {**os.environ, "PYTHONPATH": str(args.base.resolve()), "PYTHONSAFEPATH": "1"}
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--inner"],
            env=env,
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=args.restarts * args.interval + 120,
            check=True,
        )
        results["base"] = json.loads(done.stdout.strip().splitlines()[-1])
    results["this"] = scenario(args)
    for label, r in results.items():
        where = args.base.resolve() if label == "base" else ROOT
        paths = [r["devmgr"], *r["device_core"]]
        if not all(Path(p).is_relative_to(where) for p in paths):
            raise SystemExit(f"the {label} run did not run {where}'s devmgr: {paths}")
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        f"{args.clients} Lazy Pirate clients, {args.workers} echo workers ({args.service * 1000:g} "
        f"ms), {args.restarts} planned restarts every {args.interval:g} s, client timeout "
        f"{args.timeout:g} s x {args.retries}; load average {os.getloadavg()[0]:.2f}"
    )
    for label, r in results.items():
        print(_row(label, r), f"[{r['devmgr']}, drain_quiet {r['drain_quiet']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
