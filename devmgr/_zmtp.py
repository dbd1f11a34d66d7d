"""A minimal ZMTP 3.0 DEALER (NULL mechanism) on plain sockets, for a fast-starting client.

`import zmq` costs `devmgr status` about a quarter of its run time, for one request
and one reply. This speaks just enough of ZMTP 3.0 (https://rfc.zeromq.org/spec/23/)
to talk to the manager's ROUTER over ipc:// or tcp://: the greeting, the READY command
with Socket-Type DEALER, and framed messages. Everything is blocking with deadlines;
there is no queueing, no reconnection in the background and no CURVE (CURVE clients
use pyzmq). Libzmq accepts a 3.0 peer and speaks 3.0 back.
"""

from __future__ import annotations

# The C module rather than `socket`: the wrapper builds its enums at import, ~4 ms of a
# command that should take a few dozen; nothing here needs what the wrapper adds.
import _socket as socket
import struct
import time

# signature (0xFF, 8 padding bytes, 0x7F), version 3.0, mechanism "NULL", as-server 0
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00")
GREETING += b"\x00" * 32

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_RETRY_INTERVAL = 0.02  # between connection attempts while a listen backlog is full

#: The largest message frame accepted from the peer. The manager's largest replies (the
#: status of a few thousand devices) are a few MiB; a peer announcing more is refused
#: before anything is allocated for it.
MAX_FRAME_BYTES = 64 << 20
#: The largest command frame (READY, PING, ERROR): libzmq's are a few dozen bytes.
MAX_COMMAND_BYTES = 64 << 10


class ZmtpError(Exception):
    """The peer is not a ZMTP 3 NULL endpoint we can talk to (message says why)."""


class ZmtpTimeout(Exception):
    """The deadline passed before the operation finished."""


class ConnectionLost(Exception):
    """The peer closed the connection."""


class NothingListens(ZmtpError):
    """Nothing listens at the endpoint (no socket file, a stale one, connection refused)."""

    def __init__(self, endpoint: str, why: str) -> None:
        self.why = why
        super().__init__(f"nothing listens at {endpoint} ({why})")


def _nothing_listens(endpoint: str, exc: OSError) -> NothingListens:
    if isinstance(exc, FileNotFoundError):
        why = "no such socket file"
    elif endpoint.startswith("ipc://"):
        why = "connection refused: a stale socket file, left by a manager that was killed?"
    else:
        why = "connection refused"
    return NothingListens(endpoint, why)


