#!/usr/bin/env bash
# Follow-up of cpu-diag.sh: the crash is in llama_model::print_info, where libllama's
# std::ostream insert resolves to a copy of libstdc++ inside libggml-rpc.so. Which compiler
# built it, whether the libraries link libstdc++ dynamically, and whether a build with the
# system compiler (or libstdc++ preloaded) loads; with a build that loads, the CPU-kernel
# self-test and a CPU-only `corral chat` (docs/CPU-KERNELS.md). Results in $OUT/diag2.txt.
set -u
START=$SECONDS; WAIT=${1:-500}
. packaging/gpu/install.sh
. packaging/gpu/steps.sh
SRC=/tmp/llama_cpp_python-0.3.36
[ -d $SRC ] || tar xzf .devsrc/llsrc.tgz -C /tmp
CMK="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_CUDA=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF"
detached native "cmake -S $SRC/vendor/llama.cpp -B /tmp/cpu-native $CMK && cmake --build /tmp/cpu-native -j 16 --target llama llama-bench"
detached sys "cmake -S $SRC/vendor/llama.cpp -B /tmp/cpu-sys $CMK -DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ && cmake --build /tmp/cpu-sys -j 16 --target llama llama-bench"
WAIT_SAY_RC=1 wait_for native || exit 0
WAIT_SAY_RC=1 wait_for sys || exit 0
for b in native sys; do
  if [ ! -e /tmp/py-$b/llama_cpp/lib ]; then
    mkdir -p /tmp/py-$b/include && cp -r $SRC/llama_cpp /tmp/py-$b/llama_cpp
    ln -s /tmp/cpu-$b/bin /tmp/py-$b/llama_cpp/lib
    cp $SRC/vendor/llama.cpp/ggml/include/*.h $SRC/vendor/llama.cpp/include/*.h /tmp/py-$b/include/
  fi
done
python3 -c "
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
write_tiny_llama('/tmp/d-f32.gguf', TinyLlama(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=384, seed=7))
write_tiny_llama('/tmp/m-f32.gguf', TinyLlama(n_layer=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=1024, n_vocab=2048, seed=1))"
PYLOAD='
import sys
import llama_cpp as L
p = L.llama_model_default_params(); p.n_gpu_layers = 0
m = L.llama_model_load_from_file(b"/tmp/d-f32.gguf", p)
print("py load", "ok" if m else "failed", flush=True)
'
{
  echo "== toolchain"; echo "PATH=$PATH"; command -v cc c++ gcc g++; c++ --version | head -1; /usr/bin/g++ --version | head -1
  for b in native sys; do
    echo "-- $b: $(grep -E '^CMAKE_CXX_COMPILER:' /tmp/cpu-$b/CMakeCache.txt)"
    for l in libllama.so libggml-base.so libggml-cpu.so libggml-rpc.so; do
      echo "   $l NEEDED: $(readelf -d /tmp/cpu-$b/bin/$l | grep -o 'NEEDED.*' | sed 's/NEEDED.*\[\(.*\)\]/\1/' | paste -sd' '); exports std:: $(nm -D --defined-only /tmp/cpu-$b/bin/$l | grep -c ' _ZNS[oits]\| _ZNKS[oits]\| _ZSt')"
    done
  done
  for b in native sys; do
    echo "== python load, $b build"; PYTHONPATH=/tmp/py-$b:$PYTHONPATH python3 -c "$PYLOAD" 2>&1 | grep -v '^llama_model_loader\|^print_info\|^load' | tail -3; echo "rc=${PIPESTATUS[0]}"
  done
  echo "== python load, native build, libstdc++ preloaded"
  LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/py-native:$PYTHONPATH python3 -c "$PYLOAD" 2>&1 | tail -2
  echo "(preloaded $(g++ -print-file-name=libstdc++.so.6))"
} 2>&1 | tee $OUT/diag2.txt
# the first build that loads: the self-test and a CPU-only chat with it
for b in sys native; do
  if PYTHONPATH=/tmp/py-$b:$PYTHONPATH python3 -c "$PYLOAD" 2>/dev/null | grep -q 'py load ok'; then
    export PYTHONPATH=/tmp/py-$b:$PYTHONPATH CORRAL_KERNELCHECK_DIR=/tmp/kc-$b
    {
      echo "== self-test, $b build"
      python3 -c "
import json
from corral.engine.ggml import kernelcheck as k
v = k.run_selftest()
print(v.summary(), f'({v.seconds:.1f} s)')
for r in v.results: print('  ', r.wtype, r.path, r.outcome, r.detail, r.buffers)
json.dump(v.to_json(), open('$OUT/selftest-$b.json', 'w'), indent=1)
"
      python3 -c "
from corral.engine.ggml.quantize import quantize
quantize('/tmp/m-f32.gguf', '/tmp/m-q4_0.gguf', 'q4_0')"
      echo '$ corral chat /tmp/m-q4_0.gguf --prompt Hello --max-tokens 32   # CPU only'
      python3 -m corral.engine.cli chat /tmp/m-q4_0.gguf --prompt "Hello" --max-tokens 32 2>&1 | grep -v '^llama\|^load\|^print_info\|^\.' | tail -8
      python3 -m corral.engine.cli chat /tmp/m-q4_0.gguf --prompt "Hello" --max-tokens 32 --json 2>/dev/null | tail -1 > /tmp/chat.json
      python3 -c "import json; d=json.load(open('/tmp/chat.json')); print('json:', {k: d.get(k) for k in ('type', 'cpu_kernels', 'tokens', 'gen_s')})"
      echo '$ corral doctor'; python3 -m corral.engine.cli doctor --wait 1 2>&1 | grep -A1 -E 'CPU kernels|llama.cpp build'
    } 2>&1 | tee -a $OUT/diag2.txt
    break
  fi
done
