#!/usr/bin/env bash
# On a host with one GPU (see README.md here): bench/serve.py on the random-weight 7.24B
# llama, Q4_K_M — `corral serve --parallel 8` over two agents whose workers share GPU 0,
# against `llama-server --rpc` over two plain rpc-servers on GPU 0 (-np 4 and -np 8), the same
# clients in the same rounds (1, 2, 4, 8 streaming clients, 128 tokens each, ignore_eos),
# then time to first token of a short request while a ~3.6k-token prompt is read.
#
#   packaging/gpu/serve-bench.sh [WAIT_S]
#
# Builds llama.cpp with llama-server (setup.sh, BUILD_SERVER=1), writes the f16 model,
# quantizes it, runs the bench; every step detached: call again on the same machine within
# the 30 s it stays warm and it carries on. Results (serve7b.json, the bench log, the
# servers' logs, machine facts) go to $OUT.
START=$SECONDS
WAIT=${1:-560}
M=/tmp/7b-q4_k_m.gguf
B=/tmp/llb/bin
. packaging/gpu/steps.sh
report() {
  mkdir -p "$OUT"
  { nproc; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    lscpu | head -20; } > "$OUT/machine.txt" 2>&1
  tail -50 /tmp/build.log > "$OUT/build-tail.log" 2>/dev/null
  cp /tmp/servebench.log /tmp/serve7b.json "$OUT/" 2>/dev/null
  tail -c 100000 /tmp/sb/llama-server-np4.log > "$OUT/llama-server-np4.log" 2>/dev/null
  tail -c 100000 /tmp/sb/llama-server-np8.log > "$OUT/llama-server-np8.log" 2>/dev/null
}
trap report EXIT
export CORRAL_MODELS=7b BUILD_SERVER=1
. packaging/gpu/setup.sh "$(left)"
detached quant "$B/llama-quantize /tmp/7b.gguf $M.part Q4_K_M 16 && mv $M.part $M"
wait_for quant || exit 0
[ "$(cat /tmp/quant.done)" = 0 ] || { tail -20 /tmp/quant.log; exit 1; }
mkdir -p /tmp/sb
detached servebench "cd /tmp/sb && CUDA_VISIBLE_DEVICES=0 python3 $PWD/bench/serve.py --model $M \
  --rounds ${ROUNDS:-3} --tokens 128 --flash-attn on --threads 4 \
  --llama-server $B/llama-server --rpc-server $B/ggml-rpc-server --json /tmp/serve7b.json"
wait_for servebench || exit 0
echo "servebench rc=$(cat /tmp/servebench.done)"
grep -v "^round" /tmp/servebench.log | tail -30
