#!/usr/bin/env bash
# On a host with 2 GPUs (see README.md here): the tunnel's cost vs direct RPC, with the
# random-weight `small` and `big` f16 models only (no 7b: setup.sh's default CORRAL_MODELS).
#
#   packaging/gpu/tunnel-ab.sh [WAIT_S]
#
# 1. bench/tunnel.py with both workers on GPU 0 (CUDA_VISIBLE_DEVICES=0, so the inference
#    child's own device is GPU 0 too, as on the one-GPU H100 before), small and big models;
#    when .devsrc/tunnel_before_76dd662.py is there (`git show 76dd662^:engine/security/tunnel.py
#    > .devsrc/tunnel_before_76dd662.py`), each run again with that tunnel.py in place of the
#    current one (a copy of the installed package in /tmp/site_old, first on PYTHONPATH), new
#    and old interleaved: the same machine, the tunnel change alone.
# 2. bench/llama_bench_compare.py on the big model: the full run (one GPU; the split over two
#    agents, one GPU each, through the tunnel vs `llama-bench --rpc` vs both GPUs local), then
#    `--parts 1gpu` alone; with CMP_OLD=1 (and the old file), the full run with the old tunnel.
#
# Every step runs detached (as llama-bench.sh): when WAIT_S seconds (default 560) have passed
# the script reports where it is; run it again on the same machine and it carries on.
# $OUT gets summary.txt (what ran, medians, ratios) and raw.tgz (every log and JSON).
START=$SECONDS
WAIT=${1:-560}
B=/tmp/llb/bin
OLD=.devsrc/tunnel_before_76dd662.py
WAIT_MARGIN=8 WAIT_TAIL=3 WAIT_SAY_RC=1
. packaging/gpu/steps.sh
STEPS=()
report() {
  mkdir -p "$OUT" /tmp/raw
  { nproc; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    nvidia-smi topo -m; } > /tmp/raw/machine.txt 2>&1
  tail -30 /tmp/build.log > /tmp/raw/build-tail.log 2>/dev/null
  cp /tmp/models.log /tmp/raw/ 2>/dev/null
  for s in "${STEPS[@]}"; do
    cp /tmp/$s.log /tmp/raw/ 2>/dev/null; cp /tmp/$s.json /tmp/raw/ 2>/dev/null
    [ -f /tmp/$s.done ] && echo "$(cat /tmp/$s.done)" > /tmp/raw/$s.rc
    [ -f /tmp/$s/results.json ] && cp /tmp/$s/results.json /tmp/raw/$s-results.json
    for f in /tmp/$s/rpc-server-*.log; do [ -f "$f" ] && tail -c 20000 "$f" > /tmp/raw/$s-$(basename "$f"); done
  done
  tar czf "$OUT/raw.tgz" -C /tmp raw 2>/dev/null
  { cat /tmp/raw/machine.txt
    python3 - "${STEPS[@]}" <<'PY'
import json, sys
for s in sys.argv[1:]:
    try:
        d = json.load(open(f"/tmp/{s}.json"))
    except (OSError, ValueError):
        continue
    m = d["median"]
    print(f"{s}: direct {m['tok_s_direct']:.1f} tunnel {m['tok_s_tunnel']:.1f} tok/s, ratio "
          f"{m['ratio']:.3f}x (rounds {min(d['raw']['ratio']):.3f}-{max(d['raw']['ratio']):.3f}), "
          f"rtt {m['rtt_direct']:.0f} -> {m['rtt_tunnel']:.0f} us (+{m['rtt_added']:.0f}), "
          f"load {m['load_s_direct']:.2f} -> {m['load_s_tunnel']:.2f} s")
PY
    for s in cmp cmp1 cmp_old; do [ -f /tmp/$s.log ] && { echo "== $s"; grep -v "^round" /tmp/$s.log | tail -60; }; done
  } > "$OUT/summary.txt" 2>&1
}
trap report EXIT
python3 --version
. packaging/gpu/setup.sh "$(left)"
if [ -f $OLD ] && [ ! -d /tmp/site_old/corral ]; then
  mkdir -p /tmp/site_old && cp -r /tmp/site/corral /tmp/site_old/corral
  cp $OLD /tmp/site_old/corral/engine/security/tunnel.py
fi
NEW_PP=$PYTHONPATH
OLD_PP=/tmp/site_old:$PYTHONPATH
VARIANTS="new"; [ -f $OLD ] && VARIANTS="new old"
for model in small big; do
  for v in $VARIANTS; do
    s=t_${v}_$model; STEPS+=($s)
    pp=$NEW_PP; [ $v = old ] && pp=$OLD_PP
    detached $s "CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$pp timeout 170 python3 bench/tunnel.py \
      --devices CUDA0 --model /tmp/$model.gguf --threads 2 --rounds ${ROUNDS:-9} --tokens 128 \
      --pings 1000 --json > /tmp/$s.json"
    wait_for $s || exit 0
  done
done
CMP="python3 bench/llama_bench_compare.py --bin $B --model /tmp/big.gguf --tokens 128 --reps 3 \
  --threads 4 --gpus 0,1 --flash-attn on"
STEPS+=(cmp); detached cmp "$CMP --out /tmp/cmp --rounds ${CMP_ROUNDS:-7}"
wait_for cmp || exit 0
STEPS+=(cmp1); detached cmp1 "$CMP --out /tmp/cmp1 --parts 1gpu --rounds 9"
wait_for cmp1 || exit 0
if [ "${CMP_OLD:-0}" = 1 ] && [ -f $OLD ]; then
  STEPS+=(cmp_old)
  detached cmp_old "PYTHONPATH=$OLD_PP $CMP --out /tmp/cmp_old --rounds ${CMP_ROUNDS:-7}"
  wait_for cmp_old || exit 0
fi
echo "all done at $((SECONDS - START)) s"
