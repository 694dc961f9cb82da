"""Logs: human lines on stderr, and JSON lines in a rotated file in the platform's log dir.

One JSON object per line (`ts`, `level`, `logger`, `msg`, `pid`, plus any `extra=` fields) so a
log can be searched with jq or shipped as is; five files of 5 MiB at most.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

import platformdirs

MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 4

# attributes every LogRecord has; anything else came from extra= and goes into the JSON
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | str) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def default_log_dir(app: str) -> Path:
    """~/.local/state/<app>/log on Linux, ~/Library/Logs/<app> on macOS."""
    return Path(platformdirs.user_log_dir(app))


def setup_logging(app: str, level: str, log_dir: Path | None) -> Path | None:
    """Log to stderr at `level`, and to <log_dir>/<app>.log; returns the file, None if unusable.

    A log dir that cannot be made is not fatal: the program runs with stderr only and says so.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    folder = log_dir or default_log_dir(app)
    path = folder / f"{app}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
        )
    except OSError as exc:
        logging.getLogger(app).warning(
            "cannot write logs to %s (%s); logging to stderr only", folder, exc.strerror or exc
        )
        return None
    handler.setFormatter(JsonLines())
    root.addHandler(handler)
    return path
