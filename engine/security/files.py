"""Owner-only, atomic writes for keys and pin lists."""

from __future__ import annotations

import os
from pathlib import Path


class SecurityFileError(Exception):
    """A key, certificate or pin list that cannot be read or written; says what to do."""


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically (a crash leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise SecurityFileError(
            f"cannot write {path}: {exc.strerror or exc} (is the disk full or the folder "
            "read-only?); nothing was changed"
        ) from None
