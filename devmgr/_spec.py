"""What a device and a manager are: pure, frozen, validated data (pydantic v2).

Every model forbids unknown keys and checks its values on construction, so a spec that
exists is a spec that can run. Rules that need several problems at once report them
through `_fail`, whose context carries `(sub-location, message)` pairs; the config layer
(`devmgr._config`) turns them, and pydantic's own errors, into `Problem`s with dotted
places such as `devices.orders.in.type`. Equality means "same device": a reload diffs
old and new configs model by model.

The endpoint and socket-option rules live here, next to the models they guard, because a
model must refuse bad input even when built directly in Python rather than from a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import zmq
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from devmgr._paths import default_control_endpoint, default_events_endpoint, path_within

# A sub-location inside the value being validated: ("type",), ("bind", 0), ("options", "x").
Loc = tuple[str | int, ...]
# A problem at a sub-location; a third item is a place that "{ref}" in the message names,
# relative to the same base, so that it reads right however deep the check ran.
Issue = tuple[Loc, str] | tuple[Loc, str, Loc]

Kind = Literal["monitored_queue", "queue", "forwarder", "streamer"]
KINDS: tuple[str, ...] = ("monitored_queue", "queue", "forwarder", "streamer")
RestartPolicy = Literal["always", "on-failure", "never"]
POLICIES: tuple[str, ...] = ("always", "on-failure", "never")

_ANY_DEVICE_TYPE = ("ROUTER", "DEALER", "PAIR", "PULL", "PUSH", "PUB", "SUB", "XPUB", "XSUB")
#: Socket types each kind allows per side; a kind without "mon" has no monitor socket.
KIND_SOCKET_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "monitored_queue": {
        "in": _ANY_DEVICE_TYPE,
        "out": _ANY_DEVICE_TYPE,
        "mon": ("PUB", "XPUB", "PUSH", "DEALER", "PAIR"),
    },
    "queue": {"in": ("ROUTER",), "out": ("DEALER",)},
    "forwarder": {"in": ("SUB", "XSUB"), "out": ("PUB", "XPUB")},
    "streamer": {"in": ("PULL",), "out": ("PUSH",)},
}

# sun_path holds 108 bytes on Linux (104 on the BSDs and macOS), one of them the NUL.
IPC_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")

# Bounds that keep validating one spec cheap however large the input (a control request
# may be 1 MiB): more is refused with one problem instead of being checked item by item.
#: Endpoints in one socket's `bind` list, and in its `connect` list.
MAX_ENDPOINTS = 64
#: Options set on one socket (libzmq has about 70).
MAX_OPTIONS = 64
#: Entries in one device's `requires` list.
MAX_REQUIRES = 256


# --------------------------------------------------------------------------- helpers


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest of `choices` to `word`, else ''."""
    by_lower = {c.lower(): c for c in choices}
    low = word.lower()
    if low in by_lower:
        return f" (did you mean {by_lower[low]}?)"
    match = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]}?)" if match else ""


def render_issue(issue: Issue, base: Loc = ()) -> tuple[Loc, str]:
    """Return an issue's full location below `base` and its message with `{ref}` filled."""
    loc, message = (*base, *issue[0]), issue[1]
    if len(issue) == 3:
        message = message.replace("{ref}", format_loc((*base, *issue[2])))
    return loc, message


def safe_text(text: str) -> str:
    """Escape what UTF-8 cannot carry (lone surrogates from JSON), so messages print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(message: str) -> PydanticCustomError:
    """Build the error for one problem at the value being validated."""
    return PydanticCustomError("devmgr", "{summary}", {"summary": safe_text(message)})


def _fail(issues: list[Issue]) -> PydanticCustomError:
    """Build the error that carries several problems, each at its own sub-location."""
    clean: list[Issue] = [
        (issue[0], safe_text(issue[1]), issue[2])
        if len(issue) == 3
        else (issue[0], safe_text(issue[1]))
        for issue in issues
    ]
    rendered = [render_issue(issue) for issue in clean]
    summary = "; ".join((format_loc(loc) + ": " if loc else "") + msg for loc, msg in rendered)
    return PydanticCustomError("devmgr", "{summary}", {"summary": summary, "issues": clean})


def _show(value: object) -> str:
    """Render a user's value for a message, shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _or(names: Iterable[str]) -> str:
    items = list(names)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# --------------------------------------------------------------------------- socket types


def _socket_type_table() -> dict[str, str]:
    """Map every accepted socket type name (aliases too) to its canonical name."""
    draft = zmq.has("draft")
    table: dict[str, str] = {}
    for name, member in zmq.SocketType.__members__.items():
        if int(member) >= int(zmq.SocketType.SERVER) and not draft:
            continue
        table[name] = zmq.SocketType(int(member)).name
    return table


SOCKET_TYPES: dict[str, str] = _socket_type_table()
_DRAFT_SOCKET_TYPES = {
    n for n, m in zmq.SocketType.__members__.items() if int(m) >= int(zmq.SocketType.SERVER)
}


# --------------------------------------------------------------------------- socket options

_OptType = type(zmq.SocketOption.LINGER._opt_type)
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
OptionValue = int | str | list[str]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_READ_ONLY = _words("rcvmore fd events type last_endpoint mechanism thread_safe")
_DRAFT_OPTIONS = _words(
    "metadata router_notify in_batch_size out_batch_size hello_msg disconnect_msg priority "
    "busy_poll hiccup_msg xsub_verbose_unsubscribe topics_count"
)


#: Options libzmq takes but a config (or a control client) must never set.
_REFUSED = {
    # libzmq adopts the given number as an already bound socket: in a device child it is
    # one of devmgr's own fds (or none, and libzmq aborts the child)
    "use_fd": "use_fd makes libzmq adopt an inherited file descriptor: devmgr refuses it "
    "(bind the endpoint instead)",
}


def _unavailable_reason(name: str) -> str | None:
    """Say why option `name` cannot be set on any socket (this libzmq build refuses it,
    or devmgr does), else None.

    Checked against the real libzmq by tests/test_spec.py.
    """
    if name in _REFUSED:
        return _REFUSED[name]
    if name in _READ_ONLY:
        return f"{name} is read-only: it cannot be set"
    if name == "hwm":
        return "hwm is ZeroMQ 2's option: set sndhwm and rcvhwm instead"
    if name == "blocky":
        return "blocky is a context option, not a socket option"
    needs = {"gssapi": "GSSAPI", "norm_": "the NORM transport", "vmci_": "the VMCI transport"}
    needs["wss_"] = "the WebSocket transport"
    for prefix, feature in needs.items():
        if name.startswith(prefix) and not zmq.has(prefix.rstrip("_")):
            return f"{name} needs {feature}, which this libzmq was built without"
    if name in _DRAFT_OPTIONS and not zmq.has("draft"):
        return f"{name} is a draft option, which this libzmq was built without"
    return None


