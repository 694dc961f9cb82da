"""Workaround used by tunnel-ab.sh (PRELOAD_LLAMA=1): load llama.cpp's libraries before
anything imports numpy. On the 2 x H200 image (numpy 2.5.2 with scipy-openblas64) the
inference child segfaults in llama_model_load_from_file on a CUDA load once numpy is imported
first, which engine/runtime/child.py does since 1596c2b (`import numpy as np` at the top);
llama_cpp imports numpy itself, but only after its libraries are loaded."""

try:
    import llama_cpp.llama_cpp  # noqa: F401
except Exception:  # a process without llama_cpp just goes on
    pass
