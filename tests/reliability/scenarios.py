"""The reliability scenarios, each a function that asserts what it checks and returns figures.

tests/test_reliability.py runs them short (default run) and long (`-m slow`);
tests/bench/reliability_report.py runs the long versions and prints the README table.
Each function takes a private folder `root` (short: ipc paths must fit in 107 bytes) and
sets XDG_RUNTIME_DIR for the processes it starts only through the environment it is given.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

import devmgr

from .support import (
    Endpoints,
    ManagerProc,
    Traffic,
    alive,
    device_children,
    endpoints,
    manager_settings,
    num_fds,
    pipeline_device,
    rss_mib,
    wait_until,
    write_config,
    zombies,
)

# What each injected fault must show up as in the device's `device.exited` event.
FAULTS: dict[str, tuple[str, int | None, int | None]] = {
    # fault: (reason, signal, exit code)
    "SIGKILL": ("killed", signal.SIGKILL, None),
    "SIGSTOP": ("unresponsive", signal.SIGKILL, None),  # the health check's SIGKILL
    "SIGTERM": ("exited", None, 0),  # drains and exits 0; policy "always" restarts it
    "SIGSEGV": ("killed", signal.SIGSEGV, None),
}
# A device that ran this long is restarted at once (the supervisor's stable_after).
STABLE_AFTER = 1.0


def _pause(seconds: float) -> None:
    """Pace an injector or a load (a rate, not a wait for a condition)."""
    threading.Event().wait(seconds)


def chaos(
    root: Path,
    *,
    devices: int = 6,
    duration: float = 5.0,
    rate: float = 200.0,
    fault_interval: float = 0.1,
    seed: int = 1,
    fd_bound: int = 8,
    rss_bound_mib: float = 16.0,
) -> dict[str, Any]:
    """Inject random SIGKILL/SIGSTOP/SIGTERM/SIGSEGV into devices under traffic; check all."""
    eps = [endpoints(root, f"d{i:02d}") for i in range(devices)]
    restart = {"policy": "always", "max_restarts": 100_000, "window": 60.0}
    config = {
        "manager": manager_settings(root, health_interval=0.1, stop_timeout=2.0),
        "devices": {
            ep.name: pipeline_device(ep, restart=restart, health={"ping_timeout": 0.3})
            for ep in eps
        },
    }
    path = write_config(root / "chaos.toml", config)
    rng = random.Random(seed)
    injected: dict[str, list[str]] = {ep.name: [] for ep in eps}
    control = config["manager"]["control"]
    with (
        ManagerProc(path, control=control) as mgr,
        Traffic(eps, rate=rate, events=config["manager"]["events"]) as traffic,
    ):
        mgr.wait_running(devices)
        traffic.wait_flowing(timeout=10)
        client = mgr.client(timeout=5.0)

        def all_stable() -> bool:
            devs = client.status()["devices"]
            return all(d["state"] == "running" and d["uptime_s"] >= STABLE_AFTER for d in devs)

        wait_until(all_stable, timeout=10, interval=0.05, what="every device stable")
        fds_before, rss_before = num_fds(mgr.pid), rss_mib(mgr.pid)
        faulted_pid: dict[str, int] = {}
        started = time.monotonic()
        while time.monotonic() - started < duration:
            devs = {d["name"]: d for d in client.status()["devices"]}
            eligible = [
                name
                for name, d in devs.items()
                if d["state"] == "running"
                and d["uptime_s"] >= STABLE_AFTER
                and d["pid"] != faulted_pid.get(name)
            ]
            if eligible:
                name = rng.choice(eligible)
                fault = rng.choice(list(FAULTS))
                pid = devs[name]["pid"]
                os.kill(pid, getattr(signal, fault))
                faulted_pid[name] = pid
                injected[name].append(fault)
            _pause(fault_interval)
        chaos_s = time.monotonic() - started

        def recovered() -> dict[str, dict[str, Any]]:
            devs = {d["name"]: d for d in client.status()["devices"]}
            for name, d in devs.items():
                assert d["state"] == "running", (name, d["state"], d["last_exit"])
                assert d["pid"] != faulted_pid.get(name), (name, "still the faulted pid")
                assert d["restarts"] == len(injected[name]), (name, d["restarts"], injected[name])
            return devs

        recover_started = time.monotonic()
        devs = wait_until(recovered, timeout=15, interval=0.05, what="recovery")
        recovery_s = time.monotonic() - recover_started
        traffic.wait_flowing(timeout=5)
        assert client.ping() == "pong"
        # every exit is the one its fault must cause, in order
        wait_until(
            lambda: (
                sum(e["event"] == "device.exited" for e in traffic.events)
                >= sum(map(len, injected.values()))
            ),
            timeout=5,
            what="every exit event",
        )
        seen: dict[str, list[tuple[Any, ...]]] = {ep.name: [] for ep in eps}
        for event in traffic.events:
            if event["event"] == "device.exited":
                seen[event["device"]].append((event["reason"], event["signal"], event["code"]))
        for name, faults in injected.items():
            assert seen[name] == [FAULTS[f] for f in faults], (name, faults, seen[name])
        assert not zombies(mgr.pid), f"zombies: {zombies(mgr.pid)}"
        children = device_children(mgr.pid)
        assert sorted(children) == sorted(d["pid"] for d in devs.values()), (children, devs)
        fds_after, rss_after = num_fds(mgr.pid), rss_mib(mgr.pid)
        assert fds_after - fds_before <= fd_bound, (fds_before, fds_after)
        assert rss_after - rss_before <= rss_bound_mib, (rss_before, rss_after)
        lost_in_flight = sum(f.refused for f in traffic.flows.values())
        figures = {
            "devices": devices,
            "chaos_s": round(chaos_s, 1),
            "seed": seed,
            "faults": dict(Counter(f for fs in injected.values() for f in fs)),
            "faults_total": sum(map(len, injected.values())),
            "faults_max_per_device": max(map(len, injected.values())),
            "restarts_total": sum(d["restarts"] for d in devs.values()),
            "recovery_s": round(recovery_s, 2),
            "manager_fds": [fds_before, fds_after],
            "manager_rss_mib": [round(rss_before, 1), round(rss_after, 1)],
            "messages_sent": sum(f.sent for f in traffic.flows.values()),
            "messages_received": sum(f.received for f in traffic.flows.values()),
            "sends_refused": lost_in_flight,
            "duplicates": sum(f.duplicates for f in traffic.flows.values()),
        }
        assert mgr.terminate(timeout=10) == 0
    return figures


def _pipeline_config(
    root: Path, eps: list[Endpoints], *, stop_timeout: float = 2.0, **device: Any
) -> dict[str, Any]:
    return {
        "manager": manager_settings(root, stop_timeout=stop_timeout),
        "devices": {ep.name: pipeline_device(ep, **device) for ep in eps},
    }


def manager_death(
    root: Path,
    *,
    devices: int = 6,
    rate: float = 500.0,
    load_s: float = 0.5,
    stop_one: bool = False,
) -> dict[str, Any]:
    """SIGKILL a loaded manager: its devices go within 2 s; a new one runs them again.

    With `stop_one`, one device is SIGSTOPped just before: only a SIGKILL death signal
    ends a stopped process. The manager then runs as a session leader, as under systemd.
    """
    eps = [endpoints(root, f"k{i:02d}") for i in range(devices)]
    config = _pipeline_config(root, eps)
    path = write_config(root / "death.toml", config)
    control = config["manager"]["control"]
    with Traffic(eps, rate=rate) as traffic:
        with ManagerProc(path, control=control, new_session=stop_one) as mgr:
            mgr.wait_running(devices)
            traffic.wait_flowing(timeout=10)
            _pause(load_s)
            doomed = {p.pid for p in psutil.Process(mgr.pid).children(recursive=True)}
            device_pids = set(device_children(mgr.pid))
            assert len(device_pids) == devices, device_pids
            assert mgr.proc is not None
            if stop_one:
                os.kill(min(device_pids), signal.SIGSTOP)
            mgr.proc.kill()
            killed_at = time.monotonic()
            mgr.proc.wait(5)
            wait_until(lambda: not alive(device_pids), timeout=2.0, what="devices gone")
            devices_gone_s = time.monotonic() - killed_at
            wait_until(lambda: not alive(doomed), timeout=2.0, what="helpers gone")
            all_gone_s = time.monotonic() - killed_at
        with ManagerProc(path, control=control) as mgr2:
            started_at = time.monotonic()
            mgr2.wait_running(devices, timeout=10)
            startup_s = time.monotonic() - started_at
            traffic.wait_flowing(timeout=5)
            assert mgr2.terminate(timeout=10) == 0
    assert devices_gone_s <= 2.0 and startup_s <= 5.0
    return {
        "devices": devices,
        "stopped_device": stop_one,
        "devices_gone_s": round(devices_gone_s, 3),
        "all_children_gone_s": round(all_gone_s, 3),
        "restart_to_all_running_s": round(startup_s, 3),
    }


def _catch_leftovers(eps: list[Endpoints], traffic: Traffic, quiet: float = 0.3) -> dict[str, int]:
    """Bind a PULL where each (gone) device was and count what was still in the sender."""
    import zmq

    counts: dict[str, int] = {}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        catchers = {}
        for ep in eps:
            sock = ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ep.in_ep)
            catchers[ep.name] = sock
            counts[ep.name] = 0
        poller = zmq.Poller()
        for sock in catchers.values():
            poller.register(sock, zmq.POLLIN)
        by_sock = {sock: name for name, sock in catchers.items()}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = poller.poll(int(quiet * 1000))
            if not ready:
                break
            for sock, _ in ready:
                while True:
                    try:
                        sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    counts[by_sock[sock]] += 1
    finally:
        ctx.destroy(linger=0)
    return counts


def graceful_shutdown(
    root: Path,
    *,
    devices: int = 4,
    rate: float | None = None,
    load_s: float = 0.5,
    stop_timeout: float = 2.0,
) -> dict[str, Any]:
    """SIGTERM a loaded manager: exit 0 in time, no child left, count the drained messages."""
    eps = [endpoints(root, f"g{i:02d}") for i in range(devices)]
    config = _pipeline_config(root, eps, stop_timeout=stop_timeout)
    path = write_config(root / "graceful.toml", config)
    with Traffic(eps, rate=rate) as traffic:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            mgr.wait_running(devices)
            traffic.wait_flowing(timeout=10)
            _pause(load_s)
            doomed = {p.pid for p in psutil.Process(mgr.pid).children(recursive=True)}
            device_pids = set(device_children(mgr.pid))
            assert len(device_pids) == devices
            traffic.stop_sending()
            received_at_term = sum(traffic.received().values())
            assert mgr.proc is not None
            mgr.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic()
            code = mgr.proc.wait(stop_timeout + 5)
            exit_s = time.monotonic() - term_at
            log = mgr.log()
        assert code == 0, log[-2000:]
        assert exit_s <= stop_timeout + 1.0, exit_s
        # the devices are gone before the manager exits; its zygote is waited for at exit
        assert not alive(device_pids), f"devices left behind: {alive(device_pids)}"
        wait_until(lambda: not alive(doomed), timeout=1.0, what="helpers gone")
        traffic.wait_quiet(quiet=0.5)
        sent = sum(f.sent for f in traffic.flows.values())
        received = sum(f.received for f in traffic.flows.values())
        duplicates = sum(f.duplicates for f in traffic.flows.values())
        # the queues of the sender (which connects) keep what never reached a device
        leftover = sum(_catch_leftovers(eps, traffic).values())
    in_flight = sent - received_at_term
    return {
        "devices": devices,
        "exit_code": code,
        "exit_s": round(exit_s, 3),
        "sent": sent,
        "in_flight_at_sigterm": in_flight,
        "delivered_after_sigterm": received - received_at_term,
        "still_in_sender": leftover,
        "dropped_in_devices": sent - received - leftover,
        "duplicates": duplicates,
    }


def hung_device_at_shutdown(
    root: Path, *, devices: int = 3, stop_timeout: float = 2.0
) -> dict[str, Any]:
    """SIGTERM the manager while one device is SIGSTOPped: escalation ends it in time."""
    eps = [endpoints(root, f"h{i}") for i in range(devices)]
    config = _pipeline_config(root, eps, stop_timeout=stop_timeout)
    path = write_config(root / "hung.toml", config)
    with Traffic(eps, rate=500.0) as traffic:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            devs = mgr.wait_running(devices)
            traffic.wait_flowing(timeout=10)
            doomed = {p.pid for p in psutil.Process(mgr.pid).children(recursive=True)}
            device_pids = {d["pid"] for d in devs.values()}
            hung = devs[eps[0].name]["pid"]
            os.kill(hung, signal.SIGSTOP)
            assert mgr.proc is not None
            mgr.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic()
            code = mgr.proc.wait(stop_timeout + 5)
            exit_s = time.monotonic() - term_at
            log = mgr.log()
        assert code == 0, log[-2000:]
        assert exit_s <= stop_timeout + 1.0, exit_s
        assert not alive(device_pids), f"devices left behind: {alive(device_pids)}"
        wait_until(lambda: not alive(doomed), timeout=1.0, what="helpers gone")
    return {"devices": devices, "hung": 1, "exit_code": code, "exit_s": round(exit_s, 3)}


def planned_restart(
    root: Path,
    *,
    device_binds: bool,
    restarts: int = 3,
    rate: float = 2000.0,
    via: str = "client",
) -> dict[str, Any]:
    """Restart a device by command while traffic flows through it; count what is lost."""
    ep = endpoints(root, "r", device_binds=device_binds)
    config = _pipeline_config(root, [ep])
    path = write_config(root / "restart.toml", config)
    control = config["manager"]["control"]
    with Traffic([ep], rate=rate) as traffic, ManagerProc(path, control=control) as mgr:
        mgr.wait_running(1)
        traffic.wait_flowing(timeout=10)
        client = mgr.client(timeout=10)
        pids = [client.status()["devices"][0]["pid"]]
        for _ in range(restarts):
            _pause(0.2)  # traffic through the current child before the next restart
            if via == "cli":
                import subprocess
                import sys

                done = subprocess.run(
                    [sys.executable, "-m", "devmgr", "restart", "r", "-e", control],
                    capture_output=True,
                    timeout=20,
                    check=False,
                    cwd=root,  # not the checkout: `-m devmgr` runs the installed package
                )
                assert done.returncode == 0, done.stderr.decode()
            else:
                client.restart("r")
            now = client.status()["devices"][0]
            assert now["state"] == "running" and now["pid"] not in pids, now
            pids.append(now["pid"])
            traffic.wait_flowing(timeout=5)
        _pause(0.2)
        traffic.stop_sending()
        traffic.wait_quiet(quiet=0.5)
        flow = traffic.flows["r"]
        figures = {
            "topology": "device binds" if device_binds else "device connects",
            "restarts": restarts,
            "via": via,
            "sent": flow.sent,
            "received": flow.received,
            "lost": flow.missing(),
            "lost_after_forwarding": flow.lost_after_forwarding(),
            "missing": flow.missing_seqs()[:50],
            "duplicates": flow.duplicates,
            "refused_while_down": flow.refused,
        }
        assert mgr.terminate(timeout=10) == 0
    return figures


# ---------------------------------------------------------------------------- 5. burst


def free_port() -> int:
    """Return a loopback TCP port nobody listens on now (another process may take it later)."""
    import socket as pysocket

    with pysocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sink_thread(
    sock: Any, count: int, idle_timeout: float
) -> tuple[threading.Thread, list[tuple[int, int, int, int]]]:
    """Receive `count` messages in C on a thread; the result list gets sink()'s tuple."""
    from devmgr import _loadgen

    result: list[tuple[int, int, int, int]] = []
    thread = threading.Thread(
        target=lambda: result.append(_loadgen.sink(sock, count, idle_timeout)), daemon=True
    )
    thread.start()
    return thread, result


