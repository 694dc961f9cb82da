# Sourced by the scripts here: installs Corral and the carried wheels into /tmp/site, builds
# llama.cpp from the carried sdist's vendored sources with CUDA + RPC in ONE cmake build
# (shared libraries, which llama-cpp-python's Python code loads, plus llama-bench,
# llama-quantize and the plain rpc-server), writes the random-weight models named in
# $CORRAL_MODELS (default "small big"; also "7b") with engine/model/synthetic.py, and waits up
# to $1 seconds (default 420) for both, else exits the caller saying so. The build and the
# model writer run detached (setsid), so a command limit does not kill them: call again on the
# same machine and it picks up where it was. About 3 minutes on 32 cores, sm_90.
#
# llama-cpp-python is not built by pip here: its Python files are copied from the sdist and
# llama_cpp/lib points at the build's bin/ (libllama.so, libggml*.so.0 and the tools). Both
# llama_cpp/llama_cpp.py and Corral's engine/ggml/_lib.py look there; LLAMA_CPP_LIB_PATH would
# redirect only those two (not llama_cpp/_ggml.py), so the link is what keeps one ggml mapped.
set -u
LLB=/tmp/llb        # the cmake build; tools in $LLB/bin
SRC=/tmp/llama_cpp_python-0.3.36
. packaging/gpu/install.sh
[ -d $SRC ] || tar xzf .devsrc/llsrc.tgz -C /tmp
# BUILD_SERVER=1: llama-server too (bench/serve.py compares with it)
SERVER=OFF; TARGETS=""
if [ -n "${BUILD_SERVER:-}" ]; then SERVER=ON; TARGETS=llama-server; fi
if [ ! -f /tmp/build.done ] && [ ! -f /tmp/build.started ]; then
  touch /tmp/build.started
  G=""; command -v ninja >/dev/null && G="-G Ninja"
  setsid nohup bash -c "cmake -S $SRC/vendor/llama.cpp -B $LLB $G -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=$SERVER -DLLAMA_BUILD_APP=OFF > /tmp/build.log 2>&1 \
    && cmake --build $LLB -j 32 --target llama llama-bench llama-quantize ggml-rpc-server $TARGETS \
      >> /tmp/build.log 2>&1; echo \$? > /tmp/build.done" >/dev/null 2>&1 < /dev/null &
fi
if [ ! -f /tmp/models.done ] && [ ! -f /tmp/models.started ]; then
  touch /tmp/models.started
  cat > /tmp/write_models.py <<'PY'
import os, sys, time
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
specs = {
    "small": TinyLlama(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152, dtype="f16"),
    "big": TinyLlama(n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=32000, dtype="f16"),
    # Mistral-7B's shape, untied output: 7.24B parameters, 14.5 GB as f16
    "7b": TinyLlama(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=32000, tied_embeddings=False, dtype="f16"),
}
for name in sys.argv[1:]:
    path = f"/tmp/{name}.gguf"
    if not os.path.exists(path):
        t0 = time.time()
        write_tiny_llama(path + ".part", specs[name])
        os.rename(path + ".part", path)
        print(f"{path}: {os.path.getsize(path) / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
PY
  setsid nohup bash -c "python3 /tmp/write_models.py ${CORRAL_MODELS:-small big} > /tmp/models.log 2>&1; echo \$? > /tmp/models.done" >/dev/null 2>&1 < /dev/null &
fi
for _ in $(seq 1 "${1:-420}"); do [ -f /tmp/build.done ] && [ -f /tmp/models.done ] && break; sleep 1; done
if [ ! -f /tmp/build.done ] || [ ! -f /tmp/models.done ]; then
  echo "still running: build $([ -f /tmp/build.done ] && echo done || echo running), models $([ -f /tmp/models.done ] && echo done || echo running)"
  tail -3 /tmp/build.log; cat /tmp/models.log; exit 0
fi
echo "build rc=$(cat /tmp/build.done), models rc=$(cat /tmp/models.done)"; cat /tmp/models.log
[ "$(cat /tmp/build.done)" = 0 ] || { tail -40 /tmp/build.log; exit 1; }
if [ ! -e /tmp/site/llama_cpp/lib ]; then
  rm -rf /tmp/site/llama_cpp && cp -r $SRC/llama_cpp /tmp/site/llama_cpp
  ln -s $LLB/bin /tmp/site/llama_cpp/lib
  # ggml-rpc.h beside the package, where engine/ggml/buildinfo.py reads the RPC protocol version
  mkdir -p /tmp/site/include && cp $SRC/vendor/llama.cpp/ggml/include/*.h $SRC/vendor/llama.cpp/include/*.h /tmp/site/include/
fi
python3 -c "import llama_cpp; assert llama_cpp.llama_supports_rpc(), 'no RPC'; print('llama_cpp', llama_cpp.__version__, 'RPC ok')" || exit 1
python3 -c "from corral.engine.security import tunnel; print('tunnel data path:', tunnel.relay_mode())"
