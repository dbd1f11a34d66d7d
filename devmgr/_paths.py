"""Where devmgr keeps its runtime files (control and events sockets, device control).

Kept free of pydantic and zmq, and of pathlib at import: the client resolves the default
endpoint from here on every `devmgr status`, and each import is start-up time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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
    """Create `path` (mode 0700) if missing and refuse one that others can write to.

    Raises:
        PermissionError: the folder exists but belongs to another user or is writable by
            others, so a socket in it could be hijacked.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


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


def unix_socket_in_use(path: str | os.PathLike[str]) -> bool:
    """Return True when a process accepts connections on the unix socket at `path`.

    libzmq's ipc bind unlinks an existing socket file and binds anyway, silently cutting
    off whoever listened there; devmgr asks first.
    """
    import socket

    path = os.fspath(path)
    if path.startswith(("@", "*")) or not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
