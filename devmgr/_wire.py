"""Every fact of devmgr's interface that other programs read, defined once.

The control protocol's version, request limit and error codes, the device states and
exit reasons that `status` and the events carry, the layout of a device loop's
STATISTICS reply, and the exit statuses of the `devmgr` command. Every other module
reads them from here: the pydantic models of `_protocol` take their types from these
definitions, the metrics and the CLI their names and numbers, and docs/ is generated
from them (`python -m devmgr._docs`). The Cython core writes the STATISTICS reply in C;
tests/test_wire.py pins its frames to STAT_KEYS.

Kept free of pydantic and zmq: `devmgr status` imports it on every start.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import StrEnum
from typing import Final, Literal, get_args

# ---- the control protocol (docs/protocol.md) ----------------------------------------

#: The `v` of every request and reply; a request with any other `v` is a bad_request.
ProtocolVersion = Literal[1]
PROTOCOL_VERSION: Final[ProtocolVersion] = get_args(ProtocolVersion)[0]

#: A request frame larger than this is answered `too_large` without being parsed.
MAX_REQUEST_BYTES: Final = 1 << 20
#: The longest `id` (as JSON) a request may carry: it is echoed in the reply.
MAX_ID_BYTES: Final = 1024
#: The longest error message a reply carries; a longer one is cut, saying how much.
MAX_ERROR_CHARS: Final = 16 << 10
#: The most names one `status`, `start`, `stop` or `restart` request may give.
MAX_NAMES: Final = 10_000
#: Replies queued for one control client that does not read them; more are dropped
#: (and counted in `status`'s `manager.replies_dropped`).
CONTROL_SNDHWM: Final = 100

#: The `error.code` of an error reply.
ErrorCode = Literal[
    "bad_request",
    "unknown_command",
    "unknown_device",
    "invalid_spec",
    "conflict",
    "too_large",
    "internal",
]
ERROR_CODES: Final[tuple[ErrorCode, ...]] = get_args(ErrorCode)
#: What each error code means (docs/protocol.md is generated from these words).
ERROR_MEANINGS: Final[dict[ErrorCode, str]] = {
    "bad_request": "the frame is not a request: not one frame, not JSON, not an object, "
    "a missing or ill-typed field, a `v` other than the protocol version, or `args` the "
    "command does not take",
    "unknown_command": "`cmd` is not a command of this protocol",
    "unknown_device": "a name in the request is not a device of this manager",
    "invalid_spec": "a device spec (`add`) or the config file (`reload`) fails validation, "
    "or a new device failed its first start for a reason other than a taken endpoint; "
    "`message` lists every problem",
    "conflict": "the request collides with the present state: a device of that name "
    "exists, an endpoint is in use (by this manager or any other process), or the device "
    "is not in a state that allows the command",
    "too_large": f"the request frame is over {MAX_REQUEST_BYTES} bytes (1 MiB)",
    "internal": "the manager failed to carry out a valid request; it goes on serving",
}


class State(StrEnum):
    """Lifecycle state of a device, as `status` reports it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"


#: What each state means (docs/protocol.md).
STATE_MEANINGS: Final[dict[State, str]] = {
    State.STARTING: "a process was started; it has not yet bound and connected every "
    "socket and answered a PING through its loop",
    State.RUNNING: "the process runs and its loop answers",
    State.PAUSED: "running, but the loop reads no input (after `pause`)",
    State.BACKOFF: "the process ended; an automatic restart waits for its backoff delay",
    State.STOPPING: "asked to stop: draining, then SIGTERM, then SIGKILL at `stop_timeout`",
    State.STOPPED: "no process, and none will be started without a `start`",
    State.FATAL: "too many automatic restarts within the restart window; no more "
    "restarts until a manual `start` or `restart`",
}


class Reason(StrEnum):
    """Why the last child process ended (``last_exit.reason``)."""

    EXITED = "exited"
    KILLED = "killed"
    MEMORY = "memory"
    UNRESPONSIVE = "unresponsive"
    START_FAILED = "start_failed"
    STOPPED = "stopped"


#: What each exit reason means (docs/protocol.md).
REASON_MEANINGS: Final[dict[Reason, str]] = {
    Reason.EXITED: "the process exited by itself (`code` holds its exit status)",
    Reason.KILLED: "a signal ended the process (`signal` holds its number) without a "
    "stop or a health verdict of the manager's",
    Reason.MEMORY: "the manager killed it: its resident size was above `max_rss_mb`",
    Reason.UNRESPONSIVE: "the manager killed it: its loop did not answer within `ping_timeout`",
    Reason.START_FAILED: "the device could not bind, connect or configure a socket",
    Reason.STOPPED: "a requested stop (`stop`, `restart`, `remove`, `reload`, shutdown)",
}


# ---- the device control channel's STATISTICS reply (docs/protocol.md) ---------------

#: The STATISTICS reply's 8 counters, in frame order: messages then bytes received,
#: messages then bytes sent, for the in-socket and then the out-socket.
STAT_KEYS: Final[tuple[str, ...]] = (
    "in_msgs_received",
    "in_bytes_received",
    "in_msgs_sent",
    "in_bytes_sent",
    "out_msgs_received",
    "out_bytes_received",
    "out_msgs_sent",
    "out_bytes_sent",
)
#: Each frame is one unsigned 64-bit integer in the machine's byte order.
STATS_FRAME: Final = struct.Struct("=Q")
_STATS_REPLY = struct.Struct(f"={len(STAT_KEYS)}Q")


def parse_stats(frames: Sequence[bytes]) -> dict[str, int]:
    """Turn a STATISTICS reply (8 native-endian uint64 frames) into a dict by STAT_KEYS.

    Raises:
        ValueError: the reply is not 8 frames of 8 bytes (e.g. an ERROR reply).
    """
    if len(frames) != len(STAT_KEYS) or any(len(f) != STATS_FRAME.size for f in frames):
        raise ValueError(f"not a STATISTICS reply: {list(frames)[:3]!r}...")
    values = _STATS_REPLY.unpack(b"".join(bytes(f) for f in frames))
    return dict(zip(STAT_KEYS, values, strict=True))


# ---- the `devmgr` command's exit statuses (docs/cli.md) -----------------------------

EXIT_OK: Final = 0
EXIT_ERROR_REPLY: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_NOT_RUNNING: Final = 4

#: Exit status -> what it means, in the words of `devmgr --help` and docs/cli.md.
EXIT_STATUSES: Final[dict[int, str]] = {
    EXIT_OK: "done",
    EXIT_ERROR_REPLY: "the manager answered with an error (`error: CODE: message` on stderr)",
    EXIT_USAGE: "usage error or bad config: nothing was started or sent",
    EXIT_UNREACHABLE: "no manager answered: nothing listens at the endpoint, or no reply "
    "within --timeout",
    EXIT_NOT_RUNNING: "`status` only: a device is not running (of every autostart device, "
    "or of the named ones), as `systemctl is-active` says",
}
