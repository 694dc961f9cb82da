#!/usr/bin/env bash
# On a GPU host (see README.md here): the tunnel bench on CPU and CUDA workers.
. packaging/gpu/setup.sh "${1:-420}"
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
for spec in "CPU small.gguf 4" "CUDA0 small.gguf 2" "CUDA0 big.gguf 2"; do
  set -- $spec
  echo "== $1 $2"
  timeout 170 python3 bench/tunnel.py --devices $1 --model /tmp/$2 --threads $3 --rounds 9 --tokens 128 --pings 1000 2>&1 | grep -v "^round\|WARNING" | tee -a $OUT/tunnel_gpu.txt
done
