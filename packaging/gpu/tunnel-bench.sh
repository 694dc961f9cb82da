#!/usr/bin/env bash
# On a GPU host (see README.md here): CUDA+RPC build from the carried sdist, then the tunnel bench on CPU and CUDA.
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
  python3 - <<'PY' &
from tests.support.tiny_gguf import TinyLlama, write_tiny_llama
write_tiny_llama("/tmp/small.gguf", TinyLlama(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152, dtype="f16"))
write_tiny_llama("/tmp/big.gguf", TinyLlama(n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=32000, dtype="f16"))
PY
  for _ in $(seq 1 "${1:-400}"); do [ -f /tmp/build.done ] && break; sleep 1; done
  [ -f /tmp/build.done ] || { echo "build still running"; tail -2 /tmp/build.log; exit 0; }
  echo "build rc=$(cat /tmp/build.done)"
  python3 -m pip install -q --no-deps --target /tmp/site /tmp/wh/*.whl
  wait
fi
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
for spec in "CPU small.gguf 4" "CUDA0 small.gguf 2" "CUDA0 big.gguf 2"; do
  set -- $spec
  echo "== $1 $2"
  timeout 170 python3 bench/tunnel.py --devices $1 --model /tmp/$2 --threads $3 --rounds 9 --tokens 128 --pings 1000 2>&1 | grep -v "^round\|WARNING" | tee -a $OUT/tunnel_gpu.txt
done