def burst(
    root: Path,
    *,
    count: int = 200_000,
    size: int = 64,
    runs: int = 1,
    transport: str = "tcp",
    check: bool = True,
    in_rcvhwm: int | None = None,
) -> dict[str, Any]:
    """A producer sends `count` messages as fast as it can and disconnects at once."""
    import zmq

    from devmgr import _loadgen

    ep = endpoints(root, "b")
    if transport == "tcp":
        ep = Endpoints(
            "b",
            f"tcp://127.0.0.1:{free_port()}",
            f"tcp://127.0.0.1:{free_port()}",
            f"tcp://127.0.0.1:{free_port()}",
        )
    in_options = {"rcvhwm": in_rcvhwm} if in_rcvhwm is not None else None
    config = _pipeline_config(root, [ep], in_options=in_options)
    path = write_config(root / "burst.toml", config)
    results = []
    with ManagerProc(path, control=config["manager"]["control"]) as mgr:
        mgr.wait_running(1)
        for _ in range(runs):
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            try:
                sink = ctx.socket(zmq.PULL)
                sink.setsockopt(zmq.LINGER, 0)
                sink.connect(ep.out_ep)
                reader, received = _sink_thread(sink, count, 3.0)
                # The producer's own context: terminating it is the disconnect. Its linger
                # lets its queue reach the device (dropping that would be the producer's
                # loss, not the device's); term() is bounded by that linger.
                pctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
                producer = pctx.socket(zmq.PUSH)
                producer.setsockopt(zmq.LINGER, 10_000)
                producer.connect(ep.in_ep)
                sent, first_ns, last_ns = _loadgen.send(producer, count, size, 10.0)
                producer.close()
                pctx.term()
                reader.join(20)
                assert received, "the sink never returned"
                got = received[0][0]
                results.append(
                    {
                        "sent": sent,
                        "received": got,
                        "send_rate": round(sent / max(1e-9, (last_ns - first_ns) / 1e9)),
                    }
                )
            finally:
                ctx.destroy(linger=0)
        devs = mgr.devices()
        assert devs["b"]["restarts"] == 0
        assert mgr.terminate(timeout=10) == 0
    if check:
        for r in results:
            assert r["sent"] == count and r["received"] == count, results
    return {
        "transport": transport,
        "in_rcvhwm": in_rcvhwm,
        "runs": runs,
        "count": count,
        "lost": [r["sent"] - r["received"] for r in results],
        "send_rate": [r["send_rate"] for r in results],
    }


