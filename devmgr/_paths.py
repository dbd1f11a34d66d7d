"""Where devmgr keeps its runtime files (control and events sockets, device control).

Kept free of pydantic and zmq, and of pathlib at import: the client resolves the default
endpoint from here on every `devmgr status`, and each import is start-up time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path


def _runtime_dir_str() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "devmgr")
    return f"/tmp/devmgr-{os.getuid()}"


def runtime_dir() -> Path:
    """Return the per-user runtime folder: $XDG_RUNTIME_DIR/devmgr, else /tmp/devmgr-$UID."""
    from pathlib import Path

    return Path(_runtime_dir_str())


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing; refuse a symlink or someone else's folder.

    Checked without following a symlink: the folder is opened with O_NOFOLLOW and its
    owner read from that fd, so a planted `/tmp/devmgr-0 -> /etc` is refused, never
    chmodded or filled with sockets. A folder of ours that others may enter is set to
    0700 through the same fd.

    Raises:
        PermissionError: the path is a symlink or not a folder, or the folder belongs to
            another user, so a socket in it could be hijacked or faked.
    """
    import errno

    name = os.fspath(path)
    parent = os.path.dirname(name)
    if parent and not os.path.lexists(parent):
        make_dirs(parent)
    try:
        os.mkdir(name, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError(f"{name}: {_why_not_private(name)}") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise PermissionError(f"{name}: {_why_not_private(name, st)}")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _why_not_private(name: str, st: os.stat_result | None = None) -> str:
    import stat

    st = st or os.lstat(name)
    if stat.S_ISLNK(st.st_mode):
        return (
            f"is a symbolic link (to {os.readlink(name)}): devmgr does not follow it; "
            "remove it (someone may have planted it)"
        )
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder: remove it"
    if st.st_uid != os.getuid():
        return (
            f"belongs to uid {st.st_uid}, not to you ({os.getuid()}): someone else may "
            "have planted it; remove it"
        )
    return f"is open to other users (mode {st.st_mode & 0o777:04o}): expected 0700"


def untrusted_default_endpoint(endpoint: str) -> str | None:
    """Say why an ipc endpoint in the per-user runtime folder must not be trusted, else None.

    The client's side of ensure_private_dir: before talking to a socket in
    $XDG_RUNTIME_DIR/devmgr or /tmp/devmgr-$UID, the folder must be a real folder of
    ours that nobody else may enter, and the socket ours: a fake manager in a folder
    someone else made must not get our requests (or answer them). Other endpoints are
    the user's explicit choice and are not checked.
    """
    import stat

    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    folder = _runtime_dir_str()
    if os.path.dirname(os.path.normpath(path)) != os.path.normpath(folder):
        return None
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None  # nothing there to trust: the connection will say nothing listens
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"{folder} {_why_not_private(folder, st)}"
    try:
        sock = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(sock.st_mode):
        return f"{path} is not a socket"
    if sock.st_uid != os.getuid():
        return f"{path} belongs to uid {sock.st_uid}, not to you ({os.getuid()})"
    return None


def make_dirs(path: str | os.PathLike[str], mode: int = 0o700) -> None:
    """Create `path` and its missing parents, each created one with exactly `mode`.

    mkdir's mode is cut by the umask (so 0777 under umask 000 is what `mkdir -p` gives);
    every folder devmgr creates is set to `mode` through its own fd, not its path.
    Folders that exist already are left as they are.
    """
    path = os.path.abspath(os.fspath(path))
    missing: list[str] = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode & 0o700)  # never wider than ours while it is made
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def path_within(path: str, folders: Iterable[str]) -> bool:
    """Return True when `path` lies below one of `folders` (all absolute, compared as text)."""
    path = os.path.normpath(path)
    for given in folders:
        folder = os.path.normpath(given)
        if path != folder and os.path.commonpath([folder, path]) == folder:
            return True
    return False


