#!/usr/bin/env bash
# On a GPU host (see README.md here): CUDA+RPC build, then checks on a real GPU: NVML vs nvidia-smi, memory used by
# Corral's worker, context shift on a CUDA RPC worker (f16 and q8_0), capability refusals.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devsrc/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade . 2>&1 | tail -2
if [ ! -d /tmp/site/llama_cpp ]; then
  tar xzf .devsrc/llsrc.tgz -C /tmp
  setsid nohup bash -c 'CMAKE_ARGS="-DGGML_RPC=on -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps /tmp/llama_cpp_python-0.3.36 -w /tmp/wh > /tmp/build.log 2>&1; echo $? > /tmp/build.done' >/dev/null 2>&1 < /dev/null &
  python3 - <<'PY'
from tests.support.tiny_gguf import TinyLlama, write_tiny_llama
write_tiny_llama("/tmp/big.gguf", TinyLlama(n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=32000, dtype="f16"))
PY
  for _ in $(seq 1 420); do [ -f /tmp/build.done ] && break; sleep 1; done
  [ -f /tmp/build.done ] || { echo "build still running"; exit 0; }
  python3 -m pip install -q --no-deps --target /tmp/site /tmp/wh/*.whl
fi
python3 - <<'PY' 2>&1 | tee $OUT/gpu4.txt
import json, subprocess, sys, time
from corral.engine.runtime.localagents import LocalAgents
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
