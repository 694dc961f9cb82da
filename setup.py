"""The native parts of Corral: the RPC tunnel's data paths (engine/security/_relay.c, the
relay; engine/security/_rpcshim.c, the in-process path; both seal _records.h's records).

Everything else is in pyproject.toml. The extensions are optional: where they cannot be
built (no C compiler, no OpenSSL headers) the install still succeeds and tunnels use the Python
TLS pumps, which are slower at GPU token rates; `corral doctor` says which one a host has.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corral.engine.security._relay",
            ["engine/security/_relay.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            depends=["engine/security/_records.h"],
            optional=True,
        ),
        # not a Python module: a library the inference child and the agent's worker load
        # with LD_PRELOAD (tunnel.shim_env), so ggml-rpc's own sockets carry the records
        Extension(
            "corral.engine.security._rpcshim",
            ["engine/security/_rpcshim.c"],
            libraries=["crypto", "dl"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            depends=["engine/security/_records.h"],
            optional=True,
        ),
    ]
)