#: Options libzmq accepts only on some socket types (libzmq 4.3.5's setsockopt).
OPTION_SOCKET_TYPES: dict[str, tuple[str, ...]] = {
    "subscribe": ("SUB",),
    "unsubscribe": ("SUB",),
    "router_mandatory": ("ROUTER", "REP"),
    "router_raw": ("ROUTER", "REP"),
    "router_handover": ("ROUTER", "REP"),
    "connect_routing_id": ("ROUTER", "REP", "STREAM"),
    "probe_router": ("ROUTER", "DEALER", "REQ", "REP"),
    "req_correlate": ("REQ",),
    "req_relaxed": ("REQ",),
    "stream_notify": ("STREAM",),
    "only_first_subscribe": ("PUB", "XPUB", "XSUB"),
    **{
        f"xpub_{name}": ("PUB", "XPUB")
        for name in ("verbose", "verboser", "nodrop", "manual", "manual_last_value", "welcome_msg")
    },
}

_BOOL_OPTIONS = _words(
    "immediate ipv6 ipv4only router_mandatory router_raw router_handover xpub_verbose "
    "xpub_verboser xpub_nodrop xpub_manual xpub_manual_last_value plain_server curve_server "
    "probe_router req_correlate req_relaxed conflate stream_notify invert_matching "
    "zap_enforce_domain loopback_fastpath multicast_loop only_first_subscribe"
)


def _ranges(low: int, names: str, high: int = _INT_MAX) -> dict[str, tuple[int, int]]:
    return {name: (low, high) for name in names.split()}


#: Inclusive (min, max) of integer options where libzmq refuses part of the C range.
_INT_RANGES: dict[str, tuple[int, int]] = {
    **_ranges(-1, "linger sndbuf rcvbuf rcvtimeo sndtimeo reconnect_ivl"),
    **_ranges(-1, "tcp_keepalive_cnt tcp_keepalive_idle tcp_keepalive_intvl"),
    **_ranges(0, "sndhwm rcvhwm reconnect_ivl_max backlog tos heartbeat_ivl recovery_ivl"),
    **_ranges(0, "heartbeat_timeout handshake_ivl connect_timeout tcp_maxrt"),
    **_ranges(1, "rate multicast_hops multicast_maxtpdu"),
    "maxmsgsize": (-1, _INT64_MAX),
    "affinity": (0, _INT64_MAX),
    "tcp_keepalive": (-1, 1),
    "heartbeat_ttl": (0, 6553599),
}

#: Inclusive (min, max) length in bytes of string options libzmq bounds.
_BYTES_LENGTHS: dict[str, tuple[int, int]] = {
    **_ranges(1, "routing_id connect_routing_id plain_username plain_password", 255),
    "zap_domain": (0, 255),
    "socks_proxy": (1, 1024),
    "bindtodevice": (1, 15),
}
_CURVE_KEY_OPTIONS = {"curve_publickey", "curve_secretkey", "curve_serverkey"}
_Z85_RE = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")

#: Every option name pyzmq knows (lower case, aliases too), fd-typed ones left out.
SOCKET_OPTIONS: dict[str, zmq.SocketOption] = {
    name.lower(): member
    for name, member in zmq.SocketOption.__members__.items()
    if member._opt_type is not _OptType.fd
}
#: Option names a config may use: those this libzmq accepts on at least one socket type.
SETTABLE_OPTIONS: tuple[str, ...] = tuple(
    sorted(n for n in SOCKET_OPTIONS if _unavailable_reason(n) is None)
)


class OptionProblem(ValueError):
    """One socket option is unknown, misplaced or out of range."""


def check_option(name: str, value: object, socket_type: str | None) -> tuple[str, OptionValue]:
    """Check one option; return its canonical name and normalised value.

    Raises:
        OptionProblem: saying what is wrong and what would be right.
    """
    if name not in SOCKET_OPTIONS:
        raise OptionProblem(
            f"unknown socket option {name!r}{did_you_mean(name, SETTABLE_OPTIONS)}; "
            "options are pyzmq's names in lower case, e.g. sndhwm, linger, subscribe"
        )
    reason = _unavailable_reason(name)
    if reason:
        raise OptionProblem(reason)
    canonical = zmq.SocketOption(int(SOCKET_OPTIONS[name])).name.lower()
    allowed = OPTION_SOCKET_TYPES.get(canonical)
    if socket_type is not None and allowed and socket_type not in allowed:
        raise OptionProblem(f"{name} applies only to {_or(allowed)} sockets, not {socket_type}")
    if SOCKET_OPTIONS[canonical]._opt_type is _OptType.bytes:
        return canonical, _bytes_option(canonical, name, value)
    return canonical, _int_option(canonical, name, value)


def _bytes_option(canonical: str, name: str, value: object) -> str | list[str]:
    many = canonical in ("subscribe", "unsubscribe")
    if isinstance(value, list) and many:
        if not value:
            raise OptionProblem('an empty list subscribes to nothing; use "" for every topic')
        items = value
    elif isinstance(value, str):
        items = [value]
    else:
        want = "a string or a list of strings" if many else "a string"
        raise OptionProblem(f"{name} takes {want}, got {_show(value)}")
    for item in items:
        if not isinstance(item, str):
            raise OptionProblem(f"{name} takes strings, got {_show(item)}")
        if safe_text(item) != item:
            raise OptionProblem(f"{name}: {_show(item)} cannot be encoded as UTF-8")
        size = len(item.encode("utf-8"))
        low, high = _BYTES_LENGTHS.get(canonical, (0, size))
        if not low <= size <= high:
            raise OptionProblem(f"{name} must be {low} to {high} bytes long, got {size}")
        if canonical in _CURVE_KEY_OPTIONS and not _Z85_RE.match(item):
            raise OptionProblem(f"{name} must be a 40-character Z85 key (as zmq.auth writes)")
        if canonical == "tcp_accept_filter":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise OptionProblem(f"{name} must be an IP address or network") from None
    return list(items) if isinstance(value, list) else items[0]


