"""Read the files devmgr is pointed at (configs) without hanging or swelling on odd ones.

A config path may name a FIFO (open() blocks until a writer comes, read() until it
leaves), a device such as /dev/zero (read() never ends) or a huge file. Only a regular
file of bounded size is read; anything else is refused at once with a reason. Kept free
of pydantic and zmq: the client reads `[manager] control` through here too.
"""

from __future__ import annotations

import os
import stat

#: The largest config file devmgr reads (a config of 2,000 devices is ~360 KiB).
MAX_CONFIG_BYTES = 8 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(OSError):
    """The path exists but is not a regular file of acceptable size (a clear reason)."""


def _refuse_kind(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise FileRefused(f"{kind}, not a regular file: devmgr reads configs from regular files")


def _refuse_size(size: int, limit: int) -> None:
    if size > limit:
        raise FileRefused(f"{size} bytes; devmgr reads files of at most {limit >> 20} MiB")


def read_regular_file(path: str | os.PathLike[str], limit: int = MAX_CONFIG_BYTES) -> bytes:
    """Return the bytes of the regular file at `path` (symlinks followed), at most `limit`.

    Raises:
        FileRefused: `path` is a folder, FIFO, device or socket, or larger than `limit`.
        OSError: it cannot be opened or read (FileNotFoundError, PermissionError...).
    """
    # stat first, so that a device is never even opened (opening some has side effects);
    # O_NONBLOCK then keeps a FIFO swapped in between from blocking the open.
    _refuse_kind(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        _refuse_kind(info.st_mode)
        _refuse_size(info.st_size, limit)
        chunks: list[bytes] = []
        total = 0
        while True:  # the file may grow while we read it: never past the limit
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            _refuse_size(total, limit)
    finally:
        os.close(fd)
    return b"".join(chunks)
