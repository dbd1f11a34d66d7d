"""The manager's operations, on its loop thread: what every control command does.

The control server (devmgr._control) calls these directly; `devmgr.Manager`'s public
methods hand the same calls to the loop from other threads. So the in-process API and
the control protocol cannot drift apart, and neither knows the other.

Operations that take time are coroutines over the fleet's `Pending` results
(devmgr._tasks): they read in the order things happen.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmgr._config import load_config
from devmgr._errors import ControlError
from devmgr._fleet import Device, Fleet
from devmgr._notify import SdNotify
from devmgr._protocol import RawJSON
from devmgr._spec import (
    DeviceSpec,
    ManagerConfig,
    config_conflicts,
    drain_budget_issues,
    format_loc,
    ipc_bind_issues,
    render_issue,
    requirement_issues,
    start_levels,
)
from devmgr._tasks import Pending, gather, settled, spawn
from devmgr._version import __version__
from devmgr._wire import PROTOCOL_VERSION

log = logging.getLogger("devmgr")

Emit = Callable[..., None]
OffLoop = Callable[[Callable[[], Any]], Pending[Any]]
# Devices a reload creates per loop turn before it lets the loop serve other work.
_APPLY_SLICE = 100


class LoopOperations:
    """Every operation of one running manager; loop thread only.

    Args:
        fleet: the supervised devices.
        config: the config the manager runs; `add`, `remove` and `reload` replace it.
        emit: publishes an event (topic, **fields).
        notify: the systemd notifier (RELOADING=1 / READY=1 around a reload).
        off_loop: runs validation proportional to the input (an `add` spec, a reloaded
            file) on another thread, so that it never stalls supervision.
        on_shutdown: called on the loop once a `shutdown` has stopped every device.
    """

    def __init__(
        self,
        fleet: Fleet,
        config: ManagerConfig,
        emit: Emit,
        notify: SdNotify,
        *,
        off_loop: OffLoop,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.emit = emit
        self.notify = notify
        self.off_loop = off_loop
        self.on_shutdown = on_shutdown
        #: The control server's count of replies dropped for a client that read none.
        self.replies_dropped: Callable[[], int] = lambda: 0
        self.started_mono = time.monotonic()
        self.stopping_emitted = False  # a `shutdown` announced manager.stopping

    # ---- lookups ---------------------------------------------------------------------

    def devices(self, names: list[str] | None) -> list[Device]:
        """The named devices ("*" or None: all); unknown_device names every unknown one."""
        devices = self.fleet.devices
        if names is None or "*" in names:
            return [d for d in devices.values() if not d.removed]
        # by name: O(names), not O(devices) (`status NAME` of one device among 1,000)
        found = [devices.get(n) for n in dict.fromkeys(names)]
        unknown = [
            n for n, d in zip(dict.fromkeys(names), found, strict=True) if d is None or d.removed
        ]
        if unknown:
            listed = ", ".join(repr(n if len(n) <= 64 else n[:61] + "...") for n in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ControlError("unknown_device", f"no device named {listed}{more}")
        return [d for d in found if d is not None]

    def device(self, name: str) -> Device:
        return self.devices([name])[0]

    # ---- answers at once -------------------------------------------------------------

    def manager_info(self) -> dict[str, Any]:
        settings = self.config.manager
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "version": __version__,
            "config": str(self.config.path) if self.config.path else None,
            "control": settings.control,
            "events": settings.events,
            "replies_dropped": self.replies_dropped(),
        }

    def status_dict(self, names: list[str] | None = None) -> dict[str, Any]:
        devices = self.devices(names)
        fleet = self.fleet
        return {"manager": self.manager_info(), "devices": [fleet.status_of(d) for d in devices]}

    def status_json(self, names: list[str] | None = None) -> RawJSON:
        """Return the `status` result already encoded (the control socket's fast path)."""
        devices = self.devices(names)
        manager = self.manager_info()
        parts = ",".join(self.fleet.status_json(d) for d in devices)
        head = json.dumps(manager, allow_nan=False)
        return RawJSON(f'{{"manager":{head},"devices":[{parts}]}}')

    def logs_dict(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """The `logs` result: a device's stderr lines from its buffer (docs/protocol.md)."""
        return self.device(name).log.tail(lines, after)

    def version_dict(self) -> dict[str, Any]:
        return {"version": __version__, "protocol": PROTOCOL_VERSION}

    # ---- operations that take time ---------------------------------------------------

    async def start(self, names: list[str]) -> list[dict[str, Any]]:
        """Start the named devices ("*" = all) in dependency order; their status once settled.

        Each one's requirements are started first (as `systemctl start` does): a
        device starts once each device it `requires` is running; devices with no
        order between them start side by side.
        """
        devices = self.devices(names)
        await self.start_ordered(self._with_requirements(devices))
        return [self.fleet.status_of(d) for d in devices]

    def _with_requirements(self, devices: list[Device]) -> list[Device]:
        """`devices` and, before them, every device they require, transitively."""
        known = self.fleet.devices
        seen: dict[str, Device] = {}
        todo = list(devices)
        while todo:
            dev = todo.pop()
            if dev.name in seen:
                continue
            seen[dev.name] = dev
            todo.extend(known[r] for r in dev.spec.requires if r in known and not known[r].removed)
        extra = [n for n in seen if n not in {d.name for d in devices}]
        if extra:
            log.info("starting %s first: required", ", ".join(sorted(extra)))
        return list(seen.values())

    async def stop(self, names: list[str]) -> list[dict[str, Any]]:
        """Stop the named devices, each one's dependents (among them) before it."""
        devices = self.devices(names)
        await self.stop_ordered(devices)
        return [self.fleet.status_of(d) for d in devices]

    def start_ordered(self, devices: list[Device]) -> Pending[None]:
        """Start `devices`, each once the ones it requires (among them) are running.

        A device whose requirement failed is not started: it fails naming that one.
        """
        fleet = self.fleet
        by_name = {d.name: d for d in devices}
        specs = {d.name: d.spec for d in devices}
        done: dict[str, Pending[None]] = {}

        async def one(dev: Device) -> None:
            for req in dict.fromkeys(dev.spec.requires):
                if req in done:
                    error = await settled_error(done[req])
                    if error is not None:
                        raise ControlError(
                            error.code,
                            f"{dev.name} not started: it requires {req}, which did not start",
                        )
            await fleet.start(dev)

        for level in start_levels(specs):
            for name in level:
                done[name] = spawn(one(by_name[name]))
        return gather(done.values())

    def stop_ordered(
        self, devices: list[Device], *, remove: Callable[[Device], Pending[None]] | None = None
    ) -> Pending[None]:
        """Stop (or `remove`) `devices`, each once its dependents among them are stopped.

        A dependent's failure to stop does not hold back the device it requires.
        """
        act = remove if remove is not None else self.fleet.stop
        by_name = {d.name: d for d in devices}
        specs = {d.name: d.spec for d in devices}
        dependents: dict[str, list[str]] = {n: [] for n in by_name}
        for name, spec in specs.items():
            for req in dict.fromkeys(spec.requires):
                if req in dependents and req != name:
                    dependents[req].append(name)
        done: dict[str, Pending[None]] = {}

        async def one(dev: Device) -> None:
            for dependent in dependents[dev.name]:
                await settled(done[dependent])
            await act(dev)

        for level in reversed(start_levels(specs)):
            for name in level:
                done[name] = spawn(one(by_name[name]))
        return gather(done.values())

    async def restart(self, names: list[str]) -> list[dict[str, Any]]:
        devices = self.devices(names)
        await gather(self.fleet.restart(d) for d in devices)
        return [self.fleet.status_of(d) for d in devices]

    async def rolling_restart(self, names: list[str]) -> list[dict[str, Any]]:
        """Restart the named devices one at a time; stop at the first failure.

        In dependency order (requirements first; otherwise in the order named), each
        once the previous one is running again, so at most one is down at a time.
        """
        named = self.devices(names)
        by_name = {d.name: d for d in named}
        # the order of the whole graph, so that a requirement through a device not
        # named still counts (named ones first: otherwise they keep their order)
        levels = start_levels({**{d.name: d.spec for d in named}, **self.fleet.specs()})
        devices = [by_name[n] for level in levels for n in level if n in by_name]
        done: list[str] = []
        for dev in devices:
            try:
                await self.fleet.restart(dev)
            except ControlError as exc:
                before = f" (restarted before it: {', '.join(done)})" if done else ""
                raise ControlError(
                    exc.code, f"rolling restart stopped at {dev.name}{before}: {exc.message}"
                ) from None
            done.append(dev.name)
        return [self.fleet.status_of(d) for d in devices]

    async def pause(self, name: str) -> dict[str, Any]:
        dev = self.device(name)
        await self.fleet.control(dev, b"PAUSE")
        return self.fleet.status_of(dev)

    async def resume(self, name: str) -> dict[str, Any]:
        dev = self.device(name)
        await self.fleet.control(dev, b"RESUME")
        return self.fleet.status_of(dev)

    async def stats(self, name: str) -> dict[str, int]:
        dev = self.device(name)
        if dev.proc is None or dev.awaiting_ready:
            return dict(dev.stats)
        stats: dict[str, int] = await self.fleet.control(dev, b"STATISTICS")
        return stats

    async def add(self, data: dict[str, Any] | DeviceSpec) -> dict[str, Any]:
        """Validate, start and keep a new device; nothing is kept if its first start fails."""
        from devmgr._config import parse_device

        name = data.name if isinstance(data, DeviceSpec) else data.get("name")
        try:
            if isinstance(data, DeviceSpec):
                spec = data
            else:  # validation is proportional to the spec: on the parse thread
                spec = await self.off_loop(lambda: parse_device(data))
            dev = self._admit(spec)
        except ControlError as exc:
            log.info("add %s refused: %s: %s", name, exc.code, exc.message)
            raise
        try:
            await self.fleet.start(dev)
        except ControlError as error:
            log.info("add %s refused: %s: %s", spec.name, error.code, error.message)
            await settled(self.fleet.remove(dev))
            raise
        # merged into the config as it is now: a reload may have run meanwhile
        devices = {**self.config.devices, spec.name: spec}
        self.config = self.config.model_copy(update={"devices": devices})
        self.emit("device.added", device=spec.name, kind=spec.kind, pid=dev.sup.pid, by="add")
        return self.fleet.status_of(dev)

    def _admit(self, spec: DeviceSpec) -> Device:
        """Check a new device against the others and the fd budget; enter it, stopped."""
        fleet = self.fleet
        if spec.name in fleet.devices:
            raise ControlError("conflict", f"a device named {spec.name!r} exists already")
        refusal = fleet.fds.check()
        if refusal is not None:
            raise ControlError("conflict", refusal)
        # cross-device checks: linear in the binds, no re-validation of the other devices
        for code, issues in (
            ("conflict", config_conflicts(self.config.manager, {**fleet.specs(), spec.name: spec})),
            ("invalid_spec", drain_budget_issues(self.config.manager, {spec.name: spec})),
            ("invalid_spec", ipc_bind_issues(self.config.manager, {spec.name: spec})),
            ("invalid_spec", requirement_issues({spec.name: spec}, fleet.specs())),
        ):
            if issues:
                lines = (f"{format_loc(loc)}: {msg}" for loc, msg in map(render_issue, issues))
                raise ControlError(code, "\n".join(lines))
        return fleet.add_device(spec)

    async def remove(self, name: str) -> None:
        dev = self.device(name)
        error: ControlError | None = None
        try:
            await self.fleet.remove(dev)
        except ControlError as exc:
            error = exc
        devices = {n: s for n, s in self.config.devices.items() if n != name}
        self.config = self.config.model_copy(update={"devices": devices})
        if error is not None:
            raise error
        self.emit("device.removed", device=name, by="remove")

    async def reload(
        self, config: ManagerConfig | None = None, *, expect_path: str | None = None
    ) -> dict[str, Any]:
        """Apply a new config device by device: only what changed is touched.

        `config` None re-reads the manager's own file; `expect_path` (a client's `-c`)
        refuses that when the manager runs another file, rather than silently re-reading
        its own.
        """
        self.notify.reloading()
        try:
            if config is None:
                path = self._own_file(expect_path)
                # reading and validating the file costs ~1 ms per device: not on the loop
                config = await self.off_loop(lambda: load_config(path))
        except ControlError as exc:
            self.notify.ready()
            log.info("reload refused: %s: %s", exc.code, exc.message)
            raise
        fleet = self.fleet
        # What runs is the truth to diff against (an `add` may not be in self.config yet).
        old, new = fleet.specs(), config.devices
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and new[n] != old[n]]
        unchanged = [n for n in new if n in old and new[n] == old[n]]
        if config.manager != self.config.manager:
            log.warning("reload: [manager] settings changed; they apply at the next start")
        diff = {
            "config": str(config.path) if config.path is not None else None,
            "added": added,
            "removed": removed,
            "changed": changed,
            "unchanged": unchanged,
        }
        self.config = config.model_copy(update={"manager": self.config.manager})

        async def drop(dev: Device) -> None:
            try:
                await fleet.remove(dev)
            finally:
                if dev.name in removed:
                    self.emit("device.removed", device=dev.name, by="reload")

        # Stop what goes or changes first: a changed device may rebind the same endpoint.
        # Dependents before what they require (a reload that removes both).
        to_stop = [fleet.devices[n] for n in removed + changed if n in fleet.devices]
        await settled(self.stop_ordered(to_stop, remove=lambda dev: spawn(drop(dev))))
        to_add = changed + added
        to_start = []
        for begin in range(0, len(to_add), _APPLY_SLICE):
            if begin:  # a slice per loop turn: 2,000 new devices in one held the loop ~0.4 s
                await self._next_turn()
            for name in to_add[begin : begin + _APPLY_SLICE]:
                if name in fleet.devices:  # an `add` or another reload took it meanwhile
                    log.warning("reload: %s was added meanwhile; that one is kept", name)
                    continue
                dev = fleet.add_device(new[name])
                if name in added:
                    self.emit("device.added", device=name, kind=new[name].kind, by="reload")
                if new[name].autostart:
                    to_start.append(dev)
        error: ControlError | None = None
        try:
            await self.start_ordered(to_start)
        except ControlError as exc:
            error = exc
        # the diff is applied even when a device's start failed: say so either way
        self.notify.ready()
        self.emit(
            "manager.reloaded",
            config=diff["config"],
            added=added,
            removed=removed,
            changed=changed,
            error=None if error is None else error.message,
        )
        if error is not None:
            raise error
        return diff

    def _own_file(self, expect_path: str | None) -> Path:
        """The file a reload without a config re-reads: the manager's own."""
        if expect_path is not None and not _same_file(self.config.path, expect_path):
            runs = (
                f"runs {self.config.path}"
                if self.config.path is not None
                else "runs the embedded default config"
            )
            raise ControlError(
                "conflict",
                f"this manager {runs}, not {expect_path}; it re-reads only its own file "
                f"(reload without -c, or start a manager with -c {expect_path} and a "
                "control endpoint of its own)",
            )
        if self.config.path is None:
            raise ControlError(
                "invalid_spec", "the manager runs the embedded default config: no file"
            )
        return self.config.path

    def _next_turn(self) -> Pending[None]:
        """Resolve at the loop's next turn (after what is ready to run now)."""
        turn: Pending[None] = Pending()
        self.fleet.loop.call_later(0, lambda: turn.set_result(None))
        return turn

    async def stop_all(self) -> None:
        """Stop every device, dependents before what they require; return once none runs."""
        await settled(self.stop_ordered(list(self.fleet.devices.values())))

    async def kill_all(self) -> None:
        await self.fleet.kill_all()

    async def shutdown(self) -> None:
        """Stop every device, then let the manager end (`on_shutdown`)."""
        self.emit("manager.stopping")
        self.stopping_emitted = True
        await self.stop_all()
        self.on_shutdown()


async def settled_error(pending: Pending[Any]) -> ControlError | None:
    """Wait for `pending` either way; return its error (None when it succeeded)."""
    await settled(pending)
    return pending.error()


def _same_file(ours: Path | None, theirs: str) -> bool:
    """Return True when a client's config path names the file this manager runs."""
    if ours is None:
        return False
    try:
        return os.path.samefile(ours, theirs)
    except OSError:  # either one is gone or unreadable: compare the names
        return os.path.realpath(ours) == os.path.realpath(theirs)
