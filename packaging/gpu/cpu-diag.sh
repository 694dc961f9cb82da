#!/usr/bin/env bash
# Why Python loads of a CPU-only llama.cpp build die on a host where llama-bench from the same
# build runs (docs/CPU-KERNELS.md, "what the H200 run could not show"). Builds the native
# CPU-only variant as cpu-kernels.sh does (same folder: cpu-kernels.sh reuses it), then loads
# a model from C and from Python with a SIGSEGV handler preloaded that prints the native
# backtrace and where each library came from. Results in $OUT/diag.txt.
set -u
START=$SECONDS; WAIT=${1:-300}
. packaging/gpu/install.sh
. packaging/gpu/steps.sh
SRC=/tmp/llama_cpp_python-0.3.36
[ -d $SRC ] || tar xzf .devsrc/llsrc.tgz -C /tmp
detached native "cmake -S $SRC/vendor/llama.cpp -B /tmp/cpu-native -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_C_FLAGS='-g' -DCMAKE_CXX_FLAGS='-g' && cmake --build /tmp/cpu-native -j 16 --target llama llama-bench"
WAIT_SAY_RC=1 wait_for native || exit 0
if [ ! -e /tmp/py-native/llama_cpp/lib ]; then
  mkdir -p /tmp/py-native/include && cp -r $SRC/llama_cpp /tmp/py-native/llama_cpp
  ln -s /tmp/cpu-native/bin /tmp/py-native/llama_cpp/lib
  cp $SRC/vendor/llama.cpp/ggml/include/*.h $SRC/vendor/llama.cpp/include/*.h /tmp/py-native/include/
fi
B=/tmp/cpu-native/bin
cat > /tmp/segv.c <<'C'
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
static char stack[1 << 16];
static void on_fault(int sig, siginfo_t *si, void *uc) {
  void *frames[64];
  char line[256];
  int n = backtrace(frames, 64);
  snprintf(line, sizeof line, "\n=== signal %d at address %p, %d frames ===\n", sig, si->si_addr, n);
  write(2, line, strlen(line));
  backtrace_symbols_fd(frames, n, 2);
  int fd = open("/proc/self/maps", O_RDONLY);
  char buf[4096]; ssize_t r;
  write(2, "=== maps ===\n", 13);
  while ((r = read(fd, buf, sizeof buf)) > 0) write(2, buf, r);
  signal(sig, SIG_DFL); raise(sig);
}
__attribute__((constructor)) static void install(void) {
  stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack};
  sigaltstack(&ss, 0);
  struct sigaction sa; memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault; sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, 0); sigaction(SIGBUS, &sa, 0); sigaction(SIGILL, &sa, 0);
}
C
gcc -shared -fPIC -o /tmp/segv.so /tmp/segv.c
cat > /tmp/load.c <<'C'
#include "llama.h"
#include <stdio.h>
int main(int argc, char **argv) {
  llama_backend_init();
  struct llama_model_params p = llama_model_default_params();
  p.n_gpu_layers = 0; p.use_mmap = 0;
  void *none[1] = {0};
  if (argc > 2) p.devices = (ggml_backend_dev_t *)none;
  struct llama_model *m = llama_model_load_from_file(argv[1], p);
  printf("C load (%s): %s\n", argc > 2 ? "devices=[NULL]" : "default devices", m ? "ok" : "failed");
  if (m) llama_model_free(m);
  return 0;
}
C
gcc -O1 -g -I$SRC/vendor/llama.cpp/include -I$SRC/vendor/llama.cpp/ggml/include /tmp/load.c -o /tmp/load \
  $B/libllama.so $B/libggml.so $B/libggml-base.so -Wl,-rpath,$B > /tmp/load-gcc.log 2>&1
export PYTHONPATH=/tmp/py-native:/tmp/site:$PWD
python3 -c "
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
write_tiny_llama('/tmp/d-f32.gguf', TinyLlama(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=384, seed=7))"
PYLOAD='
import ctypes, os, sys
import llama_cpp as L
p = L.llama_model_default_params(); p.n_gpu_layers = 0; p.use_mmap = False
none = (ctypes.c_void_p * 1)(None)
if "devnull" in sys.argv: p.devices = ctypes.addressof(none)
if "numpy" in sys.argv: import numpy
m = L.llama_model_load_from_file(b"/tmp/d-f32.gguf", p)
print("py load", sys.argv[1:], "ok" if m else "failed", flush=True)
'
# the crash report of one run: the signal, the frames (with source lines where the build has
# them), the mapped ggml/llama/OpenMP/BLAS libraries
report() {
  awk '/=== signal/{on=1} /=== maps/{on=0; maps=1} on{print} maps && /ggml|llama|gomp|iomp|blas|mkl/{print "  map: " $NF}' "$1" | awk '!seen[$0]++' | head -80
  grep -v '^llama_model_loader\|^print_info\|^load\b\|^[0-9a-f]*-[0-9a-f]* ' "$1" | grep -v '=== \|^/' | tail -15
  grep -o 'libllama.so[^(]*(+0x[0-9a-f]*)\|libggml[a-z-]*.so[^(]*(+0x[0-9a-f]*)' "$1" | sort -u | while read -r f; do
    lib=$B/$(echo "$f" | sed 's/(.*//'); off=$(echo "$f" | sed 's/.*(+\(0x[0-9a-f]*\))/\1/')
    echo "  $f -> $(addr2line -f -C -i -e "$lib" "$off" 2>&1 | paste -sd' ')"
  done
}
{
  echo "== sitecustomize and preloads"
  python3 -c "import sitecustomize; print(sitecustomize.__file__)" 2>&1; cat /etc/ld.so.preload 2>&1 | head -5
  python3 -c "import sitecustomize, inspect; print(inspect.getsource(sitecustomize))" 2>&1 | head -40
  echo "== who maps openblas at startup"; python3 -c "print(open('/proc/self/maps').read())" | grep -i 'blas\|gomp' | awk '{print $NF}' | sort -u
  echo "== load.c build"; cat /tmp/load-gcc.log
  echo "== host"; uname -a; python3 -VV; lscpu | grep 'Model name'; env | grep -E '^LD_|^PYTHON|^OMP|^GGML|^CUDA' 
  echo "== python startup modules"; python3 -c "import sys; print(sorted(m for m in sys.modules if not m.startswith('_')))"
  echo "== numpy config"; python3 -c "import numpy; print(numpy.__version__, numpy.__file__)"; python3 -c "import numpy; numpy.show_config()" 2>&1 | grep -iE 'blas|lapack|name|openmp' | head
  echo "== libs of libggml-cpu"; ldd $B/libggml-cpu.so; ldd $B/libllama.so
  for a in "" x; do
    echo "== C load ${a:+devices=[NULL]}"; LD_PRELOAD=/tmp/segv.so /tmp/load /tmp/d-f32.gguf $a > /tmp/c.out 2>&1; echo "rc=$?"; report /tmp/c.out
  done
  for args in "plain" "devnull" "numpy"; do
    echo "== python $args"; LD_PRELOAD=/tmp/segv.so python3 -c "$PYLOAD" $args > /tmp/py.out 2>&1; echo "rc=$?"; report /tmp/py.out
  done
  TE=$(python3 -c "import typing_extensions, os; print(os.path.dirname(typing_extensions.__file__))")
  echo "== python -S plain (no site, no sitecustomize)"
  LD_PRELOAD=/tmp/segv.so python3 -S -c "import sys; sys.path[:0]=['/tmp/py-native','/tmp/site','$TE']; exec(open('/dev/stdin').read())" plain <<<"$PYLOAD" > /tmp/pys.out 2>&1; echo "rc=$?"; report /tmp/pys.out
  echo "== python plain without LD_LIBRARY_PATH"; env -u LD_LIBRARY_PATH LD_PRELOAD=/tmp/segv.so python3 -c "$PYLOAD" plain > /tmp/pyl.out 2>&1; echo "rc=$?"; report /tmp/pyl.out
  echo "== LD_DEBUG libs (ggml/llama/gomp)"; LD_DEBUG=libs python3 -c "$PYLOAD" plain 2>&1 | grep -E 'calling init|trying file' | grep -iE 'ggml|llama|gomp|iomp' | head -30
} 2>&1 | tee $OUT/diag.txt