# ---------------------------------------------------------------------------- 7. exhaustion


def memory_limit(root: Path, *, limit_mb: int = 80) -> dict[str, Any]:
    """Grow a device past max_rss_mb (a queue to a peer that never comes); expect `memory`."""
    import socket as pysocket

    import zmq

    hole = pysocket.socket()
    hole.bind(("127.0.0.1", 0))
    hole_port = hole.getsockname()[1]
    hole.close()  # nobody listens there: the device's PUSH queues for a peer that never comes
    in_ep = f"ipc://{root}/m-in"
    table = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [in_ep], "options": {"rcvhwm": 0}},
        "out": {
            "type": "PUSH",
            "connect": [f"tcp://127.0.0.1:{hole_port}"],
            "options": {"sndhwm": 0},
        },
        "health": {"max_rss_mb": limit_mb},
        "restart": {"backoff_initial": 0.05},
    }
    config = {"manager": manager_settings(root), "devices": {"m": table}}
    path = write_config(root / "memory.toml", config)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            (first_pid,) = [d["pid"] for d in mgr.wait_running(1).values()]
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDTIMEO, 100)
            push.connect(in_ep)
            blob = b"x" * 65536
            started = time.monotonic()
            sent = 0
            d: dict[str, Any] = {}
            while time.monotonic() - started < 20:
                d = mgr.devices()["m"]
                if d["last_exit"] is not None:
                    break
                for _ in range(100):  # bounded: at most ~6.5 MB a round
                    try:
                        push.send(blob)
                        sent += 1
                    except zmq.Again:
                        break
            tripped_s = time.monotonic() - started
            # what is still queued in our socket would fill the next child up again
            push.close(linger=0)
            assert d["last_exit"] is not None, "the memory limit never tripped"
            assert d["last_exit"]["reason"] == "memory", d["last_exit"]
            # a child younger than stable_after comes back after a backoff
            after = wait_until(
                lambda: (x := mgr.devices()["m"])["state"] == "running" and x, timeout=10
            )
            assert after["pid"] != first_pid
            assert after["restarts"] == 1, after
            assert after["last_exit"]["reason"] == "memory", after
            log = mgr.log()
            assert "device.unhealthy m" in log and "reason=memory" in log, log[-2000:]
            assert mgr.terminate(timeout=10) == 0
    finally:
        ctx.destroy(linger=0)
    return {
        "limit_mb": limit_mb,
        "sent_mib": round(sent * 65536 / (1 << 20)),
        "tripped_after_s": round(tripped_s, 2),
    }