def bind_outside(path: str, folders: Iterable[str]) -> str | None:
    """Say why binding `path` would leave `folders` once symlinks are resolved, else None.

    Validation compares the configured text; a symlinked folder on the way could still
    lead elsewhere, so the device checks the real folder right before it binds.
    """
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    allowed = [os.path.realpath(f) for f in folders]
    if path_within(real, allowed):
        return None
    return f"{path} is {real} once symlinks are resolved: outside manager.ipc_bind_dirs"


def default_control_endpoint() -> str:
    return f"ipc://{os.path.join(_runtime_dir_str(), 'control')}"


def default_events_endpoint() -> str:
    return f"ipc://{os.path.join(_runtime_dir_str(), 'events')}"


def ipc_path(endpoint: str) -> Path | None:
    """Return the filesystem path of an ipc:// endpoint, else None."""
    if endpoint.startswith("ipc://"):
        from pathlib import Path

        return Path(endpoint[len("ipc://") :])
    return None


class IpcPathTaken(OSError):
    """Something devmgr must not replace is at an ipc path: a file, a folder, a link, a
    socket that is (or may be) in use. `errno` is EADDRINUSE for a socket, else EEXIST."""


def _describe_existing(path: str) -> tuple[int, str] | None:
    """Say what occupies `path` and why it stays; None once a proven-dead socket is gone.

    Only a unix socket whose connect is refused (ECONNREFUSED: nobody listens) is
    removed. A timeout or a full backlog (EAGAIN: a stopped or busy listener) proves
    nothing, so such a socket is kept, as is anything that is not a socket.
    """
    import errno
    import socket
    import stat

    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = before.st_mode
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    for test, what in kinds:
        if test(mode):
            return errno.EEXIST, f"{path} is {what}: devmgr replaces nothing but a dead socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        code = probe.connect_ex(path)
    finally:
        probe.close()
    if code in (0, errno.EINPROGRESS):
        return errno.EADDRINUSE, f"{path} is in use: a process listens on that socket"
    if code == errno.EAGAIN:
        return errno.EADDRINUSE, (
            f"{path} is in use: a process listens on that socket (its backlog is full: "
            "it is busy or stopped)"
        )
    if code != errno.ECONNREFUSED:
        return errno.EADDRINUSE, (
            f"{path} is a socket devmgr cannot tell is unused ({os.strerror(code)}): "
            "remove it if nothing uses it"
        )
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
            os.unlink(path)  # refused: nobody listens, a left-over of a process that died
    except FileNotFoundError:
        pass
    except OSError as exc:
        return errno.EADDRINUSE, f"{path} is a dead socket devmgr cannot remove: {exc.strerror}"
    return None


def remove_dead_socket(path: str) -> bool:
    """Remove the unix socket file at `path` if nobody listens on it; True if none is left.

    The same proof as for a bind: only a socket whose connect is refused goes; a file, a
    link, a live or undecidable socket stays (False).
    """
    return _describe_existing(path) is None


def bind_unix_listener(
    path: str, backlog: int = 100, mode: int | None = None
) -> tuple[int, tuple[int, int] | None]:
    """Bind and listen on a unix stream socket at `path`; return (fd, (st_dev, st_ino)).

    Unlike libzmq's ipc bind, which unlinks whatever is at the path first, this replaces
    only a socket proven dead. bind(2) itself never replaces anything, so no check-then-
    act window lets a file appear and be deleted. The fd is meant for ZMQ_USE_FD; the
    identity (None for an abstract `@name`) lets the owner unlink only its own file.
    `mode` (less the umask) is the file's mode from the start: Linux takes a socket
    file's mode from the socket's inode, so no chmod after the fact leaves a window.

    Raises:
        IpcPathTaken: something that must stay is at `path`.
        OSError: any other bind error (a missing folder, a permission).
    """
    import errno
    import socket

    abstract = path.startswith("@")
    address = "\0" + path[1:] if abstract else path
    for attempt in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if mode is not None:
                os.fchmod(sock.fileno(), mode)
            sock.bind(address)
            sock.listen(backlog)
            ident = None
            if not abstract:
                st = os.lstat(path)
                ident = (st.st_dev, st.st_ino)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if abstract:
                raise IpcPathTaken(errno.EADDRINUSE, f"{path} is in use") from None
            taken = _describe_existing(path)
            if taken is not None:
                raise IpcPathTaken(*taken) from None
            if attempt == 2:
                raise IpcPathTaken(errno.EADDRINUSE, f"{path} is taken again and again") from None
            continue
        return sock.detach(), ident
    raise AssertionError("unreachable")  # pragma: no cover


