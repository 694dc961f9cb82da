#!/usr/bin/env bash
# On a GPU host (see README.md here): bench/plan_accuracy.py with CUDA. The dense llama
# shapes loaded on the desktop's own GPU alone (--splits local: every layer on CUDA0, the
# embeddings and buffers in host memory), then the other families (sliding window, experts,
# head dims 96/256, a 152k vocabulary) locally and split over two local agents whose workers
# serve the same GPU. Results: $OUT/PLANNER-results-h200-local.md and
# $OUT/PLANNER-results-h200-families.md. Call again with the same command if it says a step
# is still running (the steps run detached).
CORRAL_MODELS=small . packaging/gpu/setup.sh "${1:-420}"
START=$SECONDS WAIT=${2:-420}
. packaging/gpu/steps.sh
detached planacc_local "python3 bench/plan_accuracy.py --splits local --out /tmp/PLANNER-results-h200-local.md"
wait_for planacc_local || exit 0
detached planacc_fam "python3 bench/plan_accuracy.py --families --splits local,even --out /tmp/PLANNER-results-h200-families.md"
wait_for planacc_fam
cp /tmp/PLANNER-results-h200-*.md /tmp/planacc_*.log "$OUT"/ 2>/dev/null
head -8 /tmp/PLANNER-results-h200-*.md 2>/dev/null
for f in /tmp/planacc_*.log; do tail -n 3 "$f"; done