def _device_pid(mgr: ManagerProc, name: str) -> int:
    return int(mgr.devices()[name]["pid"])


def stalled_monitor(
    root: Path,
    *,
    count: int = 100_000,
    size: int = 256,
    rounds: int = 1,
    min_ratio: float | None = None,
) -> dict[str, Any]:
    """A monitor subscriber that stops reading: the data path keeps going, memory is bounded.

    Every message still reaches the sink (run_once asserts it, each within the sender's
    stall timeout) and the device's RSS stays flat. With `min_ratio` the rate beside a
    stalled subscriber must also be at least that share of the rate with none: a speed
    figure, so only the slow variant, with several rounds, asserts it.
    """
    import statistics

    import zmq

    from devmgr import _loadgen

    ep = endpoints(root, "s")
    config = _pipeline_config(root, [ep])
    path = write_config(root / "stalled-mon.toml", config)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rates: dict[str, list[float]] = {"none": [], "reading": [], "stalled": []}
    try:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            mgr.wait_running(1)
            pid = _device_pid(mgr, "s")
            sink = ctx.socket(zmq.PULL)
            sink.setsockopt(zmq.LINGER, 0)
            sink.connect(ep.out_ep)
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(ep.in_ep)

            def run_once() -> float:
                reader, got = _sink_thread(sink, count, 3.0)
                sent, first_ns, _ = _loadgen.send(push, count, size, 10.0)
                reader.join(30)
                assert sent == count and got and got[0][0] == count, (sent, got)
                return count / max(1e-9, (got[0][3] - first_ns) / 1e9)

            for _ in range(rounds):
                rates["none"].append(run_once())  # the baseline: nobody subscribed
            # a subscriber that reads: the monitor costs what it costs
            reader_sub = ctx.socket(zmq.SUB)
            reader_sub.setsockopt(zmq.LINGER, 0)
            reader_sub.setsockopt(zmq.SUBSCRIBE, b"")
            reader_sub.connect(ep.mon_ep or "")
            mon_drained: list[Any] = []
            stop_r, stop_w = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
            for s in (stop_r, stop_w):
                s.setsockopt(zmq.LINGER, 0)
            stop_r.bind(f"inproc://stop-{id(stop_r)}")
            stop_w.connect(f"inproc://stop-{id(stop_r)}")
            draining = threading.Thread(
                target=lambda: mon_drained.append(_loadgen.drain(reader_sub, stop_r, 0, 30.0)),
                daemon=True,
            )
            draining.start()
            for _ in range(rounds):
                rates["reading"].append(run_once())
            stop_w.send(b"stop")
            draining.join(10)
            reader_sub.close()
            # a subscriber that stops: first proves its subscription is live, then never reads
            stalled = ctx.socket(zmq.SUB)
            stalled.setsockopt(zmq.LINGER, 0)
            stalled.setsockopt(zmq.RCVHWM, 100)
            stalled.setsockopt(zmq.SUBSCRIBE, b"")
            stalled.connect(ep.mon_ep or "")

            def subscribed() -> bool:
                push.send(b"probe")
                assert sink.poll(1000) and sink.recv() == b"probe"
                return stalled.poll(20) != 0

            wait_until(subscribed, timeout=5, what="the stalled subscriber's subscription")
            stalled.recv_multipart()
            rss_before = rss_mib(pid)
            for _ in range(rounds):
                rates["stalled"].append(run_once())
            rss_after = rss_mib(pid)
            assert _device_pid(mgr, "s") == pid
            assert mgr.devices()["s"]["restarts"] == 0
            for s in (stalled, sink, push, stop_r, stop_w):
                s.close()
            assert mgr.terminate(timeout=10) == 0
    finally:
        ctx.destroy(linger=0)
    baseline = statistics.median(rates["none"])
    reading = statistics.median(rates["reading"])
    stalled_rate = statistics.median(rates["stalled"])
    ratio = stalled_rate / baseline
    if min_ratio is not None:
        assert ratio >= min_ratio, rates
    assert rss_after - rss_before <= 16, (rss_before, rss_after)
    return {
        "count": count,
        "size": size,
        "rounds": rounds,
        "rate_no_sub": round(baseline),
        "rate_reading_sub": round(reading),
        "rate_stalled_sub": round(stalled_rate),
        "ratio": round(ratio, 2),
        "device_rss_mib": [round(rss_before, 1), round(rss_after, 1)],
    }


