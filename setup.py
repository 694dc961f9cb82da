"""The one native part of Corral: the RPC tunnel's data path (engine/security/_relay.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(no C compiler, no OpenSSL headers) the install still succeeds and tunnels use the Python
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
            optional=True,
        )
    ]
)
