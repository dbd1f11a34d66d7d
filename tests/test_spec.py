"""The spec models: their interface, zmq_type/zmq_options, equality, and agreement with the
real libzmq on which options and endpoints it accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from pydantic import ValidationError

from devmgr._spec import (
    _BYTES_LENGTHS,
    _INT_MAX,
    _INT_RANGES,
    _READ_ONLY,
    _REFUSED,
    OPTION_SOCKET_TYPES,
    SETTABLE_OPTIONS,
    SOCKET_OPTIONS,
    DeviceSpec,
    ManagerConfig,
    ManagerSettings,
    OptionProblem,
    RestartSpec,
    SocketSpec,
    _unavailable_reason,
    check_endpoint,
    check_option,
)

DEVICE_TYPES = ("ROUTER", "DEALER", "PAIR", "PULL", "PUSH", "PUB", "SUB", "XPUB", "XSUB")


def orders(**changes: object) -> DeviceSpec:
    data: dict[str, object] = {
        "name": "orders",
        "in": {"type": "router", "bind": ["tcp://127.0.0.1:5559"]},
        "out": {"type": "DEALER", "bind": ["tcp://127.0.0.1:5560"], "options": {"sndhwm": 10}},
        "mon": {"bind": ["ipc:///tmp/orders-mon"]},
    }
    data.update(changes)
    return DeviceSpec.model_validate(data)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def test_device_spec_interface() -> None:
    spec = orders()
    assert spec.in_.type == "ROUTER"  # normalised to upper case
    assert spec.mon is not None and spec.mon.type == "PUB"  # the monitor's default type
    assert spec.kind == "monitored_queue" and spec.autostart is True
    assert (spec.in_prefix, spec.out_prefix) == ("in", "out")
    assert spec.restart == RestartSpec() and spec.restart.policy == "always"
    assert spec.health.max_rss_mb is None and spec.health.ping_timeout == 2.0
    dumped = spec.model_dump(by_alias=True)
    assert "in" in dumped and "in_" not in dumped
    assert spec.endpoints() == {
        "in": {"bind": ["tcp://127.0.0.1:5559"], "connect": []},
        "out": {"bind": ["tcp://127.0.0.1:5560"], "connect": []},
        "mon": {"bind": ["ipc:///tmp/orders-mon"], "connect": []},
    }
    assert orders(mon=None).endpoints()["mon"] is None


def test_construct_by_python_name() -> None:
    spec = DeviceSpec(
        name="q",
        kind="queue",
        in_=SocketSpec(type="ROUTER", bind=("tcp://127.0.0.1:1",)),
        out=SocketSpec(type="DEALER", connect=("tcp://127.0.0.1:2",)),
    )
    assert DeviceSpec.model_validate_json(spec.model_dump_json()) == spec


def test_frozen_and_equality_means_same_device() -> None:
    spec = orders()
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]
    assert orders() == spec
    assert orders(in_prefix="x") != spec
    assert orders(restart={"max_restarts": 3}) != spec


def test_zmq_type_and_options() -> None:
    sub = SocketSpec(
        type="sub",
        connect=("tcp://127.0.0.1:1",),
        options={"subscribe": ["a", "é"], "rcvhwm": 5, "identity": "me"},
    )
    assert sub.zmq_type() == zmq.SUB
    assert sub.options == {"subscribe": ["a", "é"], "rcvhwm": 5, "routing_id": "me"}
    assert sub.zmq_options() == [
        (zmq.SUBSCRIBE, b"a"),
        (zmq.SUBSCRIBE, "é".encode()),
        (zmq.RCVHWM, 5),
        (zmq.ROUTING_ID, b"me"),
    ]
    # a SUB that names no topic subscribes to every one
    plain = SocketSpec(type="SUB", connect=("tcp://127.0.0.1:1",))
    assert plain.zmq_options() == [(zmq.SUBSCRIBE, b"")]
    assert SocketSpec(type="XREP", bind=("ipc://*",)).type == "ROUTER"
    booleans = SocketSpec(type="ROUTER", bind=("ipc://*",), options={"router_mandatory": True})
    assert booleans.zmq_options() == [(zmq.ROUTER_MANDATORY, 1)]


def test_zmq_options_apply_to_a_real_socket(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    spec = SocketSpec(
        type="XPUB",
        bind=("ipc://*",),
        options={"sndhwm": 7, "xpub_verbose": True, "linger": 0, "routing_id": "x"},
    )
    sock = ctx.socket(spec.zmq_type())
    try:
        for option, value in spec.zmq_options():
            sock.setsockopt(option, value)
        assert sock.getsockopt(zmq.SNDHWM) == 7
        assert sock.getsockopt(zmq.ROUTING_ID) == b"x"
    finally:
        sock.close(linger=0)


def test_manager_defaults_follow_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    settings = ManagerSettings()
    assert settings.control == f"ipc://{tmp_path}/devmgr/control"
    assert settings.events == f"ipc://{tmp_path}/devmgr/events"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    import os

    assert ManagerSettings().control == f"ipc:///tmp/devmgr-{os.getuid()}/control"
    # events default beside a given ipc control
    beside = ManagerSettings(control="ipc:///run/dm/control")
    assert beside.events == "ipc:///run/dm/events"


def test_manager_config_rechecks_on_added_device() -> None:
    config = ManagerConfig(devices={"orders": orders()})
    clash = orders(name="copy", mon=None, out={"type": "DEALER", "connect": ["tcp://h:1"]})
    with pytest.raises(ValidationError) as caught:
        config.with_device(clash)
    assert "devices.copy.in.bind[0]" in str(caught.value)
    other = orders(
        name="other",
        mon=None,
        **{"in": {"type": "ROUTER", "bind": ["tcp://127.0.0.1:6000"]}},
        out={"type": "DEALER", "bind": ["tcp://127.0.0.1:6001"]},
    )
    assert set(config.with_device(other).devices) == {"orders", "other"}


def test_manager_config_key_must_be_name() -> None:
    with pytest.raises(ValidationError, match="differs from the table key"):
        ManagerConfig(devices={"x": orders()})


def test_restart_validation() -> None:
    with pytest.raises(ValidationError, match="backoff_max"):
        RestartSpec(backoff_initial=2.0, backoff_max=1.0)
    assert RestartSpec(max_restarts=0, backoff_initial=0).max_restarts == 0


# ---------------------------------------------------------------- agreement with libzmq


def _sample(name: str) -> int | str:
    """Return a value libzmq should accept for option `name`."""
    if SOCKET_OPTIONS[name]._opt_type.name != "bytes":
        return _INT_RANGES.get(name, (1, 1))[0] if name in _INT_RANGES else 1
    return {
        "curve_publickey": "x" * 40,
        "curve_secretkey": "x" * 40,
        "curve_serverkey": "x" * 40,
        "socks_proxy": "127.0.0.1:1080",
        "bindtodevice": "lo",
        "tcp_accept_filter": "127.0.0.1",
    }.get(name, "ab")


def option_ok(name: str, value: object, socket_type: str) -> bool:
    try:
        check_option(name, value, socket_type)
    except OptionProblem:
        return False
    return True


def _libzmq_accepts(
    ctx: zmq.Context[zmq.Socket[bytes]], type_: str, name: str, value: object
) -> bool:
    sock = ctx.socket(zmq.SocketType[type_])
    try:
        raw = value.encode() if isinstance(value, str) else value
        sock.setsockopt(SOCKET_OPTIONS[name], raw)  # type: ignore[arg-type]
    except zmq.ZMQError:
        return False
    finally:
        sock.close(linger=0)
    return True


def test_option_table_agrees_with_libzmq(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    disagreements = []
    for name in sorted(SOCKET_OPTIONS):
        if name in _READ_ONLY:
            continue
        value = _sample(name)
        if name in _REFUSED:  # libzmq takes them; devmgr refuses them on purpose
            assert not option_ok(name, value, "DEALER")
            assert _libzmq_accepts(ctx, "DEALER", name, value)
            continue
        for type_ in (*DEVICE_TYPES, "REQ", "REP", "STREAM"):
            ours = option_ok(name, value, type_)
            if ours != _libzmq_accepts(ctx, type_, name, value):
                disagreements.append((name, type_, ours))
    assert disagreements == []
    assert all(_unavailable_reason(n) is None for n in OPTION_SOCKET_TYPES)
    assert {"sndhwm", "linger", "subscribe", "routing_id"} <= set(SETTABLE_OPTIONS)


def test_option_ranges_agree_with_libzmq(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # Where devmgr is stricter than libzmq on purpose (maxmsgsize below -1 and a negative
    # heartbeat_ttl mean nothing), only the accepted side is compared.
    stricter = {"maxmsgsize", "heartbeat_ttl", "affinity"}
    for name, (low, high) in _INT_RANGES.items():
        if _unavailable_reason(name):
            continue
        assert _libzmq_accepts(ctx, "DEALER", name, low), name
        if name not in stricter and low - 1 >= -(2**31):
            assert not _libzmq_accepts(ctx, "DEALER", name, low - 1), name
            assert not option_ok(name, low - 1, "DEALER")
        if high < _INT_MAX:
            assert _libzmq_accepts(ctx, "DEALER", name, high), name
            assert not _libzmq_accepts(ctx, "DEALER", name, high + 1), name
    for name, (_, longest) in _BYTES_LENGTHS.items():
        if name in ("socks_proxy", "bindtodevice", "connect_routing_id"):
            continue  # libzmq stores longer values; a peer id over 255 bytes cannot work
        type_ = "ROUTER"
        assert _libzmq_accepts(ctx, type_, name, "r" * longest), name
        assert not _libzmq_accepts(ctx, type_, name, "r" * (longest + 1)), name


BIND_CASES = [
    ("tcp://127.0.0.1:0", True),
    ("tcp://127.0.0.1:*", True),
    ("tcp://localhost:0", True),
    ("tcp://lo:0", True),
    ("tcp://127.0.0.1:65536", False),
    ("tcp://127.0.0.1", False),
    ("tcp://127.0.0.1:abc", False),
    ("tcp://nosuchname.invalid:0", False),
    ("tcp://::1:0", False),
    ("ipc://", False),
    ("ws://127.0.0.1:0", False),
    ("bogus://x", False),
]
CONNECT_CASES = [
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.0.0.1:0;127.0.0.1:5555", True),
    ("tcp://*:5555", False),
    ("tcp://127.0.0.1:*", False),
    ("tcp://a b:5555", False),
    ("ipc:///tmp/" + "x" * 110, False),
]


@pytest.mark.parametrize(("endpoint", "ok"), BIND_CASES)
def test_bind_check_agrees_with_libzmq(
    endpoint: str, ok: bool, ctx: zmq.Context[zmq.Socket[bytes]], ipc_dir: Path
) -> None:
    assert (check_endpoint(endpoint, bind=True) is None) == ok, check_endpoint(endpoint, bind=True)
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.bind(endpoint)
        libzmq_ok = True
    except zmq.ZMQError:
        libzmq_ok = False
    finally:
        sock.close(linger=0)
    assert libzmq_ok == ok


def test_ipc_bind_agrees_with_libzmq(ctx: zmq.Context[zmq.Socket[bytes]], ipc_dir: Path) -> None:
    room = 107 - len(str(ipc_dir)) - 1
    for length, ok in ((room, True), (room + 1, False)):
        endpoint = f"ipc://{ipc_dir}/{'s' * length}"
        assert (check_endpoint(endpoint, bind=True) is None) == ok
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.bind(endpoint)
            libzmq_ok = True
        except zmq.ZMQError:
            libzmq_ok = False
        finally:
            sock.close(linger=0)
        assert libzmq_ok == ok, endpoint


@pytest.mark.parametrize(("endpoint", "ok"), CONNECT_CASES)
def test_connect_check_agrees_with_libzmq(
    endpoint: str, ok: bool, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    assert (check_endpoint(endpoint, bind=False) is None) == ok
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
        libzmq_ok = True
    except zmq.ZMQError:
        libzmq_ok = False
    finally:
        sock.close(linger=0)
    assert libzmq_ok == ok


def test_ipv6_needs_the_option(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with pytest.raises(ValidationError, match="ipv6 = true"):
        SocketSpec(type="DEALER", bind=("tcp://[::1]:0",))
    spec = SocketSpec(type="DEALER", bind=("tcp://[::1]:0",), options={"ipv6": True})
    sock = ctx.socket(spec.zmq_type())
    try:
        for option, value in spec.zmq_options():
            sock.setsockopt(option, value)
        sock.bind(spec.bind[0])
    finally:
        sock.close(linger=0)
