#!/usr/bin/env bash
# On a GPU host's CPU (see README.md here; no GPU is used): the CPU-kernel self-test and what
# its remedies cost, for docs/CPU-KERNELS.md. Builds llama.cpp for the CPU from the carried
# sdist three ways (native: -march=native, with ggml's AMX kernels where the CPU reports AMX;
# native with -mno-amx-*; portable, GGML_NATIVE off), then on each: which kernels the build
# has, the self-test's verdict, and with the native one a CPU-only `corral chat` and
# `corral doctor`; last bench/cpu_kernels.py over all three, extra buffers on and off.
# The builds and the models run detached: call again with the same command if it says a
# step is still running. Results in $OUT.
set -u
START=$SECONDS; WAIT=${1:-540}
. packaging/gpu/install.sh
. packaging/gpu/steps.sh
SRC=/tmp/llama_cpp_python-0.3.36
[ -d $SRC ] || tar xzf .devsrc/llsrc.tgz -C /tmp
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# the system compiler: the image's /opt/gcc links libstdc++ statically into every library,
# which crashes every Python load (docs/CPU-KERNELS.md, cpu-diag.sh and cpu-diag2.sh)
SYSCC=""; [ -x /usr/bin/g++ ] && SYSCC="-DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++"
build() {  # NAME EXTRA_CMAKE_ARGS C/C++ FLAGS
  echo "cmake -S $SRC/vendor/llama.cpp -B /tmp/cpu-$1 -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF $SYSCC $2 \
    -DCMAKE_C_FLAGS='$3' -DCMAKE_CXX_FLAGS='$3' && cmake --build /tmp/cpu-$1 -j 16 --target llama llama-bench"
}
detached builds "$(build native '' '') && $(build noamx '' "$NOAMX") && $(build portable -DGGML_NATIVE=OFF '')"
WAIT_SAY_RC=1 wait_for builds || exit 0
[ "$(cat /tmp/builds.done)" = 0 ] || { tail -30 /tmp/builds.log; exit 1; }
for b in native noamx portable; do  # a llama_cpp package per build, its lib/ the build's bin/
  if [ ! -e /tmp/py-$b/llama_cpp/lib ]; then
    mkdir -p /tmp/py-$b/include && cp -r $SRC/llama_cpp /tmp/py-$b/llama_cpp
    ln -s /tmp/cpu-$b/bin /tmp/py-$b/llama_cpp/lib
    cp $SRC/vendor/llama.cpp/ggml/include/*.h $SRC/vendor/llama.cpp/include/*.h /tmp/py-$b/include/
  fi
done
export PYTHONPATH=/tmp/py-native:$PYTHONPATH
detached models "python3 -c \"
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.ggml.quantize import quantize
write_tiny_llama('/tmp/m-f32.gguf', TinyLlama(n_layer=12, n_embd=1536, n_head=12, n_head_kv=4, n_ff=4096, n_vocab=32000, seed=1))
quantize('/tmp/m-f32.gguf', '/tmp/m-q4_0.gguf', 'q4_0')
quantize('/tmp/m-f32.gguf', '/tmp/m-q4_k_m.gguf', 'q4_k_m')
\""
WAIT_SAY_RC=1 wait_for models || exit 0
{
  lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | sed 's/Flags:.*\(amx[a-z0-9_ ]*\).*/AMX flags: \1/'
  grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; uname -r
  for b in native noamx portable; do
    echo "$b: $(nm -D /tmp/cpu-$b/bin/libggml-cpu.so | grep -ci amx) AMX symbols in libggml-cpu.so"
  done
} | tee $OUT/cpu.txt
for b in native noamx portable; do
  PYTHONPATH=/tmp/py-$b:/tmp/site:$PWD CORRAL_KERNELCHECK_DIR=/tmp/kc-$b python3 -c "
import json
from corral.engine.ggml import kernelcheck as k
v = k.run_selftest()
print('$b:', v.summary(), f'({v.seconds:.1f} s)')
for r in v.results: print('  ', r.wtype, r.path, r.outcome, r.detail, r.error and round(r.error, 4), r.off_plain and round(r.off_plain, 4), r.buffers)
json.dump(v.to_json(), open('$OUT/selftest-$b.json', 'w'), indent=1)
" 2>&1 | tee -a $OUT/selftest.txt
done
export CORRAL_KERNELCHECK_DIR=/tmp/kc-native
{
  echo '$ corral chat /tmp/m-q4_0.gguf --prompt "Hello" --max-tokens 32   # native build, CPU only'
  python3 -m corral.engine.cli chat /tmp/m-q4_0.gguf --prompt "Hello" --max-tokens 32 2>&1 | grep -v '^llama\|^load\|^print_info\|^\.' | tail -12
  python3 -m corral.engine.cli chat /tmp/m-q4_0.gguf --prompt "Hello" --max-tokens 32 --json | tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('json done.cpu_kernels:', d['cpu_kernels'])"
  echo '$ corral doctor'; python3 -m corral.engine.cli doctor --wait 1 2>&1 | grep -A1 -E 'CPU kernels|llama.cpp build'
} 2>&1 | tee $OUT/chat.txt
python3 bench/cpu_kernels.py --bin native:/tmp/cpu-native/bin --bin noamx:/tmp/cpu-noamx/bin \
  --bin portable:/tmp/cpu-portable/bin --model /tmp/m-q4_0.gguf --model /tmp/m-q4_k_m.gguf \
  --threads 8 --rounds 3 --out $OUT/cpu-bench.json 2>&1 | tee $OUT/cpu-bench.txt
