"""CURVE certificate files (zmq.auth's format): read them safely, write them privately.

Kept free of pyzmq so that the client can check its own secret key cheaply. A
certificate is a small text file; reading one never blocks (a FIFO or a device named
`x.key` is refused, not opened for a blocking read), never reads more than
MAX_CERTIFICATE_BYTES, and a secret key that other users can read is refused, as ssh
refuses an unprotected private key.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from devmgr._errors import ConfigError

#: Far above any certificate zmq.auth or `devmgr keygen` writes (~300 bytes).
MAX_CERTIFICATE_BYTES = 64 * 1024

_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {c: i for i, c in enumerate(_Z85)}


def is_z85_key(key: bytes) -> bool:
    """Return True when `key` is a 40-character Z85 text that decodes to 32 bytes."""
    if len(key) != 40:
        return False
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return False
    for start in range(0, 40, 5):
        value = 0
        for char in text[start : start + 5]:
            digit = _Z85_VALUE.get(char)
            if digit is None:
                return False
            value = value * 85 + digit
        if value > 0xFFFFFFFF:
            return False
    return True


def parse_certificate(data: bytes, where: str) -> tuple[bytes, bytes | None]:
    """Return (public, secret or None) from the text of a certificate, as zmq.auth reads it.

    Raises:
        ConfigError: no public key, or a key that is not 40 characters of Z85.
    """
    public: bytes | None = None
    secret: bytes | None = None
    for raw_line in data.splitlines():
        line = raw_line.strip()
        if line.startswith(b"#"):
            continue
        if line.startswith(b"public-key") and b"=" in line:
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key") and b"=" in line:
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    if public is None:
        raise ConfigError(f"{where}: no public-key in it (not a CURVE certificate)")
    if not is_z85_key(public):
        raise ConfigError(f"{where}: its public-key is not a 40-character Z85 key")
    if secret is not None and not is_z85_key(secret):
        raise ConfigError(f"{where}: its secret-key is not a 40-character Z85 key")
    return public, secret


def _too_open(st: os.stat_result) -> bool:
    """Return True when users other than the key's owner may read or change the file.

    As ssh: no group or other permission bit at all. One exception, as PostgreSQL makes
    it for its server key: a root-owned key may be group-readable (root:devmgr 0640),
    the usual way to hand a key to a service account without giving the account the
    right to change it. Nothing is ever allowed for others.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0 and os.geteuid() != 0:
        return bool(mode & 0o037)
    return bool(mode & 0o077)


def read_certificate(path: str | os.PathLike[str], *, secret: bool) -> tuple[bytes, bytes | None]:
    """Read a certificate file; with `secret=True` it must hold a private secret key.

    Raises:
        ConfigError: the file cannot be read, is not a regular file, is larger than
            MAX_CERTIFICATE_BYTES, is not a certificate, or (secret) holds no secret key
            or can be read by other users.
    """
    where = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(where, flags)
    except OSError as exc:
        raise ConfigError(f"cannot read the CURVE certificate {where}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if st.st_size > MAX_CERTIFICATE_BYTES:
            raise ConfigError(
                f"{where}: {st.st_size} bytes, too large for a CURVE certificate "
                f"(at most {MAX_CERTIFICATE_BYTES})"
            )
        chunks = []
        size = 0
        while size <= MAX_CERTIFICATE_BYTES:
            chunk = os.read(fd, MAX_CERTIFICATE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read the CURVE certificate {where}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if size > MAX_CERTIFICATE_BYTES:
        raise ConfigError(f"{where}: too large for a CURVE certificate")
    public, secret_key = parse_certificate(b"".join(chunks), where)
    if secret and not secret_key:
        raise ConfigError(f"{where}: it holds no secret key (use the *.key_secret file)")
    if secret and _too_open(st):
        mode = stat.S_IMODE(st.st_mode)
        raise ConfigError(
            f"{where}: permissions {mode:04o} are too open: a secret key must not be "
            f"readable by other users (chmod 600 {where})"
        )
    return public, secret_key


_BANNER = (
    "#   ****  Generated on {now} by devmgr keygen  ****\n"
    "#   ZeroMQ CURVE {what} Certificate\n"
    "#   {advice}\n\n"
)


def _certificate_text(public: bytes, secret: bytes | None) -> bytes:
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if secret is None:
        head = _BANNER.format(
            now=now,
            what="Public",
            advice="Exchange securely, or use a secure mechanism to verify the contents\n"
            "#   of this file after exchange. Store public certificates in your home\n"
            "#   directory, in the .curve subdirectory.",
        )
    else:
        head = _BANNER.format(
            now=now, what="**Secret**", advice="DO NOT PROVIDE THIS FILE TO OTHER USERS"
        )
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        body += f'    secret-key = "{secret.decode()}"\n'
    return (head + body).encode()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from its first byte on, complete or not at all.

    The text goes to a temporary file created with `mode` (never wider), which is then
    hard-linked to `path`: `link` fails if `path` exists, so nothing is overwritten, and
    `path` never exists half-written. Where hard links are not supported the file is
    created with O_EXCL directly.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask can only narrow it; make it exact
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(
                f"{path} exists already; remove it first to make a new pair"
            ) from None
        except OSError:  # no hard links here (some FUSE, SMB): O_EXCL on the name itself
            fd = os.open(path, flags, mode)
            try:
                os.fchmod(fd, mode)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_certificate_pair(
    directory: str | os.PathLike[str], name: str, public: bytes, secret: bytes
) -> tuple[Path, Path]:
    """Write `NAME.key` (0644) and `NAME.key_secret` (0600 from its creation on).

    Raises:
        FileExistsError: either file exists already (keys are never overwritten).
        ValueError: `name` is not a plain file name.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"--name must be a plain file name, not {name!r}")
    folder = Path(directory)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists already; remove it first to make a new pair")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(secret_file, _certificate_text(public, secret), 0o600)
    try:
        _write_new(public_file, _certificate_text(public, None), 0o644)
    except BaseException:
        secret_file.unlink()
        raise
    return public_file, secret_file
