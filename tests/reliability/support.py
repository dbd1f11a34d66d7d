"""Building blocks of the reliability scenarios: configs, a manager subprocess, traffic.

Everything here runs on ipc paths (or 127.0.0.1), is bounded in time, and ends only the
processes it started, by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

import devmgr

from conftest import wait_until

# ---------------------------------------------------------------------------- waiting


# ---------------------------------------------------------------------------- configs

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no TOML for {value!r}")


def toml_dump(config: dict[str, Any]) -> str:
    """Write a config dict ({"manager": {...}, "devices": {name: {...}}}) as TOML."""
    lines: list[str] = []
    manager = config.get("manager")
    if manager is not None:
        lines.append("[manager]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in manager.items()]
    for name, table in config.get("devices", {}).items():
        lines.append(f"[devices.{_toml_key(name)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    for key, value in config.items():
        if key not in ("manager", "devices"):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def manager_settings(root: Path, **extra: Any) -> dict[str, Any]:
    """Return a [manager] table with control and events on ipc paths under `root`."""
    return {
        "control": f"ipc://{root}/control",
        "events": f"ipc://{root}/events",
        "health_interval": 0.1,
        "stop_timeout": 2.0,
        **extra,
    }


@dataclass(frozen=True)
class Endpoints:
    """Where a device's peers meet it; `device_binds` says who binds."""

    name: str
    in_ep: str
    out_ep: str
    mon_ep: str | None
    device_binds: bool = True


def endpoints(root: Path, name: str, *, mon: bool = True, device_binds: bool = True) -> Endpoints:
    return Endpoints(
        name,
        f"ipc://{root}/{name}-in",
        f"ipc://{root}/{name}-out",
        f"ipc://{root}/{name}-mon" if mon else None,
        device_binds,
    )


