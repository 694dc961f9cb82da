#!/usr/bin/env bash
# On a host with 2 GPUs (see README.md here): Corral's engine vs llama-bench from the same
# llama.cpp build (bench/llama_bench_compare.py) on a random-weight 7.24B llama, Q4_K_M.
#
#   packaging/gpu/llama-bench.sh [WAIT_S]
#
# Builds (setup.sh), writes the f16 model, quantizes it with llama-quantize, then runs the
# comparison (one GPU and the split, ~4 min), the one-GPU part again alone (~1 min), the
# tunnel's data paths side by side (bench/tunnel.py: direct, handed over, native relays,
# Python pumps) and, with COSTS=1, bench/llama_decode_costs.py. PARTS=split runs only the
# split part of the first comparison and skips the one-GPU rerun; TUNNEL=0 skips bench/tunnel.py. Every step runs detached, so when WAIT_S seconds (default 560)
# have passed the script just reports where it is: run it again on the same machine (within
# the 30 s it stays warm) and it carries on. On a fresh 2 x H200 host all of it takes ~9 min.
# Results (results*.json, bench*.log, machine, build, model and rpc-server logs) go to $OUT.
START=$SECONDS
WAIT=${1:-560}
M=/tmp/7b-q4_k_m.gguf
B=/tmp/llb/bin
. packaging/gpu/steps.sh
report() {
  mkdir -p "$OUT"
  { nproc; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    nvidia-smi topo -m; lscpu | head -20
    openssl speed -evp aes-256-gcm -seconds 1 2>/dev/null | tail -2; } > "$OUT/machine.txt" 2>&1
  tail -50 /tmp/build.log > "$OUT/build-tail.log" 2>/dev/null
  cat /tmp/models.log /tmp/quant.log > "$OUT/model-quant.log" 2>/dev/null
  cp /tmp/bench.log "$OUT/" 2>/dev/null
  cp /tmp/results/results.json "$OUT/" 2>/dev/null
  cp /tmp/results1/results.json "$OUT/results-1gpu.json" 2>/dev/null
  cp /tmp/tunnel7b.json /tmp/pip-corral.log "$OUT/" 2>/dev/null
  { cat /tmp/bench1.log; grep "tok/s median" /tmp/costs.log; } > "$OUT/bench-1gpu.log" 2>/dev/null
  tail -c 200000 /tmp/results/rpc-server-*.log > "$OUT/rpc-servers.log" 2>/dev/null
}
trap report EXIT
python3 --version
export CORRAL_MODELS=7b
. packaging/gpu/setup.sh "$(left)"
detached quant "$B/llama-quantize /tmp/7b.gguf $M.part Q4_K_M 32 && mv $M.part $M"
wait_for quant || exit 0
[ "$(cat /tmp/quant.done)" = 0 ] || { tail -20 /tmp/quant.log; exit 1; }
ls -la $M
detached bench "python3 bench/llama_bench_compare.py --bin $B --model $M --out /tmp/results \
  --rounds ${ROUNDS:-7} --tokens 128 --reps 3 --threads 4 --gpus 0,1 --flash-attn on \
  --parts ${PARTS:-1gpu,split}"
wait_for bench || exit 0
echo "bench rc=$(cat /tmp/bench.done)"
grep -v "^round" /tmp/bench.log | tail -60
# The one-GPU comparison again with nothing else loaded (during the run above the other runs'
# models stay loaded and their processes up), then the per-token cost of sampling in Python (llama_decode_costs.py)
[ "${PARTS:-}" = split ] || detached bench1 "python3 bench/llama_bench_compare.py --bin $B --model $M --out /tmp/results1 \
  --parts 1gpu --rounds 9 --tokens 128 --reps 3 --threads 4 --gpus 0,1 --flash-attn on"
if [ "${PARTS:-}" != split ]; then
  wait_for bench1 || exit 0
  grep -v "^round" /tmp/bench1.log | head -12
fi
# The tunnel's data paths side by side on the 7B, both workers on GPU 0 (bench/tunnel.py):
# direct, handed over, the native relays, and the Python TLS pumps
# (TUNNEL=0 skips it)
if [ "${TUNNEL:-1}" != 0 ]; then
  detached tunnel7b "CUDA_VISIBLE_DEVICES=0 python3 bench/tunnel.py --devices CUDA0 --model $M \
    --threads 4 --rounds 7 --tokens 128 --pings 1000 --relay-tunnel --python-tunnel --json \
    > /tmp/tunnel7b.json"
  wait_for tunnel7b || exit 0
  python3 -c "import json; m = json.load(open('/tmp/tunnel7b.json'))['median']; print({k: round(v, 3) for k, v in m.items()})"
fi
if [ -n "${COSTS:-}" ]; then
  detached costs "cd /tmp/llb && CUDA_VISIBLE_DEVICES=0 python3 $PWD/bench/llama_decode_costs.py $M"
  wait_for costs || exit 0
  grep "tok/s median" /tmp/costs.log
fi
