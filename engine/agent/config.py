"""The agent's config file (TOML): what it listens on, shares, keeps free, caches and logs.

    listen = "0.0.0.0:7340"
    devices = ["CUDA0"]
    reserve_mib = { CUDA0 = 2048, default = 256 }

Every setting is optional; command-line flags override the file. A file that cannot be used
is refused whole with its line and the reason (`ConfigError`): at start the agent exits, on
SIGHUP it keeps the settings it has.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_PORT = 7340
DEFAULT_CACHE_MAX_MIB = 10 * 1024


class ConfigError(Exception):
    """The config file cannot be used; the message names the file, the line and the reason."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the agent offers to desktops; a SIGHUP can change all of it while running."""

    devices: tuple[str, ...] = ()  # ggml device names to share; empty: all of them
    reserve_mib: int = 0  # kept free on every shared device, on top of the desktop's reserve
    reserve_per_device: tuple[tuple[str, int], ...] = ()
    rpc_threads: int = 0  # CPU threads of the RPC worker when the desktop asks for 0
    rpc_spin: int | None = None  # its OpenMP threads' spins before they sleep (procs.omp_env)
    cache: bool = True
    cache_dir: Path | None = None  # default: <state dir>/tensor-cache
    cache_max_mib: int = DEFAULT_CACHE_MAX_MIB

    def reserve_bytes(self, device: str) -> int:
        per = dict(self.reserve_per_device)
        return per.get(device, self.reserve_mib) * 1024 * 1024

    def shares(self, device: str) -> bool:
        return not self.devices or device in self.devices


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the file can say; None means "not set here" (the flag or default wins)."""

    path: Path | None = None
    listen: tuple[str, int] | None = None
    advertise: bool | None = None
    interfaces: tuple[str, ...] | None = None
    state_dir: Path | None = None
    log_dir: Path | None = None
    log_level: str | None = None
    worker: WorkerSettings = field(default_factory=WorkerSettings)


def default_config_path() -> Path:
    """~/.config/corral-agent/agent.toml (the system service passes /etc/corral/agent.toml)."""
    return Path(platformdirs.user_config_dir("corral-agent")) / "agent.toml"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 picks a free one. Raises ValueError."""
    host, sep, port = text.rpartition(":")
    # isdigit() alone takes "²", which int() refuses
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:{DEFAULT_PORT})")
    return host.strip("[]") or "0.0.0.0", int(port)


_DEVICE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string in quotes, not {_show(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_show(value)}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 or more, not {_show(value)}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f'must be a list of names like ["eth0"], not {_show(value)}')
    return tuple(value)


def _devices(value: Any) -> tuple[str, ...]:
    names = _names(value)
    bad = [n for n in names if not _DEVICE.match(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a ggml device name (like CUDA0, Metal or CPU)")
    return names


def _listen(value: Any) -> tuple[str, int]:
    return parse_listen(_string(value))


def _dir(value: Any) -> Path:
    text = _string(value)
    if not text:
        raise ValueError("must be a folder path, not empty")
    return Path(text).expanduser()


def _level(value: Any) -> str:
    text = _string(value).upper()
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return text


def _reserve(value: Any) -> tuple[int, tuple[tuple[str, int], ...]]:
    if isinstance(value, dict):
        per: dict[str, int] = {}
        for device, mib in value.items():
            try:
                per[device] = _count(mib)
            except ValueError as exc:
                raise ValueError(f"{device}: {exc}") from None
        default = per.pop("default", 0)
        return default, tuple(sorted(per.items()))
    try:
        return _count(value), ()
    except ValueError:
        raise ValueError(
            "must be MiB for every device (512) or per device "
            f"({{ CUDA0 = 2048, default = 256 }}), not {_show(value)}"
        ) from None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


_KEYS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen,
    "advertise": _bool,
    "interfaces": _names,
    "devices": _devices,
    "reserve_mib": _reserve,
    "rpc_threads": _count,
    "rpc_spin": _count,
    "cache": _bool,
    "cache_dir": _dir,
    "cache_max_mib": _count,
    "state_dir": _dir,
    "log_dir": _dir,
    "log_level": _level,
}


def _line_of(text: str, key: str) -> int:
    """The line that sets `key` at the top level (tomllib keeps no positions)."""
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*[=.]")
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("["):
            in_table = True
            if re.match(rf"^\s*\[\s*{re.escape(key)}\s*\]", line):
                return number
            continue
        if not in_table and pattern.match(line):
            return number
    return 0


def parse_config(text: str, path: Path) -> AgentConfig:
    """The settings in `text` (the contents of `path`); raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        line = int(m.group(1)) if m else len(text.splitlines())
        raise ConfigError(path, line, f"not valid TOML: {reason}") from None
    values: dict[str, Any] = {}
    for key, raw in data.items():
        check = _KEYS.get(key)
        if check is None:
            near = difflib.get_close_matches(key, list(_KEYS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(
                path,
                _line_of(text, key),
                f"unknown setting {key!r}{hint}; known: {', '.join(_KEYS)}",
            )
        try:
            values[key] = check(raw)
        except ValueError as exc:
            raise ConfigError(path, _line_of(text, key), f"{key} {exc}") from None
    reserve, per = values.pop("reserve_mib", (0, ()))
    worker = WorkerSettings(
        devices=values.pop("devices", ()),
        reserve_mib=reserve,
        reserve_per_device=per,
        rpc_threads=values.pop("rpc_threads", 0),
        rpc_spin=values.pop("rpc_spin", None),
        cache=values.pop("cache", True),
        cache_dir=values.pop("cache_dir", None),
        cache_max_mib=values.pop("cache_max_mib", DEFAULT_CACHE_MAX_MIB),
    )
    return AgentConfig(path=path, worker=worker, **values)


def load_config(path: Path, required: bool) -> AgentConfig:
    """Read the file at `path`; a missing file is the defaults unless `required`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(path, 0, "no such file") from None
        return AgentConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, 0, f"cannot read it: {exc}") from None
    return parse_config(text, path)
