"""ctypes bindings llama-cpp-python lacks: devices, RPC, build info, log capture.

llama_cpp is imported lazily (on the first call), so importing this package stays cheap.
"""

from .buildinfo import BuildInfo, build_info
from .devices import GgmlDevice, default_worker_devices, list_devices
from .errors import GgmlError, GgmlUnavailable, UnknownDevice
from .loadlog import LoadReport, compact_ranges, parse_load_log
from .logs import LogCapture
from .probe import RpcProbeError, probe_rpc
from .rpc import add_rpc_server, start_rpc_server, supports_rpc

__all__ = [
    "BuildInfo",
    "GgmlDevice",
    "GgmlError",
    "GgmlUnavailable",
    "LoadReport",
    "LogCapture",
    "RpcProbeError",
    "UnknownDevice",
    "add_rpc_server",
    "build_info",
    "compact_ranges",
    "default_worker_devices",
    "list_devices",
    "parse_load_log",
    "probe_rpc",
    "start_rpc_server",
    "supports_rpc",
]