def pipeline_device(
    ep: Endpoints,
    *,
    restart: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    in_options: dict[str, Any] | None = None,
    out_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A PULL -> PUSH device (monitored_queue with a PUB monitor, or a streamer)."""
    side = "bind" if ep.device_binds else "connect"
    table: dict[str, Any] = {
        "kind": "monitored_queue" if ep.mon_ep else "streamer",
        "in": {"type": "PULL", side: [ep.in_ep], "options": dict(in_options or {})},
        "out": {"type": "PUSH", side: [ep.out_ep], "options": dict(out_options or {})},
    }
    if ep.mon_ep:
        table["mon"] = {"type": "PUB", "bind": [ep.mon_ep]}
    if restart:
        table["restart"] = restart
    if health:
        table["health"] = health
    return table


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(toml_dump(config))
    return path


# ---------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def zombies(pid: int) -> list[int]:
    """Return the PIDs of zombie processes below `pid` (exited, never reaped)."""
    out = []
    for proc in descendants(pid):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pids: Iterator[int] | list[int] | set[int]) -> list[int]:
    """Return the PIDs of `pids` that still exist and are not zombies."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


class ManagerProc:
    """`python -m devmgr start -c FILE` as a subprocess, its log in a file beside it."""

    def __init__(self, config_path: Path, *, control: str, new_session: bool = False) -> None:
        self.config_path = config_path
        # systemd starts a service as a session leader; a test can do the same
        self.new_session = new_session
        self.control = control
        self.log_path = config_path.with_suffix(f".{int(time.time() * 1e6)}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[devmgr.Client] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ManagerProc:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devmgr", "start", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
                # `-m devmgr` from the checkout would shadow an installed (built) package
                cwd=self.config_path.parent,
            )
        return self

    def client(self, timeout: float = 5.0) -> devmgr.Client:
        client = devmgr.Client(self.control, timeout=timeout)
        self._clients.append(client)
        return client

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        with devmgr.Client(self.control, timeout=timeout) as client:
            return client.status()

    def devices(self, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.status(timeout)["devices"]}

    def wait_running(self, count: int, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """Wait until the manager answers with `count` devices, all running."""

        def ready() -> dict[str, dict[str, Any]] | None:
            assert self.proc is not None
            assert self.proc.poll() is None, f"the manager exited: {self.log()[-2000:]}"
            try:
                devices = self.devices(timeout=1.0)
            except devmgr.ManagerUnreachable:
                return None
            assert len(devices) == count, devices
            states = {n: d["state"] for n, d in devices.items()}
            assert all(s == "running" for s in states.values()), states
            return devices

        return wait_until(ready, timeout=timeout, interval=0.05, what="all devices running")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """End the manager by PID if it still runs, and whatever it left, also by PID."""
        for client in self._clients:
            client.close()
        if self.proc is None:
            return
        left = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def __enter__(self) -> ManagerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def device_children(manager_pid: int) -> dict[int, psutil.Process]:
    """Return the manager's live device processes (its zygote's children), by PID."""
    out: dict[int, psutil.Process] = {}
    try:
        helpers = psutil.Process(manager_pid).children()
    except psutil.NoSuchProcess:
        return out
    for helper in helpers:
        try:
            for proc in helper.children():
                if proc.status() != psutil.STATUS_ZOMBIE:
                    out[proc.pid] = proc
        except psutil.Error:
            continue
    return out


# ---------------------------------------------------------------------------- traffic

SEQ = 8  # bytes of sequence number at the head of every test message


@dataclass
class Flow:
    """One device's peers: a sender, a receiver and (optionally) a monitor subscriber."""

    ep: Endpoints
    sender: zmq.Socket[bytes]
    receiver: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes] | None
    sent: int = 0
    refused: int = 0  # sends that met a full queue (EAGAIN): not sent, not counted
    received: int = 0
    duplicates: int = 0
    monitored: int = 0
    tokens: float = 0.0
    last_received_at: float = 0.0
    seen: bytearray = field(default_factory=bytearray)
    monitor_seen: bytearray = field(default_factory=bytearray)
    sending: bool = True

    def take(self, seq: int) -> None:
        if seq >= len(self.seen):
            self.seen.extend(bytes(max(seq + 1 - len(self.seen), 65536)))
        if self.seen[seq]:
            self.duplicates += 1
        else:
            self.seen[seq] = 1
            self.received += 1
        self.last_received_at = time.monotonic()

    def take_monitored(self, seq: int) -> None:
        if seq >= len(self.monitor_seen):
            self.monitor_seen.extend(bytes(max(seq + 1 - len(self.monitor_seen), 65536)))
        self.monitor_seen[seq] = 1
        self.monitored += 1

    def missing_seqs(self) -> list[int]:
        """Return the sequence numbers sent and never received."""
        return [seq for seq in range(self.sent) if seq >= len(self.seen) or not self.seen[seq]]

    def lost_after_forwarding(self) -> int:
        """Count missing messages the monitor saw: forwarded by the device, never received."""
        mon = self.monitor_seen
        return sum(1 for seq in self.missing_seqs() if seq < len(mon) and mon[seq])

    def missing(self) -> int:
        """Count messages sent and never received (the loss, once everything has drained)."""
        return self.sent - self.received


class Traffic:
    """Steady traffic through devices from one thread: send, receive, monitor, count.

    Each message carries a sequence number, so the receiver counts distinct arrivals
    and duplicates. `rate` is messages per second per device; None sends as fast as the
    queues take them. A send that meets a full queue is not retried and not counted.
    """

    def __init__(
        self,
        eps: list[Endpoints],
        *,
        rate: float | None = 200.0,
        size: int = 64,
        events: str | None = None,
        rcvhwm: int = 1000,
        sndhwm: int = 1000,
    ) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.rate = rate
        self.pad = b"x" * max(0, size - SEQ)
        self.flows: dict[str, Flow] = {}
        self.events: list[dict[str, Any]] = []
        self._events_sock: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        for ep in eps:
            sender = self._socket(zmq.PUSH, ep.in_ep, bind=not ep.device_binds)
            sender.setsockopt(zmq.SNDHWM, sndhwm)
            receiver = self._socket(zmq.PULL, ep.out_ep, bind=not ep.device_binds)
            receiver.setsockopt(zmq.RCVHWM, rcvhwm)
            monitor = None
            if ep.mon_ep is not None:
                monitor = self._socket(zmq.SUB, ep.mon_ep, bind=False)
                monitor.setsockopt(zmq.SUBSCRIBE, b"")
            self.flows[ep.name] = Flow(ep, sender, receiver, monitor)
        if events is not None:
            self._events_sock = self._socket(zmq.SUB, events, bind=False)
            self._events_sock.setsockopt(zmq.SUBSCRIBE, b"device.")
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _socket(self, kind: int, endpoint: str, *, bind: bool) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # peers find a restarted device within ~10 ms instead of libzmq's 100 ms
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        return sock

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop_sending(self, names: list[str] | None = None) -> None:
        for name, flow in self.flows.items():
            if names is None or name in names:
                flow.sending = False

    def resume_sending(self) -> None:
        for flow in self.flows.values():
            flow.tokens = 0.0
            flow.sending = True

    def received(self) -> dict[str, int]:
        return {n: f.received for n, f in self.flows.items()}

    def check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the traffic thread failed: {self._error!r}")

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 10.0) -> None:
        """Wait until no flow has received anything for `quiet` seconds."""

        def settled() -> bool:
            self.check()
            last = max((f.last_received_at for f in self.flows.values()), default=0.0)
            return time.monotonic() - last >= quiet

        wait_until(settled, timeout=timeout, interval=0.05, what="traffic to settle")

    def wait_flowing(self, timeout: float = 5.0, names: list[str] | None = None) -> None:
        """Wait until every (named) flow has received something new."""
        before = self.received()
        wanted = names if names is not None else list(self.flows)

        def flowing() -> bool:
            self.check()
            stuck = [n for n in wanted if self.flows[n].received <= before[n]]
            assert not stuck, f"no new messages through {stuck}"
            return True

        wait_until(flowing, timeout=timeout, interval=0.02, what="traffic through every device")

    def _send_some(self, flow: Flow, elapsed: float) -> bool:
        if not flow.sending:
            return False
        if self.rate is None:
            budget = 256
        else:
            # a bucket at most 50 ms deep: an outage is not made up for with a burst
            flow.tokens = min(flow.tokens + elapsed * self.rate, self.rate * 0.05 + 1)
            budget = int(flow.tokens)
        done = 0
        for _ in range(budget):
            try:
                flow.sender.send(flow.sent.to_bytes(SEQ, "little") + self.pad, zmq.NOBLOCK)
            except zmq.Again:
                flow.refused += 1
                break
            flow.sent += 1
            done += 1
        if self.rate is not None:
            flow.tokens -= done
        return done == budget and self.rate is None

    def _run(self) -> None:
        try:
            poller = zmq.Poller()
            owner: dict[zmq.Socket[bytes], tuple[Flow, bool]] = {}
            for flow in self.flows.values():
                poller.register(flow.receiver, zmq.POLLIN)
                owner[flow.receiver] = (flow, False)
                if flow.monitor is not None:
                    poller.register(flow.monitor, zmq.POLLIN)
                    owner[flow.monitor] = (flow, True)
            if self._events_sock is not None:
                poller.register(self._events_sock, zmq.POLLIN)
            last = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                busy = False
                for flow in self.flows.values():
                    busy |= self._send_some(flow, now - last)
                last = now
                for sock, _ in poller.poll(0 if busy else 2):
                    if sock is self._events_sock:
                        self._read_events(sock)
                        continue
                    flow, is_monitor = owner[sock]
                    for _ in range(2000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if is_monitor:
                            flow.take_monitored(int.from_bytes(frames[-1][:SEQ], "little"))
                        else:
                            flow.take(int.from_bytes(frames[-1][:SEQ], "little"))
        except BaseException as exc:  # reported by check(), in the test's thread
            self._error = exc

    def _read_events(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                _topic, body = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.events.append(json.loads(body))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.ctx.destroy(linger=0)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


def num_fds(pid: int) -> int:
    return int(psutil.Process(pid).num_fds())


def env_seed(default: int) -> int:
    """Return a scenario's random seed: $RELIABILITY_SEED when set, else `default`."""
    return int(os.environ.get("RELIABILITY_SEED", default))
