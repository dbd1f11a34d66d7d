"""Name a process for `ps`, `top` and `pgrep`: its title (argv) and its kernel comm name.

Without this every device shows as `python3 -B -c from multiprocessing.forkserver import
main ...`. setproctitle rewrites the argv area that `ps -f` and /proc/PID/cmdline show;
the comm name (`ps -o comm`, `top`, `pgrep` by default, /proc/PID/comm) is set with
prctl(PR_SET_NAME), which the kernel cuts at 15 bytes.
"""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15
_COMM_BYTES = 15  # TASK_COMM_LEN (16) less the terminating NUL


def comm_name(title: str) -> bytes:
    """Return the comm name for `title`: its first 15 bytes (whole UTF-8 characters)."""
    raw = title.encode()[:_COMM_BYTES]
    return raw.decode(errors="ignore").rstrip().encode()


def set_process_title(title: str, comm: str | None = None) -> None:
    """Set this process's title and comm name (default: the title's first 15 bytes).

    A missing facility is skipped silently.
    A title is a convenience for the operator: failing to set one must never stop a
    device or the manager from running.
    """
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except Exception:  # pragma: no cover - setproctitle is a dependency
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # After setproctitle, which sets a comm name of its own (cut mid-word).
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(comm_name(comm or title)), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
