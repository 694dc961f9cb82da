#!/usr/bin/env bash
# On a host with one GPU (see README.md here), every step detached (call again on the same
# machine while it is warm and it carries on); results go to $OUT:
#  1. with TTFT=1 only: bench/serve.py --only-ttft on the random-weight 7.24B llama, Q4_K_M
#     (corral only): time to first token of a short request while a ~3.6k-token prompt is
#     read (ttft7b.json)
#  2. bench/placement.py's gpu-cpu set-up on it: one agent sharing GPU 0, one its CPU
#     (placement-gpu.json)
#  3. with DIAG=1 only: the same two agents with the workers' OpenMP threads spinning
#     libgomp's own 300,000 times before they sleep, not rpc_spin's 30,000 (gpu-cpu-oldspin:
#     as every run before 12-06's rpc_spin), and with the CPU worker leaving two cores to
#     the rest of the host (gpu-cpu-spare2), splits in steps of 16 (placement-diag.json):
#     the splits that end on the CPU ran slower than predicted on the H100 host (32/1: +81 %)
#  4. with DIAG=1 only: bench/placement.py --curve 1,2,4,8 on the 7.24B, gpu-cpu set-up:
#     each device's step on probes of 1, 2, 4 and 8 layers and on the whole model
#     (curve-gpu.json); it aborted the inference child on the H100 host three times (the
#     bench's own stalled loop: docs/PLANNER.md, "The curve's abort, explained")
# Every step's log has each probe's passes (bench/replay_probes.py re-reads them).
#  5. bench/placement.py's CPU set-ups (threads, delays; --scale 2 --cpu-only) on the
#     SmolLM2-shaped random model at Q4_1 (the default model's type), two passes, then on
#     the 1.1B "big" at Q4_K_M (placement-small.json, placement-big.json)
# With QUICK=1: step 3 alone, on the 1.1B, with gpu-cpu beside it (placement-quick.json).
# With BIAS=1: step 5's 1.1B `threads` alone (placement-bias.json), whose every split ran
# 9-25 % slower than predicted on the sixth H100 host: the bench's "timed as a probe" column
# tells a model slower than its probes from a reply that costs more than a probe's step
# (BIAS_STEP: the layer-count step of its splits, default 4: 18 splits, some 9 minutes).
# Mind the set-up: the llama.cpp build alone took about 5 minutes of a fresh H100 host, so
# even QUICK needs some 9 minutes of device time (one call of 6 minutes ran out in it).
# All of it: about 30 minutes, three calls back to back (`placement.sh 570`); without DIAG
# (steps 1, 3 and 4 skipped), less.
#
#   packaging/gpu/placement.sh [WAIT_S]
START=$SECONDS
WAIT=${1:-560}
B=/tmp/llb/bin
. packaging/gpu/steps.sh
report() {
  mkdir -p "$OUT"
  { nproc; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    lscpu | head -20; tc qdisc add dev lo root netem delay 1ms 2>&1 && tc qdisc del dev lo root
  } > "$OUT/machine.txt" 2>&1
  # at most 8 files come back: the logs as they are, the json in one archive
  cp /tmp/curve.log /tmp/place-*.log "$OUT/" 2>/dev/null
  (cd /tmp && tar czf "$OUT/results.tgz" ttft.log quant.log ./*.json 2>/dev/null)
}
trap report EXIT
if [ -n "${QUICK:-}" ]; then  # step 3 alone, on the 1.1B (a few minutes of device time)
  export CORRAL_MODELS="small big"
  . packaging/gpu/setup.sh "$(left)"
  detached quant "$B/llama-quantize /tmp/big.gguf /tmp/big-q4_k_m.gguf Q4_K_M 16"
  wait_for quant || exit 0
  detached place-quick "python3 bench/placement.py --rounds 3 --tokens 48 --passes 2 --step 16 \
    --model /tmp/big-q4_k_m.gguf --setups gpu-cpu,gpu-cpu-oldspin,gpu-cpu-spare2 \
    --json /tmp/placement-quick.json"
  WAIT_TAIL=30 wait_for place-quick || exit 0
  grep -v WARNING /tmp/place-quick.log | tail -40
  exit 0
fi
if [ -n "${BIAS:-}" ]; then
  export CORRAL_MODELS="small big"
  . packaging/gpu/setup.sh "$(left)"
  detached quant "$B/llama-quantize /tmp/big.gguf /tmp/big-q4_k_m.gguf Q4_K_M 16"
  wait_for quant || exit 0
  detached place-bias "python3 bench/placement.py --rounds 3 --tokens 48 --passes 1 --step ${BIAS_STEP:-4} \
    --model /tmp/big-q4_k_m.gguf --scale 2 --cpu-only --setups threads \
    --json /tmp/placement-bias.json"
  WAIT_TAIL=30 wait_for place-bias || exit 0
  grep -v WARNING /tmp/place-bias.log | tail -40
  exit 0
fi
export CORRAL_MODELS="small big 7b"
. packaging/gpu/setup.sh "$(left)"
detached quant "$B/llama-quantize /tmp/7b.gguf /tmp/7b-q4_k_m.gguf Q4_K_M 16 \
  && $B/llama-quantize /tmp/small.gguf /tmp/small-q4_1.gguf Q4_1 16 \
  && $B/llama-quantize /tmp/big.gguf /tmp/big-q4_k_m.gguf Q4_K_M 16"
wait_for quant || exit 0
[ "$(cat /tmp/quant.done)" = 0 ] || { tail -20 /tmp/quant.log; exit 1; }
[ -z "${TTFT:-}" ] || [ -f /tmp/ttft.done ] || detached ttft "python3 bench/serve.py --model /tmp/7b-q4_k_m.gguf --only-ttft --rounds 5 \
  --flash-attn on --json /tmp/ttft7b.json"
if [ -n "${TTFT:-}" ]; then wait_for ttft || exit 0; tail -3 /tmp/ttft.log; fi
P="python3 bench/placement.py --rounds 3 --tokens 48 --passes 1"
detached place-gpu "$P --model /tmp/7b-q4_k_m.gguf --setups gpu-cpu --json /tmp/placement-gpu.json"
WAIT_TAIL=20 wait_for place-gpu || exit 0
tail -3 /tmp/place-gpu.log
if [ -n "${DIAG:-}" ]; then
detached place-diag "$P --model /tmp/7b-q4_k_m.gguf --setups gpu-cpu-oldspin,gpu-cpu-spare2 \
  --step 16 --json /tmp/placement-diag.json"
WAIT_TAIL=20 wait_for place-diag || exit 0
tail -4 /tmp/place-diag.log
detached curve "$P --model /tmp/7b-q4_k_m.gguf --setups gpu-cpu --curve 1,2,4,8 \
  --json /tmp/curve-gpu.json"
WAIT_TAIL=20 wait_for curve || exit 0
tail -4 /tmp/curve.log
fi
detached place-small "$P --model /tmp/small-q4_1.gguf --scale 2 --cpu-only --setups threads,delays \
  --passes 2 --json /tmp/placement-small.json"
WAIT_TAIL=20 wait_for place-small || exit 0
tail -6 /tmp/place-small.log
detached place-big "$P --model /tmp/big-q4_k_m.gguf --scale 2 --cpu-only --step 4 \
  --setups threads,delays --json /tmp/placement-big.json"
WAIT_TAIL=20 wait_for place-big || exit 0
tail -6 /tmp/place-big.log