def stalled_receiver(
    root: Path, *, size: int = 1024, hwm: int = 1000, slack_mib: float = 4.0
) -> dict[str, Any]:
    """A receiver that stops reading: the device pushes back within its HWMs, loses nothing."""
    import zmq

    ep = endpoints(root, "h", mon=False)
    config = {
        "manager": manager_settings(root),
        "devices": {
            "h": pipeline_device(ep, in_options={"rcvhwm": hwm}, out_options={"sndhwm": hwm})
        },
    }
    path = write_config(root / "stalled-recv.toml", config)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            mgr.wait_running(1)
            pid = _device_pid(mgr, "h")
            receiver = ctx.socket(zmq.PULL)
            receiver.setsockopt(zmq.LINGER, 0)
            receiver.setsockopt(zmq.RCVHWM, hwm)
            receiver.connect(ep.out_ep)
            sender = ctx.socket(zmq.PUSH)
            sender.setsockopt(zmq.LINGER, 0)
            sender.setsockopt(zmq.SNDHWM, hwm)
            sender.connect(ep.in_ep)
            # the receiver is connected once a probe goes through
            sender.send(b"probe")
            assert receiver.poll(5000) and receiver.recv() == b"probe"
            rss_before = rss_mib(pid)
            payload = b"p" * size
            accepted = 0
            # Bounded: send until the queues refuse for 0.5 s, or 100x the HWM sum.
            limit = 100 * 4 * hwm
            while accepted < limit:
                try:
                    sender.send(payload, zmq.NOBLOCK)
                    accepted += 1
                except zmq.Again:
                    if not sender.poll(500, zmq.POLLOUT):
                        break
            rss_full = rss_mib(pid)
            stats = mgr.client().stats("h")
            assert accepted < limit, "the device never pushed back"
            kernel_allowance = int(slack_mib * (1 << 20) / size)
            bound = 4 * hwm + kernel_allowance
            assert accepted <= bound, (accepted, bound)
            assert rss_full - rss_before <= 4 * hwm * size / (1 << 20) + 8, (rss_before, rss_full)
            # everything accepted is still there, and arrives once the receiver reads
            received = 0
            while receiver.poll(1000):
                receiver.recv()
                received += 1
            assert received == accepted, (received, accepted)
            assert mgr.devices()["h"]["restarts"] == 0
            for s in (receiver, sender):
                s.close()
            assert mgr.terminate(timeout=10) == 0
    finally:
        ctx.destroy(linger=0)
    return {
        "hwm_each": hwm,
        "size": size,
        "accepted_before_pushback": accepted,
        "device_in_received_while_stalled": stats["in_msgs_received"],
        "device_out_sent_while_stalled": stats["out_msgs_sent"],
        "bound": bound,
        "device_rss_mib": [round(rss_before, 1), round(rss_full, 1)],
        "received_after": received,
    }


