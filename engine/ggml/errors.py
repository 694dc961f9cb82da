"""Exception root for the ggml bindings."""


class GgmlError(Exception):
    """Something the ggml bindings could not do; the message says what to do next."""


class GgmlUnavailable(GgmlError):
    """llama-cpp-python or one of its ggml functions is missing (or built without RPC)."""


class UnknownDevice(GgmlError):
    """A ggml device name this host does not have."""
