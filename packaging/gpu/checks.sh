#!/usr/bin/env bash
# On a GPU host (see README.md here): NVML vs nvidia-smi, memory used by Corral's worker,
# context shift on a CUDA RPC worker (f16 and q8_0), capability refusals.
. packaging/gpu/setup.sh "${1:-420}"
python3 - <<'PY' 2>&1 | tee $OUT/gpu4.txt
import json, subprocess, sys, time
from corral.engine.localagents import LocalAgents
def corral(*a, timeout=240):
    return subprocess.run([sys.executable, "-m", "corral.engine.cli", *a], capture_output=True, text=True, timeout=timeout)
print(subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid,memory.total,memory.used", "--format=csv,noheader"], capture_output=True, text=True).stdout)
with LocalAgents(1) as ag:
    a = ag.addresses[0]
    inv = json.loads(corral("agents", "--agent", a, "--json").stdout.splitlines()[-1])["inventory"]
    for g in inv["gpus"]:
        print("NVML via agent:", g["index"], g["name"], g["uuid"], g["memory_total"] >> 20, "MiB total", (g["memory_total"] - g["memory_free"]) >> 20, "MiB used")
    print("ggml devices:", [(d["name"], d["description"], d["memory_total"] >> 20) for d in inv["devices"]])
    for kv in ("f16", "q8_0"):
        args = ["chat", "/tmp/big.gguf", "--agent", a, "--prompt", "Tell a long story.", "--max-tokens", "700",
                "--ignore-eos", "--ctx", "256", "--json", "--cache-type-k", kv, "--cache-type-v", kv, "--flash-attn", "on"]
        p = subprocess.Popen([sys.executable, "-m", "corral.engine.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(12)
        inv = json.loads(corral("agents", "--agent", a, "--json").stdout.splitlines()[-1])["inventory"]
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        print(kv, "worker pid", inv["worker"]["pid"], "corral_used MiB", [g["corral_used"] >> 20 for g in inv["gpus"]], "| nvidia-smi apps:", smi.replace("\n", "; "))
        out, err = p.communicate(timeout=300)
        ev = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        shifts = [e for e in ev if e.get("type") == "shift"]
        done = ev[-1] if ev else {}
        print(kv, "exit", p.returncode, "tokens", sum(1 for e in ev if e.get("type") == "token"), "shifts", len(shifts),
              "stop", done.get("stop"), "devices", [(d["device"], len(d["layers"])) for d in done.get("devices", [])], err[-300:] if p.returncode else "")
    for k, v, fa in (("iq4_nl", "iq4_nl", "on"), ("q4_0", "q4_0", "off"), ("q4_0", "q8_0", "on")):
        d = corral("plan", "/tmp/big.gguf", "--agent", a, "--cache-type-k", k, "--cache-type-v", v, "--flash-attn", fa)
        print(f"plan K={k} V={v} FA={fa}: exit {d.returncode}:", (d.stdout + d.stderr).strip().splitlines()[-3:])
PY