# ---------------------------------------------------------------------------- 6. bad input

ERROR_CODES = {"bad_request", "unknown_command", "unknown_device", "invalid_spec", "too_large"}


def _fuzz_request(rng: random.Random) -> tuple[list[bytes], str]:
    """Draw one malformed or refused control request and the error code it must get.

    Nothing here is a valid command that changes anything: the manager under load must
    answer each with an error and leave its devices alone.
    """
    import json

    def frame(obj: Any) -> list[bytes]:
        return [json.dumps(obj).encode()]

    choice = rng.randrange(14)
    if choice == 0:
        return [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))], "bad_request"
    if choice == 1:
        text = json.dumps({"v": 1, "id": 1, "cmd": "status"})
        return [text[: rng.randrange(1, len(text))].encode()], "bad_request"
    if choice == 2:
        return frame(rng.choice([[], [1, 2], 3, "status", None, True, 1.5])), "bad_request"
    if choice == 3:
        request = {"id": rng.randrange(100), "cmd": "ping"}
        v = rng.choice([None, 0, 2, "1", 1.5, [1]])
        if v is not None:
            request["v"] = v
        return frame(request), "bad_request"
    if choice == 4:
        cmd = rng.choice(["", "STATUS", "exec", "status ", "__class__", "x" * 300, "\u00e9t\u00e9"])
        return frame({"v": 1, "id": 4, "cmd": cmd}), "unknown_command"
    if choice == 5:
        return frame({"v": 1, "id": 5, "cmd": rng.choice([1, None, ["ping"], {"a": 1}])}), (
            "bad_request"
        )
    if choice == 6:
        args = rng.choice([[], "names", 7, None, [{"names": ["*"]}]])
        return frame({"v": 1, "id": 6, "cmd": "status", "args": args}), "bad_request"
    if choice == 7:
        cmd, args = rng.choice(
            [
                ("status", {"names": 5}),
                ("start", {"names": "x"}),
                ("stop", {}),
                ("restart", {"names": [1, 2]}),
                ("pause", {"name": 123}),
                ("resume", {}),
                ("stats", {"name": None}),
                ("remove", {"name": ["a"]}),
                ("add", {"spec": "not a table"}),
            ]
        )
        return frame({"v": 1, "id": 7, "cmd": cmd, "args": args}), "bad_request"
    if choice == 8:
        cmd, args = rng.choice(
            [
                ("status", {"names": ["nope"]}),
                ("start", {"names": ["nope"]}),
                ("stop", {"names": ["nope", "also-nope"]}),
                ("restart", {"names": ["nope"]}),
                ("pause", {"name": "nope"}),
                ("stats", {"name": "nope"}),
                ("remove", {"name": "nope"}),
            ]
        )
        return frame({"v": 1, "id": 8, "cmd": cmd, "args": args}), "unknown_device"
    if choice == 9:
        spec = rng.choice(
            [
                {"name": "fz", "kind": "streamer", "in": {"type": "ROUTR"}},
                {"name": "fz", "kind": "queue"},
                {"name": "bad name!", "in": {"type": "PULL"}, "out": {"type": "PUSH"}},
                {"name": "fz", "in": {"type": "PULL", "bind": ["tcp://nowhere:x"]}},
            ]
        )
        return frame({"v": 1, "id": 9, "cmd": "add", "args": {"spec": spec}}), "invalid_spec"
    if choice == 10:
        return [*[b"x", b"y"][: rng.randrange(1, 3)], b"z"], "bad_request"
    if choice == 11:
        depth = rng.choice([100, 10_000, 200_000])
        return [b"[" * depth + b"]" * depth], "bad_request"
    if choice == 12:
        blob = json.dumps({"v": 1, "id": 12, "cmd": "ping", "pad": "x" * (1 << 20)})
        return [blob.encode()], "too_large"
    return [b"\xff\xfe" + "\u2603".encode() * rng.randrange(1, 50)], "bad_request"


