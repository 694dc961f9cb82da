#!/usr/bin/env bash
# On any lent GPU host, no llama.cpp build needed (~1 min): the hand-over's own cost per RPC
# message by size (bench/handover.py), and what the host's CPU does with AES-256-GCM.
#
#   packaging/gpu/handover.sh
#
# With .devsrc/rpcshim_before_b37eaa4.c there (`git show b37eaa4^:engine/security/_rpcshim.c`),
# that older shim is built beside and measured in the same run (--also).
# $OUT gets cpu.txt (lscpu, openssl speed) and handover.md.
set -u
. packaging/gpu/install.sh
mkdir -p "$OUT"
{ lscpu | head -20; openssl speed -evp aes-256-gcm -seconds 1 2>/dev/null | tail -2; } > "$OUT/cpu.txt" 2>&1
cat "$OUT/cpu.txt"
ALSO=()
OLD=.devsrc/rpcshim_before_b37eaa4.c
if [ -f $OLD ]; then  # with install.sh's CFLAGS and LDFLAGS, as pip built the current one
  # shellcheck disable=SC2086
  gcc -O2 -shared -fPIC -Iengine/security ${CFLAGS:-} -o /tmp/oldshim.so $OLD ${LDFLAGS:-} \
    -lcrypto -ldl && ALSO=(--also /tmp/oldshim.so)
fi
python3 bench/handover.py --rounds 5 --count 2000 --sizes 12,16384,131072,204800 "${ALSO[@]}" \
  | tee "$OUT/handover.md"