def probe(endpoint: str, deadline: float) -> None:
    """Connect to `endpoint` and hang up at once: is anything listening there?

    Raises:
        NothingListens: no socket file, a stale one, or connection refused.
        ZmtpTimeout: the connection was not made by the deadline (something may listen).
        OSError: another error (permission denied, no route to the host...).
    """
    family, address = _address(endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise _nothing_listens(endpoint, exc) from None
    except (TimeoutError, BlockingIOError):  # a full listen backlog: something is there
        raise ZmtpTimeout(f"cannot connect to {endpoint}") from None
    finally:
        sock.close()


def supported(endpoint: str) -> bool:
    """Return True for the endpoint forms this module can connect to."""
    try:
        _address(endpoint)
    except ValueError:
        return False
    return True


def _address(endpoint: str) -> tuple[int, str | tuple[str, int]]:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path or path == "*":
            raise ValueError(endpoint)
        # libzmq maps a leading "@" to Linux's abstract namespace
        return socket.AF_UNIX, ("\0" + path[1:]) if path.startswith("@") else path
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://") :].rpartition(":")
        if not sep or not port.isdigit() or not host or ";" in host or host == "*":
            raise ValueError(endpoint)
        if host.startswith("[") and host.endswith("]"):
            return socket.AF_INET6, (host[1:-1], int(port))
        return socket.AF_INET, (host, int(port))
    raise ValueError(endpoint)


def _command(name: bytes, body: bytes) -> bytes:
    payload = bytes([len(name)]) + name + body
    if len(payload) > 255:
        return struct.pack(">BQ", _COMMAND | _LONG, len(payload)) + payload
    return struct.pack(">BB", _COMMAND, len(payload)) + payload


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def _parse_properties(data: bytes) -> dict[bytes, bytes]:
    """Parse ZMTP metadata (name length, name, 4-byte value length, value)...

    Raises:
        ZmtpError: the metadata is truncated or malformed.
    """
    props: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        name_len = data[pos]
        if name_len == 0 or pos + 1 + name_len + 4 > len(data):
            raise ZmtpError("malformed metadata in a ZMTP command (truncated property)")
        name = data[pos + 1 : pos + 1 + name_len]
        pos += 1 + name_len
        (value_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + value_len > len(data):
            raise ZmtpError("malformed metadata in a ZMTP command (truncated value)")
        props[name.lower()] = data[pos : pos + value_len]
        pos += value_len
    return props


def _command_name(body: bytes) -> tuple[bytes, bytes]:
    """Split a command frame into its name and its data.

    Raises:
        ZmtpError: the frame is too short for the name it announces.
    """
    if not body or body[0] == 0 or len(body) < 1 + body[0]:
        raise ZmtpError("malformed ZMTP command (truncated name)")
    return bytes(body[1 : 1 + body[0]]), bytes(body[1 + body[0] :])


class ZmtpDealer:
    """One ZMTP connection to a ROUTER, used as a DEALER."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._family, self._address = _address(endpoint)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        #: True once the last connect() reached a listener (even if the handshake failed)
        self.reached = False

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    # ---- connection ----------------------------------------------------------------

    def connect(self, deadline: float) -> None:
        """Connect and handshake by `deadline`.

        Raises:
            NothingListens: at once, when nothing listens (no waiting for a manager to
                appear: a client says so rather than hang for its whole timeout).
            ZmtpTimeout: something listens but the handshake did not finish in time.
            ZmtpError: the peer wants another mechanism (CURVE) or is not ZMTP 3.
        """
        self.reached = False
        while True:
            sock = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(self._address)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise _nothing_listens(self.endpoint, exc) from None
            except BlockingIOError:
                # a unix socket's full listen backlog (EAGAIN): a live but busy or
                # stopped listener; try again until the deadline
                sock.close()
                if time.monotonic() + _RETRY_INTERVAL >= deadline:
                    raise ZmtpTimeout(f"cannot connect to {self.endpoint}") from None
                time.sleep(_RETRY_INTERVAL)
                continue
            except TimeoutError:
                sock.close()
                raise ZmtpTimeout(f"cannot connect to {self.endpoint}") from None
            except OSError:
                sock.close()
                raise
            break
        self.reached = True
        if self._family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            self._handshake(deadline)
        except BaseException:
            self.close()
            raise

    def _handshake(self, deadline: float) -> None:
        # Staged as libzmq does it: signature and major version first, the rest once the
        # peer's have arrived, so a peer that rejects our mechanism and hangs up has
        # already sent the whole greeting that says which mechanism it wants.
        self._sendall(GREETING[:11], deadline)
        peer = self._read_exact(11, deadline)
        if peer[0] != 0xFF or not peer[9] & 0x01 or peer[10] < 3:
            raise ZmtpError(f"{self.endpoint} does not speak ZMTP 3")
        self._sendall(GREETING[11:], deadline)
        peer += self._read_exact(64 - 11, deadline)
        mechanism = peer[12:32].rstrip(b"\x00")
        if mechanism != b"NULL":
            raise ZmtpError(
                f"it requires the {mechanism.decode(errors='replace')} mechanism "
                "(give the client and server certificates)"
            )
        ready = _property(b"Socket-Type", b"DEALER") + _property(b"Identity", b"")
        self._sendall(_command(b"READY", ready), deadline)
        while True:
            flags, body = self._read_frame(deadline)
            if not flags & _COMMAND:
                raise ZmtpError(f"{self.endpoint} sent a message before READY")
            name, data = _command_name(body)
            if name == b"READY":
                props = _parse_properties(data)
                if props.get(b"socket-type") not in (b"ROUTER", b"DEALER", b"REP"):
                    kind = props.get(b"socket-type", b"?").decode(errors="replace")
                    raise ZmtpError(f"{self.endpoint} is a {kind} socket, not a ROUTER")
                return
            if name == b"ERROR":
                reason = data[1:].decode(errors="replace")
                raise ZmtpError(f"{self.endpoint} refused the connection: {reason}")

    # ---- messages ------------------------------------------------------------------

    def send(self, frames: list[bytes], deadline: float) -> None:
        """Send one message (a list of frames)."""
        out = bytearray()
        for i, frame in enumerate(frames):
            more = _MORE if i < len(frames) - 1 else 0
            if len(frame) > 255:
                out += struct.pack(">BQ", more | _LONG, len(frame))
            else:
                out += struct.pack(">BB", more, len(frame))
            out += frame
        self._sendall(bytes(out), deadline)

    def recv(self, deadline: float) -> list[bytes]:
        """Return the next message, answering PING commands on the way.

        Raises:
            ZmtpTimeout: no whole message by the deadline.
            ConnectionLost: the peer closed the connection.
            ZmtpError: the peer broke the protocol (a malformed or oversized frame).
        """
        frames: list[bytes] = []
        size = 0
        while True:
            flags, body = self._read_frame(deadline)
            if flags & _COMMAND:
                name, data = _command_name(body)
                if name == b"PING" and len(data) >= 2:
                    # PING carries a TTL (2 bytes) then a context that PONG echoes
                    self._sendall(_command(b"PONG", data[2:]), deadline)
                continue
            size += len(body)
            if size > MAX_FRAME_BYTES:
                raise ZmtpError(f"{self.endpoint} sent a message over {MAX_FRAME_BYTES} bytes")
            frames.append(bytes(body))
            if not flags & _MORE:
                return frames

    def peer_closed(self) -> bool:
        """Return True when the peer has closed the connection (checked without waiting)."""
        if self._sock is None:
            return True
        if self._buffer:
            return False
        try:
            self._sock.setblocking(False)
            try:
                data = self._sock.recv(65536)
            finally:
                self._sock.setblocking(True)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        self._buffer += data  # a stale reply or a command: keep it for recv()
        return False

    # ---- bytes on the wire ---------------------------------------------------------

    def _sendall(self, data: bytes, deadline: float) -> None:
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ZmtpTimeout("deadline passed")
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise ZmtpTimeout("send timed out") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(str(exc)) from None

    def _fill(self, size: int, deadline: float) -> None:
        assert self._sock is not None
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZmtpTimeout("receive timed out")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(min(max(65536, size - len(self._buffer)), 4 << 20))
            except TimeoutError:
                raise ZmtpTimeout("receive timed out") from None
            except ConnectionResetError as exc:
                raise ConnectionLost(str(exc)) from None
            if not chunk:
                raise ConnectionLost(f"{self.endpoint} closed the connection")
            self._buffer += chunk

    def _read_exact(self, size: int, deadline: float) -> bytes:
        self._fill(size, deadline)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_frame(self, deadline: float) -> tuple[int, bytes]:
        """Return (flags, body) of the next frame.

        Raises:
            ZmtpError: reserved flag bits set, or a frame larger than the caps (checked
                on the announced size, before anything is read or allocated for it).
        """
        self._fill(2, deadline)
        flags = self._buffer[0]
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise ZmtpError(f"{self.endpoint} sent a frame with reserved flags 0x{flags:02x}")
        if flags & _LONG:
            self._fill(9, deadline)
            (size,) = struct.unpack_from(">Q", self._buffer, 1)
            header = 9
        else:
            size = self._buffer[1]
            header = 2
        limit = MAX_COMMAND_BYTES if flags & _COMMAND else MAX_FRAME_BYTES
        if size > limit:
            what = "command" if flags & _COMMAND else "frame"
            raise ZmtpError(
                f"{self.endpoint} announced a {size}-byte {what}; the limit is {limit} bytes"
            )
        self._fill(header + size, deadline)
        body = bytes(self._buffer[header : header + size])
        del self._buffer[: header + size]
        return flags, body