def control_fuzz(
    root: Path, *, requests: int = 300, devices: int = 3, seed: int = 7, rate: float = 500.0
) -> dict[str, Any]:
    """Malformed control requests against a manager under load: errors, no harm done."""
    import json

    import zmq

    eps = [endpoints(root, f"f{i}") for i in range(devices)]
    config = _pipeline_config(root, eps)
    path = write_config(root / "fuzz.toml", config)
    control = config["manager"]["control"]
    rng = random.Random(seed)
    codes: Counter[str] = Counter()
    worst_status_ms = 0.0
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with Traffic(eps, rate=rate) as traffic, ManagerProc(path, control=control) as mgr:
            before = mgr.wait_running(devices)
            traffic.wait_flowing(timeout=10)
            fuzzer = ctx.socket(zmq.DEALER)
            fuzzer.setsockopt(zmq.LINGER, 0)
            fuzzer.connect(control)
            client = mgr.client(timeout=5)
            for i in range(requests):
                frames, expected = _fuzz_request(rng)
                # a REQ-style empty delimiter sometimes, as REQ clients send it
                if frames[0] != b"" and rng.random() < 0.2:
                    frames = [b"", *frames]
                fuzzer.send_multipart(frames)
                assert fuzzer.poll(5000), f"no reply to request {i}: {frames[:2]!r}"
                reply_frames = fuzzer.recv_multipart()
                reply = json.loads(reply_frames[-1])
                assert reply["v"] == 1 and reply["ok"] is False, reply
                code = reply["error"]["code"]
                assert code in ERROR_CODES, reply
                # the multipart case and delimiters shift what is parsed: only check the
                # code where the request was one plain frame after the envelope
                if len(frames) == 1 or (frames[0] == b"" and len(frames) == 2):
                    assert code == expected, (frames[-1][:200], reply)
                codes[code] += 1
                if i % 25 == 0:
                    t0 = time.perf_counter()
                    assert client.ping() == "pong"
                    worst_status_ms = max(worst_status_ms, (time.perf_counter() - t0) * 1000)
            # an oversized frame beyond libzmq's cut-off drops that connection, nothing else
            huge = ctx.socket(zmq.DEALER)
            huge.setsockopt(zmq.LINGER, 0)
            huge.connect(control)
            huge.send(b"x" * (17 << 20))
            assert client.ping() == "pong"
            huge.close()
            after = mgr.devices()
            for name, d in after.items():
                assert d["state"] == "running", d
                assert d["pid"] == before[name]["pid"], (name, "restarted")
                assert d["restarts"] == 0
            traffic.stop_sending()
            traffic.wait_quiet(quiet=0.5)
            lost = sum(f.missing() for f in traffic.flows.values())
            assert lost == 0, {n: f.missing() for n, f in traffic.flows.items()}
            fuzzer.close()
            assert mgr.terminate(timeout=10) == 0
    finally:
        ctx.destroy(linger=0)
    return {
        "requests": requests,
        "seed": seed,
        "replies_by_code": dict(codes),
        "worst_ping_ms_during_fuzz": round(worst_status_ms, 2),
        "traffic_lost": 0,
    }


def _bad_configs(root: Path) -> list[tuple[str, dict[str, Any] | str, str]]:
    """Return (id, config, the place its problem must be named at); ipc endpoints only."""
    good_in = {"type": "PULL", "bind": [f"ipc://{root}/bad-in"]}
    good_out = {"type": "PUSH", "bind": [f"ipc://{root}/bad-out"]}
    mgr = manager_settings(root)

    def dev(**table: Any) -> dict[str, Any]:
        return {"kind": "streamer", "in": good_in, "out": good_out, **table}

    return [
        (
            "socket-type",
            {"manager": mgr, "devices": {"x": dev(**{"in": {"type": "ROUTR"}})}},
            "devices.x.in.type",
        ),
        (
            "unknown-option",
            {"manager": mgr, "devices": {"x": dev(**{"in": {**good_in, "options": {"bogus": 1}}})}},
            "devices.x.in.options.bogus",
        ),
        (
            "kind-mismatch",
            {"manager": mgr, "devices": {"x": dev(**{"in": {**good_in, "type": "ROUTER"}})}},
            "devices.x.in.type",
        ),
        (
            "restart-policy",
            {"manager": mgr, "devices": {"x": dev(restart={"policy": "often"})}},
            "devices.x.restart.policy",
        ),
        (
            "bad-endpoint",
            {
                "manager": mgr,
                "devices": {
                    "x": dev(**{"in": {"type": "PULL", "bind": ["tcp://127.0.0.1:notaport"]}})
                },
            },
            "devices.x.in.bind",
        ),
        (
            "health-interval",
            {"manager": {**mgr, "health_interval": -1}, "devices": {"x": dev()}},
            "manager.health_interval",
        ),
        ("duplicate-bind", {"manager": mgr, "devices": {"x": dev(), "y": dev()}}, "devices.y"),
        ("toml-syntax", "[manager\ncontrol = ", "line 1"),
    ]