def unlink_if_ours(path: str | os.PathLike[str], ident: tuple[int, int] | None) -> None:
    """Remove the socket file at `path` if it is still the one we bound (same inode)."""
    if ident is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


def safe_bind(
    sock: Any, endpoint: str, mode: int | None = None
) -> tuple[str, tuple[int, int] | None] | None:
    """Bind the zmq socket `sock` to `endpoint` without libzmq unlinking anything.

    For ipc:// (but for `ipc://*`, a fresh path of libzmq's own) devmgr binds the unix
    socket itself and hands libzmq the listening fd (ZMQ_USE_FD), so libzmq neither
    unlinks the path before binding nor after closing; `mode` is the socket file's
    mode (see bind_unix_listener). Returns (path, identity) of an
    ipc file it bound, for `unlink_if_ours` at the end, else None.

    Raises:
        IpcPathTaken: the ipc path holds something that must stay.
        OSError: the unix socket could not be bound (missing folder, permission).
        zmq.ZMQError: libzmq refused the endpoint.
    """
    import zmq

    path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
    if path is None or path == "*":
        sock.bind(endpoint)
        return None
    backlog = max(1, int(sock.getsockopt(zmq.BACKLOG)))
    fd, ident = bind_unix_listener(path, backlog=backlog, mode=mode)
    try:
        sock.setsockopt(zmq.USE_FD, fd)
        try:
            sock.bind(endpoint)
        finally:
            sock.setsockopt(zmq.USE_FD, -1)  # it applies to every later bind of sock
    except BaseException:
        os.close(fd)
        unlink_if_ours(path, ident)
        raise
    return path, ident


class BoundFile:
    """An ipc socket file devmgr bound for a zmq socket (see safe_bind).

    `remove()` unlinks it only while it is still the file we bound. `keep()` binds it
    again when it has gone (an `rm -rf` of the runtime folder while the manager runs):
    the folders are made again (private ones with ensure_private_dir) and a second
    listener is bound at the same path; connections made before go on.
    """

    def __init__(self, sock: Any, endpoint: str, bound: tuple[str, tuple[int, int] | None]):
        self.sock = sock
        self.endpoint = endpoint
        self.path, self.ident = bound
        self._last_error: str | None = None

    def intact(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def keep(self, log: Any) -> bool:
        """Bind the file again if it has gone; return True when it is in place."""
        if self.ident is None or self.intact():
            return True
        import zmq

        folder = os.path.dirname(self.path)
        runtime = _runtime_dir_str()
        try:
            if folder == runtime or os.path.dirname(folder) == runtime:
                from pathlib import Path

                ensure_private_dir(Path(runtime))
                ensure_private_dir(Path(folder))
            else:
                make_dirs(folder)
            # No unbind of the old listener first: libzmq would close every connection
            # it accepted (connected clients, device channels). It stays, on a nameless
            # inode, until the socket closes.
            bound = safe_bind(self.sock, self.endpoint, mode=0o600)
        except (OSError, zmq.ZMQError) as exc:
            message = f"{self.endpoint} is gone and cannot be bound again: {exc}"
            if message != self._last_error:
                log.error("%s", message)
                self._last_error = message
            return False
        assert bound is not None
        self.path, self.ident = bound
        self._last_error = None
        log.warning(
            "%s was removed while the manager ran (its folder %s too?): bound it again",
            self.path,
            folder,
        )
        return True

    def remove(self) -> None:
        unlink_if_ours(self.path, self.ident)