def _int_option(canonical: str, name: str, value: object) -> int:
    if canonical in _BOOL_OPTIONS:
        if isinstance(value, int) and value in (0, 1):  # True and False included
            return int(value)
        raise OptionProblem(f"{name} takes true or false (or 1 or 0), got {_show(value)}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionProblem(f"{name} takes an integer, got {_show(value)}")
    wide = SOCKET_OPTIONS[canonical]._opt_type is _OptType.int64
    low, high = _INT_RANGES.get(
        canonical, (_INT64_MIN, _INT64_MAX) if wide else (_INT_MIN, _INT_MAX)
    )
    if not low <= value <= high:
        span = f"at least {low}" if high in (_INT_MAX, _INT64_MAX) else f"{low} to {high}"
        raise OptionProblem(f"{name} must be {span}, got {value}")
    return value


# --------------------------------------------------------------------------- endpoints

_KNOWN_TRANSPORTS = (
    "tcp",
    "ipc",
    "inproc",
    "pgm",
    "epgm",
    "tipc",
    "norm",
    "vmci",
    "ws",
    "wss",
    "udp",
)
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_INPROC_WHY = (
    "inproc:// works only inside one process, and each device runs in a process of its "
    "own: use ipc:// (e.g. ipc:///tmp/NAME) or tcp://127.0.0.1:PORT"
)

# A bound address for conflict checks: ("tcp", host or "*", port) or ("ipc", path).
BindKey = tuple[str, str, int] | tuple[str, str]


def _interfaces() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover - no interface table (some sandboxes)
        return set()


def _ipv4(host: str) -> str | None:
    """Return `host` as a normalised IPv4 address if libzmq reads it as one, else None."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, 0, 0, socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return str(infos[0][4][0]) if infos else None


def _ipv6(host: str) -> str | None:
    """Return the address inside `[...]` (scope id dropped) if it is IPv6, else None."""
    inner = host[1:-1].split("%", 1)[0]
    try:
        return str(ipaddress.IPv6Address(inner))
    except ValueError:
        return None


def _check_tcp_host(host: str, *, bind: bool, source: bool = False) -> str | None:
    """Check the host part of a tcp endpoint; return a problem or None."""
    what = "a source address" if source else "bind" if bind else "connect"
    if not host:
        return "the host is missing: expected tcp://HOST:PORT"
    if host in ("*", "[*]"):
        return None if bind or source else "connect needs a host: '*' is only for bind"
    if host.startswith("["):
        if not host.endswith("]") or (host != "[*]" and _ipv6(host) is None):
            return f"{host} is not a bracketed IPv6 address like [::1]"
        return None
    if ":" in host:
        return f"IPv6 addresses need brackets, e.g. tcp://[{host}]:PORT"
    if _ipv4(host) is not None or host == "localhost":
        return None
    if bind or source:
        if host in _interfaces():
            return None
        return (
            f"{host!r} is neither an IP address, '*' nor a network interface of this "
            f"machine ({what} does not look up host names)"
        )
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        return f"{host!r} is not a valid host name or IP address"
    return None


def _check_port(port: str, *, bind: bool) -> str | None:
    if bind and port == "*":
        return None
    if not port.isascii() or not port.isdigit():
        return f"port {port!r} is not a number" + (" or '*'" if bind else "")
    number = int(port)
    if number > 65535:
        return f"port {number} is out of range (0 to 65535)"
    if number == 0 and not bind:
        return "port 0 means 'any free port' and only makes sense for bind"
    return None


def check_endpoint(endpoint: str, *, bind: bool) -> str | None:
    """Check one endpoint as libzmq would read it; return a problem or None."""
    if safe_text(endpoint) != endpoint:
        return f"{_show(endpoint)} holds characters UTF-8 cannot encode"
    if not endpoint or endpoint != endpoint.strip() or any(c.isspace() for c in endpoint):
        return f"{_show(endpoint)} is not an endpoint: it is empty or contains spaces"
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return (
            f"{_show(endpoint)} is not an endpoint: expected TRANSPORT://ADDRESS, "
            "e.g. tcp://127.0.0.1:5555 or ipc:///tmp/NAME"
        )
    transport = transport.lower()
    if transport == "inproc":
        return _INPROC_WHY
    if transport not in ("tcp", "ipc"):
        if transport in _KNOWN_TRANSPORTS:
            return f"devmgr devices use tcp:// or ipc://, not {transport}://"
        return (
            f"unknown transport {transport!r}{did_you_mean(transport, ('tcp', 'ipc'))}; "
            "devmgr devices use tcp:// or ipc://"
        )
    if "\0" in address:
        return "the address contains a NUL character"
    if transport == "ipc":
        return _check_ipc(address, bind=bind)
    source, semi, target = address.rpartition(";")
    if semi:
        if bind:
            return "a source address (SOURCE;HOST:PORT) is only for connect"
        src_host, src_sep, src_port = source.rpartition(":")
        if not src_sep or (not src_host.endswith("]") and ":" in src_host):
            src_host, src_port = source, ""
        problem = _check_tcp_host(src_host, bind=True, source=True) or (
            _check_port(src_port, bind=True) if src_port else None
        )
        if problem:
            return f"source address: {problem}"
    host, colon, port = target.rpartition(":")
    if not colon:
        return f"{_show(endpoint)} has no port: expected tcp://HOST:PORT"
    return _check_tcp_host(host, bind=bind) or _check_port(port, bind=bind)


def _check_ipc(path: str, *, bind: bool) -> str | None:
    if not path:
        return "the ipc path is empty: expected ipc:///PATH"
    if path == "*":
        return None if bind else "ipc://* (a fresh temporary path) is only for bind"
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > IPC_PATH_MAX:
        return (
            f"the ipc path is {size} bytes long; the OS limit (sun_path) is {IPC_PATH_MAX}: "
            "use a shorter path, e.g. under /tmp or $XDG_RUNTIME_DIR"
        )
    return None


def endpoint_is_ipv6(endpoint: str) -> bool:
    """Tell whether a tcp endpoint names an IPv6 address (which needs the ipv6 option)."""
    if not endpoint.startswith("tcp://"):
        return False
    target = endpoint[len("tcp://") :].rpartition(";")[2]
    host = target.rpartition(":")[0]
    return host.startswith("[") and host != "[*]"


def bind_key(endpoint: str) -> list[BindKey]:
    """Return what a bind occupies (for conflict checks); [] for 'any free port/path'."""
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        return [] if address == "*" else [("ipc", address)]
    if transport != "tcp":
        return []
    host, _, port = address.rpartition(":")
    if port in ("*", "0") or not port.isdigit():
        return []
    number = int(port)
    if host in ("*", "[*]", "0.0.0.0", "[::]"):
        return [("tcp", "*", number)]
    if host == "localhost":
        return [("tcp", "127.0.0.1", number), ("tcp", "::1", number)]
    if host.startswith("["):
        return [("tcp", _ipv6(host) or host, number)]
    address4 = _ipv4(host)
    if address4 is not None:
        return [("tcp", address4, number)]
    return [("tcp", addr, number) for addr in _interface_addresses(host)] or [("tcp", host, number)]


def _interface_addresses(name: str) -> list[str]:
    import psutil

    return [
        str(a.address).split("%", 1)[0]
        for a in psutil.net_if_addrs().get(name, [])
        if a.family in (socket.AF_INET, socket.AF_INET6)
    ]


def _keys_conflict(a: BindKey, b: BindKey) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "ipc":
        return a[1] == b[1]
    return a[2] == b[2] and (a[1] == b[1] or "*" in (a[1], b[1]))  # type: ignore[misc]


def find_bind_conflicts(binds: Iterable[tuple[Loc, str]]) -> list[Issue]:
    """Report every bind that overlaps an earlier one, at the later place.

    Overlap: the same ipc path, or the same tcp port with the same address or a '*' on
    either side (libzmq would fail with EADDRINUSE). Linear in the number of binds: each
    one is looked up by its address, and by its port for the '*' cases.
    """
    Holder = tuple[int, Loc, str]  # (order, place, endpoint) of the first bind of a key
    exact: dict[BindKey, Holder] = {}
    port_any: dict[int, Holder] = {}  # tcp port -> its first bind, whatever the address
    port_star: dict[int, Holder] = {}  # tcp port -> its first bind on '*'
    issues: list[Issue] = []
    for order, (loc, endpoint) in enumerate(binds):
        keys = bind_key(endpoint)
        clash: Holder | None = None
        for key in keys:
            if key[0] == "tcp":
                port = key[2]  # type: ignore[misc]
                found = (
                    [port_any.get(port)] if key[1] == "*" else [exact.get(key), port_star.get(port)]
                )
            else:
                found = [exact.get(key)]
            holders = [h for h in found if h is not None]
            if holders:
                clash = min(holders, key=lambda h: h[0])  # the earliest, as they were bound
                break
        if clash is not None:
            _, other_loc, other_ep = clash
            as_other = "" if other_ep == endpoint else f", as {other_ep},"
            issues.append((loc, f"{endpoint} is also bound{as_other} at {{ref}}", other_loc))
        holder: Holder = (order, loc, endpoint)
        for key in keys:
            exact.setdefault(key, holder)
            if key[0] == "tcp":
                port_any.setdefault(key[2], holder)  # type: ignore[misc]
                if key[1] == "*":
                    port_star.setdefault(key[2], holder)  # type: ignore[misc]
    return issues


def format_loc(loc: Iterable[str | int]) -> str:
    """Format a location as a dotted place, e.g. `devices.a.in.bind[0]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = "in" if part == "in_" else safe_text(str(part))
            out += f".{name}" if out else name
    return out


def _resolve_ipc(endpoint: str, info: ValidationInfo) -> str:
    """Make a relative ipc path absolute against the config file's folder (if known)."""
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    if base is None or not endpoint.startswith("ipc://"):
        return endpoint
    path = endpoint[len("ipc://") :]
    if not path or path == "*" or path.startswith(("/", "@")):
        return endpoint
    return f"ipc://{Path(base) / path}"


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    if base is None or value.is_absolute():
        return value
    return Path(base) / value


# --------------------------------------------------------------------------- numbers


def _finite_at_least(minimum: float, *, inclusive: bool, unit: str) -> AfterValidator:
    """Refuse NaN, infinities and values below `minimum` (or equal, if not inclusive)."""

    def check(value: float) -> float:
        if not math.isfinite(value):
            raise PydanticCustomError("devmgr", "must be a finite number of {unit}", {"unit": unit})
        if value < minimum or (value == minimum and not inclusive):
            bound = f"at least {minimum:g}" if inclusive else f"greater than {minimum:g}"
            raise PydanticCustomError(
                "devmgr",
                "must be {bound} ({unit}), got {value}",
                {"bound": bound, "unit": unit, "value": f"{value:g}"},
            )
        return value

    return AfterValidator(check)


# The Field() metadata only shows the bound in the JSON Schema; the validator enforces it.
Seconds = Annotated[
    float,
    StrictFloat,
    _finite_at_least(0, inclusive=True, unit="seconds"),
    Field(json_schema_extra={"minimum": 0}),
]
PositiveSeconds = Annotated[
    float,
    StrictFloat,
    _finite_at_least(0, inclusive=False, unit="seconds"),
    Field(json_schema_extra={"exclusiveMinimum": 0}),
]


def _choice_before(choices: tuple[str, ...], what: str) -> Any:
    """Return a before-validator giving a did-you-mean for a string outside `choices`."""

    def check(value: object) -> object:
        if isinstance(value, str) and value not in choices:
            raise _error(
                f"{value!r} is not a {what}{did_you_mean(value, choices)}; expected {_or(choices)}"
            )
        return value

    return check


# --------------------------------------------------------------------------- models

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class SocketSpec(BaseModel):
    """One ZeroMQ socket of a device: its type, endpoints and options."""

    model_config = _FROZEN

    type: StrictStr = Field(
        description="ZeroMQ socket type name, e.g. ROUTER, DEALER, PUB, SUB, XPUB, XSUB, "
        "PULL, PUSH, PAIR (case-insensitive; stored upper case)"
    )
    bind: tuple[StrictStr, ...] = Field(
        default=(), max_length=MAX_ENDPOINTS, description="endpoints to bind"
    )
    connect: tuple[StrictStr, ...] = Field(
        default=(), max_length=MAX_ENDPOINTS, description="endpoints to connect to"
    )
    options: dict[str, int | str | list[str]] = Field(
        default_factory=dict,
        description="socket options by pyzmq's lower-case name (sndhwm, linger, subscribe, "
        "routing_id, ...); bytes options take UTF-8 strings, subscribe also a list",
        # The schema describes input: on/off options may also be written true/false.
        json_schema_extra={
            "maxProperties": MAX_OPTIONS,
            "propertyNames": {"enum": list(SETTABLE_OPTIONS)},
            "additionalProperties": {
                "anyOf": [
                    {"type": "boolean"},
                    {"type": "integer"},
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                ]
            },
        },
    )

    @field_validator("type", mode="after")
    @classmethod
    def _known_type(cls, value: str) -> str:
        canonical = SOCKET_TYPES.get(value.upper())
        if canonical is not None:
            return canonical
        if value.upper() in _DRAFT_SOCKET_TYPES:
            message = f"{value!r} is a draft socket type, which this libzmq was built without"
        else:
            choices = [n for n in SOCKET_TYPES if SOCKET_TYPES[n] == n]
            message = f"{value!r} is not a ZeroMQ socket type{did_you_mean(value, choices)}"
        raise _error(message)

    @field_validator("bind", "connect", mode="before")
    @classmethod
    def _few_endpoints(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, list | tuple) and len(value) > MAX_ENDPOINTS:
            raise _error(
                f"{len(value)} endpoints; a socket takes at most {MAX_ENDPOINTS} in "
                f"{info.field_name}"
            )
        return value

    @field_validator("bind", "connect", mode="after")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        resolved = tuple(_resolve_ipc(ep, info) for ep in value)
        issues: list[Issue] = []
        for i, endpoint in enumerate(resolved):
            problem = check_endpoint(endpoint, bind=info.field_name == "bind")
            if problem:
                issues.append(((i,), problem))
        if info.field_name == "bind" and not issues:
            issues.extend(find_bind_conflicts(((i,), ep) for i, ep in enumerate(resolved)))
        if issues:
            raise _fail(issues)
        return resolved

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type error
        if len(value) > MAX_OPTIONS:  # not checked one by one: each costs a did-you-mean
            raise _error(f"{len(value)} options; a socket takes at most {MAX_OPTIONS}")
        socket_type = SOCKET_TYPES.get(str(info.data.get("type", "")).upper())
        normalised: dict[str, OptionValue] = {}
        issues: list[Issue] = []
        for key, raw in value.items():
            if not isinstance(key, str):
                issues.append(((str(key),), "option names are strings"))
                continue
            try:
                name, checked = check_option(key, raw, socket_type)
                if name in normalised:
                    raise OptionProblem(f"{key} sets {name}, which is already set")
            except OptionProblem as exc:
                issues.append(((key,), str(exc)))
            else:
                normalised[name] = checked
        if issues:
            raise _fail(issues)
        return normalised

    @model_validator(mode="after")
    def _usable(self) -> SocketSpec:
        issues: list[Issue] = []
        if not self.bind and not self.connect:
            issues.append(((), "neither bind nor connect: give at least one endpoint"))
        if not self.options.get("ipv6"):
            for field in ("bind", "connect"):
                for i, endpoint in enumerate(getattr(self, field)):
                    if endpoint_is_ipv6(endpoint):
                        issues.append(
                            (
                                (field, i),
                                (
                                    f"{endpoint} is an IPv6 address: set options.ipv6 = true on "
                                    "this socket"
                                ),
                            )
                        )
        if issues:
            raise _fail(issues)
        return self

    def zmq_type(self) -> int:
        """Return the socket type constant for `zmq.Context.socket`."""
        return int(zmq.SocketType[self.type])

    def zmq_options(self) -> list[tuple[int, int | bytes]]:
        """Return (option constant, value) pairs ready for `setsockopt`, in order.

        Strings become UTF-8 bytes and a list gives one pair per item. A SUB socket with
        no `subscribe` option gets `subscribe = b""` (every topic), since a device that
        subscribes to nothing would forward nothing.
        """
        pairs: list[tuple[int, int | bytes]] = []
        for name, value in self.options.items():
            constant = int(SOCKET_OPTIONS[name])
            items = value if isinstance(value, list) else [value]
            for item in items:
                pairs.append((constant, item.encode() if isinstance(item, str) else item))
        if self.type == "SUB" and "subscribe" not in self.options:
            pairs.append((int(zmq.SocketOption.SUBSCRIBE), b""))
        return pairs


class RestartSpec(BaseModel):
    """When and how fast a device that exits is started again."""

    model_config = _FROZEN

    policy: RestartPolicy = Field(default="always", description="always | on-failure | never")
    backoff_initial: Seconds = Field(
        default=0.1, description="seconds before the first restart; doubles per failure"
    )
    backoff_max: Seconds = Field(default=30.0, description="the longest backoff, seconds")
    max_restarts: StrictInt = Field(
        default=10,
        description="automatic restarts allowed within `window` before fatal",
        json_schema_extra={"minimum": 0},
    )
    window: PositiveSeconds = Field(default=60.0, description="seconds")

    _policy = field_validator("policy", mode="before")(_choice_before(POLICIES, "restart policy"))

    @field_validator("max_restarts", mode="after")
    @classmethod
    def _count(cls, value: int) -> int:
        if value < 0:
            raise PydanticCustomError(
                "devmgr",
                "must be 0 or more (0: the first failure is fatal), got {value}",
                {"value": value},
            )
        return value

    @model_validator(mode="after")
    def _ordered(self) -> RestartSpec:
        if self.backoff_max < self.backoff_initial:
            raise _fail(
                [
                    (
                        ("backoff_max",),
                        (
                            f"{self.backoff_max:g} is below backoff_initial "
                            f"({self.backoff_initial:g}): it must be at least backoff_initial"
                        ),
                    )
                ]
            )
        return self


class HealthSpec(BaseModel):
    """Limits the manager checks a running device against."""

    model_config = _FROZEN

    max_rss_mb: (
        Annotated[
            float,
            StrictFloat,
            _finite_at_least(0, inclusive=False, unit="MiB"),
            Field(json_schema_extra={"exclusiveMinimum": 0}),
        ]
        | None
    ) = Field(default=None, description="restart the device above this resident size, MiB")
    ping_timeout: PositiveSeconds = Field(
        default=2.0, description="seconds to wait for PONG before the device is unresponsive"
    )


def _name(value: str) -> str:
    if not DEVICE_NAME_RE.match(value):
        raise _error(
            f"{_show(value)} is not a device name: use 1 to 64 letters, digits, "
            "'_' or '-', not starting with '-'"
        )
    return value


class DeviceSpec(BaseModel):
    """One device: a forwarding loop between an in-socket and an out-socket."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    name: Annotated[StrictStr, AfterValidator(_name)] = Field(
        description="the device name (the key of its [devices.NAME] table)"
    )
    kind: Kind = Field(
        default="monitored_queue",
        description="monitored_queue (default) | queue | forwarder | streamer",
    )
    in_: SocketSpec = Field(alias="in", description="the in-socket")
    out: SocketSpec = Field(description="the out-socket")
    mon: SocketSpec | None = Field(
        default=None, description="the monitor socket (monitored_queue only; type PUB default)"
    )
    in_prefix: StrictStr = Field(default="in", description="monitor prefix of in->out messages")
    out_prefix: StrictStr = Field(default="out", description="monitor prefix of out->in messages")
    autostart: StrictBool = Field(default=True, description="start with the manager")
    restart: RestartSpec = Field(default_factory=RestartSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    requires: tuple[Annotated[StrictStr, AfterValidator(_name)], ...] = Field(
        default=(),
        description=(
            "devices this one requires: it starts only once each of them is running, "
            "and stops before them"
        ),
    )
    drain_quiet: Seconds | None = Field(
        default=None,
        description=(
            "seconds both directions of a two-way device (a ROUTER/DEALER queue) must stay "
            "idle before a stop's drain ends, any message read starting it over; 0.1 "
            "when unset; less than half of manager.stop_timeout. Raise it above your "
            "slowest server's reply time so replies to requests in flight get back"
        ),
    )

    _kind = field_validator("kind", mode="before")(_choice_before(KINDS, "device kind"))

    @field_validator("mon", mode="before")
    @classmethod
    def _mon_default_type(cls, value: object) -> object:
        if isinstance(value, Mapping) and "type" not in value:
            return {"type": "PUB", **value}
        return value

    @field_validator("in_", "out", "mon", mode="after")
    @classmethod
    def _type_fits_kind(cls, value: SocketSpec | None, info: ValidationInfo) -> SocketSpec | None:
        kind = info.data.get("kind")
        if value is None or kind is None:
            return value
        side = "in" if info.field_name == "in_" else str(info.field_name)
        allowed = KIND_SOCKET_TYPES[kind].get(side)
        if allowed is None:
            raise _fail([((), (f"a {kind} has no monitor socket: only a monitored_queue has mon"))])
        if value.type not in allowed:
            raise _fail(
                [
                    (
                        ("type",),
                        (
                            f"a {kind}'s {side}-socket must be {_or(allowed)}, not {value.type} "
                            f"({_kind_summary(kind)})"
                        ),
                    )
                ]
            )
        return value

    @field_validator("in_prefix", "out_prefix", mode="after")
    @classmethod
    def _prefix(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        default = "in" if info.field_name == "in_prefix" else "out"
        if kind is not None and kind != "monitored_queue" and value != default:
            raise _error(
                f"a {kind} has no monitor, so no prefixes: only a "
                f"monitored_queue has {info.field_name}"
            )
        if not value:
            raise PydanticCustomError(
                "devmgr", "must not be empty (it is the monitor's first frame)", {}
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _error(f"{_show(value)} cannot be encoded as UTF-8") from None
        return value

    @field_validator("requires", mode="before")
    @classmethod
    def _few_requires(cls, value: object) -> object:
        if isinstance(value, list | tuple) and len(value) > MAX_REQUIRES:
            raise _error(f"{len(value)} requirements: at most {MAX_REQUIRES}")
        return value

    @model_validator(mode="after")
    def _own_binds(self) -> DeviceSpec:
        issues = find_bind_conflicts(self._binds(()))
        issues.extend(self._own_requires())
        if issues:
            raise _fail(issues)
        return self

    def _own_requires(self) -> list[Issue]:
        """A device requiring itself, and a requirement listed twice."""
        issues: list[Issue] = []
        seen: dict[str, int] = {}
        for i, name in enumerate(self.requires):
            if name == self.name:
                issues.append((("requires", i), f"device {name!r} requires itself"))
            elif name in seen:
                issues.append(
                    (
                        ("requires", i),
                        f"{name!r} is listed twice (also at {{ref}})",
                        ("requires", seen[name]),
                    )
                )
            seen.setdefault(name, i)
        return issues

    def _binds(self, prefix: Loc) -> list[tuple[Loc, str]]:
        binds: list[tuple[Loc, str]] = []
        for side, sock in (("in", self.in_), ("out", self.out), ("mon", self.mon)):
            if sock is not None:
                binds.extend(((*prefix, side, "bind", i), ep) for i, ep in enumerate(sock.bind))
        return binds

    def endpoints(self) -> dict[str, dict[str, list[str]] | None]:
        """Return the configured endpoints per socket, as `status` reports them."""

        def side(sock: SocketSpec | None) -> dict[str, list[str]] | None:
            if sock is None:
                return None
            return {"bind": list(sock.bind), "connect": list(sock.connect)}

        return {"in": side(self.in_), "out": side(self.out), "mon": side(self.mon)}


def _kind_summary(kind: str) -> str:
    sides = KIND_SOCKET_TYPES[kind]
    parts = [f"{side} {'|'.join(types)}" for side, types in sides.items()]
    if kind == "monitored_queue":
        parts = [f"in and out any of {'|'.join(sides['in'])}", f"mon {'|'.join(sides['mon'])}"]
    return f"{kind}: " + ", ".join(parts)


class CurveSpec(BaseModel):
    """CURVE keys that secure the manager's control socket."""

    model_config = _FROZEN

    secret_key: Path = Field(
        description="the manager's certificate with its secret key (zmq.auth's "
        "*.key_secret file); relative to the config file's folder"
    )
    authorized_keys: Path = Field(
        description="folder of the public certificates of clients allowed to connect"
    )

    @field_validator("secret_key", "authorized_keys", mode="after")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)


def _is_loopback_tcp(endpoint: str) -> bool:
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    if host in ("localhost", "lo"):
        return True
    address = _ipv4(host) if not host.startswith("[") else _ipv6(host)
    return address is not None and ipaddress.ip_address(address).is_loopback


def check_metrics(value: str) -> str | None:
    """Check a metrics 'host:port' address; return a problem or None."""
    host, colon, port = value.rpartition(":")
    if not colon or not host:
        return f"{_show(value)} is not HOST:PORT, e.g. 127.0.0.1:9101"
    problem = _check_port(port, bind=False) or _check_tcp_host(host, bind=False)
    return problem


class ManagerSettings(BaseModel):
    """The manager's own endpoints and timings."""

    model_config = _FROZEN

    control: StrictStr = Field(
        default_factory=default_control_endpoint,
        validate_default=True,  # a long $XDG_RUNTIME_DIR can overflow sun_path
        description="ROUTER endpoint of the control protocol (default: "
        "ipc://$XDG_RUNTIME_DIR/devmgr/control, else ipc:///tmp/devmgr-$UID/control)",
    )
    events: StrictStr = Field(
        default_factory=default_events_endpoint,
        validate_default=True,
        description="PUB endpoint of lifecycle events (default: `events` beside an ipc "
        "control; required when control is tcp)",
    )
    health_interval: PositiveSeconds = Field(
        default=1.0, description="seconds between health samples and device pings"
    )
    stop_timeout: Seconds = Field(default=5.0, description="seconds to drain before SIGKILL")
    curve: CurveSpec | None = Field(
        default=None, description="CURVE keys; required to bind control on tcp"
    )
    ipc_bind_dirs: tuple[Path, ...] | None = Field(
        default=None,
        description="when set, devices bind ipc endpoints only in these folders or below "
        "(symlinks resolved when a device binds); relative to the config file's folder",
    )
    insecure_tcp_control: StrictBool = Field(
        default=False,
        description="let a loopback tcp control run without CURVE: every local user can "
        "then command the manager (devmgr validate warns)",
    )
    metrics: StrictStr | None = Field(
        default=None, description="HOST:PORT of a Prometheus metrics endpoint (optional)"
    )

    @model_validator(mode="before")
    @classmethod
    def _events_beside_control(cls, data: object) -> object:
        if isinstance(data, Mapping) and "events" not in data:
            control = data.get("control")
            if isinstance(control, str) and control.startswith("ipc://"):
                path = control[len("ipc://") :]
                parent, _, name = path.rpartition("/")
                sibling = f"{parent}/events" if name != "events" else f"{path}.pub"
                return {**data, "events": f"ipc://{sibling}" if parent else "ipc://events"}
        return data

    @field_validator("control", "events", mode="after")
    @classmethod
    def _manager_endpoint(cls, value: str, info: ValidationInfo) -> str:
        value = _resolve_ipc(value, info)
        problem = check_endpoint(value, bind=True)
        if problem is None and not bind_key(value):
            problem = f"{value} picks a random port or path, which clients could not find"
        if problem is None and endpoint_is_ipv6(value):
            problem = "devmgr binds its own endpoints without the ipv6 option: use IPv4 or ipc"
        if problem:
            raise _error(problem)
        return value

    @field_validator("ipc_bind_dirs", mode="after")
    @classmethod
    def _bind_dirs(cls, value: tuple[Path, ...] | None, info: ValidationInfo) -> Any:
        if value is None:
            return None
        resolved = tuple(Path(os.path.normpath(_resolve_path(d, info))) for d in value)
        relative = [str(d) for d in resolved if not d.is_absolute()]
        if relative:
            raise _error(f"folders must be absolute paths (or in a config file): {relative}")
        return resolved

    @field_validator("metrics", mode="after")
    @classmethod
    def _metrics(cls, value: str | None) -> str | None:
        problem = None if value is None else check_metrics(value)
        if problem:
            raise _error(problem)
        return value

    @model_validator(mode="after")
    def _secure(self) -> ManagerSettings:
        issues: list[Issue] = []
        if self.control.startswith("tcp://") and "events" not in self.model_fields_set:
            issues.append(
                (
                    ("events",),
                    (
                        "required when control is tcp: give the events endpoint too, e.g. "
                        "tcp://127.0.0.1:PORT"
                    ),
                )
            )
        tcp_open = self.control.startswith("tcp://") and self.curve is None
        if tcp_open and _is_loopback_tcp(self.control) and not self.insecure_tcp_control:
            issues.append(
                (
                    ("control",),
                    (
                        f"{self.control} is open to every user of this machine, and anyone "
                        "who reaches it can stop or add devices: add a [manager.curve] table "
                        "(secret_key, authorized_keys), use ipc:// (a 0700 folder), or set "
                        "insecure_tcp_control = true to accept that"
                    ),
                )
            )
        elif tcp_open and not _is_loopback_tcp(self.control):
            issues.append(
                (
                    ("control",),
                    (
                        f"{self.control} accepts connections from other machines, and anyone who "
                        "reaches it can stop or add devices: add a [manager.curve] table "
                        "(secret_key, authorized_keys) or bind control on 127.0.0.1 or ipc://"
                    ),
                )
            )
        issues.extend(find_bind_conflicts(self.binds(())))
        if issues:
            raise _fail(issues)
        return self

    def warnings(self) -> list[tuple[str, str]]:
        """Return (place, message) for settings that are valid but unsafe or useless."""
        found: list[tuple[str, str]] = []
        if self.insecure_tcp_control:
            if self.control.startswith("tcp://") and self.curve is None:
                found.append(
                    (
                        "manager.insecure_tcp_control",
                        f"control {self.control} has no CURVE: every local user can stop, "
                        "add or reconfigure devices (and with an ipc bind create socket "
                        "files as this user)",
                    )
                )
            else:
                found.append(
                    (
                        "manager.insecure_tcp_control",
                        "has no effect: control is not tcp without CURVE",
                    )
                )
        return found

    def binds(self, prefix: Loc) -> list[tuple[Loc, str]]:
        """Return the endpoints the manager itself binds, with their places."""
        binds: list[tuple[Loc, str]] = [
            ((*prefix, "control"), self.control),
            ((*prefix, "events"), self.events),
        ]
        if self.metrics is not None:
            binds.append(((*prefix, "metrics"), f"tcp://{self.metrics}"))
        return binds


def config_conflicts(
    manager: ManagerSettings | None, devices: Mapping[str, DeviceSpec]
) -> list[Issue]:
    """Find endpoints bound twice across the manager and all devices."""
    binds: list[tuple[Loc, str]] = []
    if manager is not None:
        binds.extend(manager.binds(("manager",)))
    for key, spec in devices.items():
        binds.extend(spec._binds(("devices", key)))
    return find_bind_conflicts(binds)


def requirement_issues(
    devices: Mapping[str, DeviceSpec], known: Iterable[str] | None = None
) -> list[Issue]:
    """Requirements naming an unknown device, and every cycle, named with its path.

    `known` is the set of device names a requirement may name (default: `devices`).
    A cycle is reported once, at the `requires` entry of its first device in name
    order, as `a -> b -> c -> a`. Linear in devices + requirements (one DFS; each
    back edge closes one cycle).
    """
    names = set(devices) if known is None else set(known) | set(devices)
    issues: list[Issue] = []
    for key, spec in devices.items():
        for i, req in enumerate(spec.requires):
            if req not in names and req != spec.name:
                issues.append(
                    (
                        ("devices", key, "requires", i),
                        f"requires {req!r}, but there is no device of that name"
                        + did_you_mean(req, names),
                    )
                )
    graph = {
        key: [r for r in dict.fromkeys(spec.requires) if r in devices and r != key]
        for key, spec in devices.items()
    }
    cycles: dict[tuple[str, ...], None] = {}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path: list[str] = [root]
        where: dict[str, int] = {root: 0}
        state[root] = 1
        stack = [iter(graph[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done = path.pop()
                del where[done]
                state[done] = 2
                continue
            if state.get(nxt) == 1:  # a back edge: the path from nxt closes a cycle
                cycle = path[where[nxt] :]
                first = cycle.index(min(cycle))
                cycles[tuple(cycle[first:] + cycle[:first])] = None
            elif nxt not in state:
                state[nxt] = 1
                where[nxt] = len(path)
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    for found in cycles:
        head, second = found[0], found[1 % len(found)]
        index = devices[head].requires.index(second)
        text = " -> ".join((*found, head))
        issues.append((("devices", head, "requires", index), f"requirements form a cycle: {text}"))
    return issues


def start_levels(devices: Mapping[str, DeviceSpec]) -> list[list[str]]:
    """Group the devices into start levels: each requires only devices of earlier levels.

    Requirements outside `devices` are ignored (they are already there, or not asked
    for); the graph must be acyclic (validation refuses cycles). Stopping goes through
    the levels in reverse.
    """
    level: dict[str, int] = {}
    for root in devices:
        if root in level:
            continue
        stack = [(root, iter(devices[root].requires))]
        onpath = {root}
        while stack:
            node, reqs = stack[-1]
            req = next(reqs, None)
            if req is None:
                stack.pop()
                onpath.discard(node)
                level[node] = 1 + max(
                    (level[r] for r in devices[node].requires if r in level and r in devices),
                    default=-1,
                )
            elif req in devices and req not in level and req not in onpath:
                onpath.add(req)
                stack.append((req, iter(devices[req].requires)))
    levels: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for name in devices:
        levels[level[name]].append(name)
    return levels


#: The quiet period of a drain when a device does not set drain_quiet (seconds).
DEFAULT_DRAIN_QUIET = 0.1


def drain_budget(stop_timeout: float) -> float:
    """The longest a device's drain may take: half of stop_timeout.

    The rest is for the linger of its sockets (at most 0.4 x stop_timeout), so a device
    asked to stop is gone before the manager's SIGKILL at stop_timeout.
    """
    return stop_timeout * 0.5


def ipc_bind_issues(manager: ManagerSettings, devices: Mapping[str, DeviceSpec]) -> list[Issue]:
    """Device ipc binds outside manager.ipc_bind_dirs, when that is set."""
    if manager.ipc_bind_dirs is None:
        return []
    allowed = [str(d) for d in manager.ipc_bind_dirs]
    shown = ", ".join(allowed) or "(none)"
    issues: list[Issue] = []
    for key, spec in devices.items():
        for loc, endpoint in spec._binds(("devices", key)):
            if not endpoint.startswith("ipc://"):
                continue
            path = endpoint[len("ipc://") :]
            if path.startswith("@"):
                continue  # the abstract namespace: no file anywhere
            if path == "*":
                issues.append((loc, f"ipc://* binds in a folder libzmq picks, not in {shown}"))
            elif not path_within(path, allowed):
                issues.append((loc, f"{path} is outside manager.ipc_bind_dirs ({shown})"))
    return issues


def drain_budget_issues(manager: ManagerSettings, devices: Mapping[str, DeviceSpec]) -> list[Issue]:
    """A drain_quiet that a drain could not wait out before its stop_timeout ends it."""
    budget = drain_budget(manager.stop_timeout)
    return [
        (
            ("devices", key, "drain_quiet"),
            f"{spec.drain_quiet:g} s does not fit in manager.stop_timeout "
            f"({manager.stop_timeout:g} s): a drain may last half of it ({budget:g} s), "
            "so the quiet period must be shorter than that; raise stop_timeout or lower "
            "drain_quiet",
        )
        for key, spec in devices.items()
        if spec.drain_quiet is not None and spec.drain_quiet >= budget
    ]


class ManagerConfig(BaseModel):
    """A whole config: the manager's settings and its devices by name."""

    model_config = _FROZEN

    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    devices: dict[str, DeviceSpec] = Field(
        default_factory=dict, description="devices by name: [devices.NAME] tables"
    )
    path: Path | None = Field(
        default=None, description="the config file (None for the embedded default)"
    )

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: object) -> object:
        # In a file the table key is the name; let a plain dict say it the same way.
        if isinstance(data, Mapping) and isinstance(data.get("devices"), Mapping):
            devices = {
                key: {"name": key, **table}
                if isinstance(table, Mapping) and "name" not in table
                else table
                for key, table in data["devices"].items()
            }
            return {**data, "devices": devices}
        return data

    @model_validator(mode="after")
    def _whole(self) -> ManagerConfig:
        issues: list[Issue] = [
            (("devices", key, "name"), f"{spec.name!r} differs from the table key {key!r}")
            for key, spec in self.devices.items()
            if spec.name != key
        ]
        issues.extend(config_conflicts(self.manager, self.devices))
        issues.extend(drain_budget_issues(self.manager, self.devices))
        issues.extend(ipc_bind_issues(self.manager, self.devices))
        issues.extend(requirement_issues(self.devices))
        if issues:
            raise _fail(issues)
        return self

    def with_device(self, spec: DeviceSpec) -> ManagerConfig:
        """Return this config with `spec` added or replaced, re-checking everything."""
        devices = {**self.devices, spec.name: spec}
        return ManagerConfig(manager=self.manager, devices=devices, path=self.path)