def bad_configs(root: Path, *, cli_cases: int | None = None) -> dict[str, Any]:
    """Feed bad configs to `devmgr start`, `devmgr validate`, add and reload; all refused."""
    import subprocess
    import sys

    from .support import toml_dump

    cases = _bad_configs(root)
    results: dict[str, Any] = {"cases": len(cases)}
    if cli_cases != 0:
        procs = []
        # a whole interpreter per run: the short version takes a few, the long one all
        for case_id, config, where in cases[:cli_cases]:
            path = root / f"bad-{case_id}.toml"
            path.write_text(config if isinstance(config, str) else toml_dump(config))
            for verb in ("start", "validate"):
                procs.append(
                    (
                        case_id,
                        verb,
                        where,
                        subprocess.Popen(
                            [sys.executable, "-m", "devmgr", verb, "-c", str(path)],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            cwd=root,
                        ),
                    )
                )
        for case_id, verb, where, proc in procs:
            try:
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            text = (out + err).decode()
            assert proc.returncode == 2, (case_id, verb, proc.returncode, text)
            assert where in text, (case_id, verb, where, text)
        # nothing started: no control socket, no device endpoint
        leftovers = [p.name for p in root.iterdir() if not p.name.endswith(".toml")]
        assert not [n for n in leftovers if n in ("control", "events", "bad-in", "bad-out")], (
            leftovers
        )
        results["cli_runs"] = len(procs)
    # add and reload against a running manager: refused, nothing running changes
    ep = endpoints(root, "ok", mon=False)
    good = {"manager": manager_settings(root), "devices": {"ok": pipeline_device(ep)}}
    path = write_config(root / "running.toml", good)
    refused_add = refused_reload = 0
    with (
        Traffic([ep], rate=300) as traffic,
        ManagerProc(path, control=good["manager"]["control"]) as mgr,
    ):
        before = mgr.wait_running(1)
        traffic.wait_flowing(timeout=10)
        client = mgr.client(timeout=10)
        for case_id, config, where in cases:
            if isinstance(config, str):
                continue
            if where.startswith("devices.x"):
                spec = {**config["devices"]["x"], "name": "x"}
                try:
                    client.add(spec)
                except devmgr.ControlError as exc:
                    assert exc.code == "invalid_spec", (case_id, exc.code, exc.message)
                    assert where in exc.message, (case_id, where, exc.message)
                    refused_add += 1
                else:
                    raise AssertionError(f"add accepted {case_id}")
            path.write_text(toml_dump(config))
            try:
                client.reload()
            except devmgr.ControlError as exc:
                assert exc.code == "invalid_spec", (case_id, exc.code, exc.message)
                assert where in exc.message, (case_id, where, exc.message)
                refused_reload += 1
            else:
                raise AssertionError(f"reload accepted {case_id}")
            now = mgr.devices()
            assert list(now) == ["ok"], now
            assert now["ok"]["pid"] == before["ok"]["pid"] and now["ok"]["state"] == "running"
        path.write_text("[manager\n")
        try:
            client.reload()
        except devmgr.ControlError as exc:
            assert exc.code == "invalid_spec" and "line 1" in exc.message, exc.message
            refused_reload += 1
        assert mgr.devices()["ok"]["pid"] == before["ok"]["pid"]
        traffic.wait_flowing(timeout=5)
        assert mgr.terminate(timeout=10) == 0
    results.update({"add_refused": refused_add, "reload_refused": refused_reload})
    return results


def garbage_peers(root: Path, *, rounds: int = 1) -> dict[str, Any]:
    """Send garbage to a ROUTER/DEALER queue from its peers; nothing crashes, traffic flows."""
    import socket as pysocket

    import zmq

    port = free_port()
    front = f"ipc://{root}/q-front"
    back = f"ipc://{root}/q-back"
    table = {
        "kind": "queue",
        "in": {
            "type": "ROUTER",
            "bind": [front, f"tcp://127.0.0.1:{port}"],
            "options": {"maxmsgsize": 4096, "router_mandatory": 1},
        },
        "out": {"type": "DEALER", "bind": [back], "options": {"maxmsgsize": 4096}},
    }
    config = {"manager": manager_settings(root), "devices": {"q": table}}
    path = write_config(root / "garbage.toml", config)
    injected: Counter[str] = Counter()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def sock(kind: int, endpoint: str, **options: Any) -> zmq.Socket[bytes]:
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 10)
        for name, value in options.items():
            s.setsockopt(getattr(zmq, name.upper()), value)
        s.connect(endpoint)
        return s

    try:
        with ManagerProc(path, control=config["manager"]["control"]) as mgr:
            pid = mgr.wait_running(1)["q"]["pid"]
            worker = sock(zmq.DEALER, back)
            good = sock(zmq.REQ, front, rcvtimeo=3000)

            def echo_round_trip(token: bytes) -> None:
                good.send(token)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if worker.poll(100):
                        request = worker.recv_multipart()
                        if request[-1] == token:
                            worker.send_multipart(request)
                            break
                assert good.recv() == token

            echo_round_trip(b"before")
            for _ in range(rounds):
                rude = sock(zmq.DEALER, front)
                # wrong frame counts, towards the worker: many frames, empty frames
                rude.send_multipart([b""] * 3)
                rude.send_multipart([b"f%d" % i for i in range(64)])
                rude.send(b"")
                injected["client_odd_frames"] += 3
                # oversized: libzmq cuts that peer off at maxmsgsize
                rude.send(b"x" * 10_000)
                injected["client_oversized"] += 1
                # replies from the worker that route nowhere (router_mandatory: dropped)
                worker.send_multipart([b"no-such-peer", b"", b"x"])
                worker.send(b"")
                worker.send_multipart([b"\x00" * 300, b"y"])
                injected["worker_unroutable"] += 3
                worker.send(b"w" * 10_000)
                injected["worker_oversized"] += 1
                # bytes that are not ZMTP at all, on the tcp endpoint
                for blob in (
                    os.urandom(512),
                    b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" + bytes(20) + os.urandom(64),
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                ):
                    raw = pysocket.create_connection(("127.0.0.1", port), timeout=2)
                    try:
                        raw.sendall(blob)
                    except OSError:
                        pass  # the device may hang up first
                    finally:
                        raw.close()
                    injected["raw_tcp_garbage"] += 1
                rude.close()
                # drain what the worker got from the rude client; it answers nothing
                while worker.poll(200):
                    worker.recv_multipart()
                echo_round_trip(b"after")
            d = mgr.devices()["q"]
            assert d["state"] == "running", d
            crashed = d["pid"] != pid
            if crashed:  # then it must have been restarted, and the reason logged
                assert d["restarts"] >= 1 and "device.exited q" in mgr.log(), mgr.log()[-2000:]
            for s in (worker, good):
                s.close()
            assert mgr.terminate(timeout=10) == 0
    finally:
        ctx.destroy(linger=0)
    return {"injected": dict(injected), "device_crashed": crashed, "restarts": d["restarts"]}
