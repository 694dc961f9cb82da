# Sourced by the scripts here: installs Corral and the carried wheels into /tmp/site, builds
# llama-cpp-python with CUDA + RPC from the carried sdist (detached, so a command limit does
# not kill it; waits up to $1 seconds, else exits the caller saying so), and writes the
# random-weight models the checks use.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devsrc/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade . 2>&1 | tail -2
if [ ! -d /tmp/site/llama_cpp ]; then
  if [ ! -f /tmp/build.done ]; then
    tar xzf .devsrc/llsrc.tgz -C /tmp
    setsid nohup bash -c 'CMAKE_ARGS="-DGGML_RPC=on -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps /tmp/llama_cpp_python-0.3.36 -w /tmp/wh > /tmp/build.log 2>&1; echo $? > /tmp/build.done' >/dev/null 2>&1 < /dev/null &
  fi
fi
python3 - <<'PY'
import os
from tests.support.tiny_gguf import TinyLlama, write_tiny_llama
models = {
    "/tmp/small.gguf": TinyLlama(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152, dtype="f16"),
    "/tmp/big.gguf": TinyLlama(n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=32000, dtype="f16"),
}
for path, spec in models.items():
    if not os.path.exists(path):
        write_tiny_llama(path, spec)
PY
if [ ! -d /tmp/site/llama_cpp ]; then
  for _ in $(seq 1 "${1:-420}"); do [ -f /tmp/build.done ] && break; sleep 1; done
  [ -f /tmp/build.done ] || { echo "build still running"; tail -2 /tmp/build.log; exit 0; }
  echo "build rc=$(cat /tmp/build.done)"
  python3 -m pip install -q --no-deps --target /tmp/site /tmp/wh/*.whl
fi
