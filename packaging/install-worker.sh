#!/usr/bin/env bash
# Set up a Corral worker in one step: a virtual environment with corral[agent] (no Qt),
# llama-cpp-python built with the ggml RPC backend for this host's GPUs (CUDA, Metal or CPU),
# a config file, the service, and the pairing code to type on the desktop.
#
#   sudo packaging/install-worker.sh            system service (user corral-agent), /opt/corral-agent
#   packaging/install-worker.sh                 without root: a user service, ~/.local/share/corral-agent
#   packaging/install-worker.sh --service none --start -- --listen 0.0.0.0:7340
#                                               no service: run the agent in the foreground
#
# Options:
#   --prefix DIR         where the virtual environment goes
#   --backend B          auto (default), cuda, metal or cpu
#   --portable           build llama.cpp for any CPU of this architecture (GGML_NATIVE off):
#                        for a build you copy to other machines; default is this CPU only
#   --llama-wheel FILE   install this llama-cpp-python wheel instead of building one (one
#                        built with --portable on another machine of the same kind)
#   --service S          system, user or none (default: system as root, user otherwise,
#                        none where systemd is not running)
#   --start              after installing, run corral-agent in the foreground (args after --)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(dirname "$here")"
python="${PYTHON:-python3}"
prefix=""
backend="auto"
portable=""
llama_wheel=""
service=""
start=""
agent_args=()

die() { echo "install-worker: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --portable) portable="--portable"; shift ;;
    --llama-wheel) llama_wheel="$2"; shift 2 ;;
    --service) service="$2"; shift 2 ;;
    --start) start=1; shift ;;
    --) shift; agent_args=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown option $1 (--help lists them)" ;;
  esac
done

case "$backend" in auto|cuda|metal|cpu) ;; *) die "--backend must be auto, cuda, metal or cpu" ;; esac
root=""; [ "$(id -u)" = 0 ] && root=1
if [ -z "$service" ]; then
  if [ ! -d /run/systemd/system ]; then service=none
  elif [ -n "$root" ]; then service=system
  else service=user; fi
fi
case "$service" in
  system) [ -n "$root" ] || die "--service system needs root (sudo), or use --service user" ;;
  user|none) ;;
  *) die "--service must be system, user or none" ;;
esac
if [ -z "$prefix" ]; then
  if [ "$service" = system ]; then prefix=/opt/corral-agent
  else prefix="${XDG_DATA_HOME:-$HOME/.local/share}/corral-agent"; fi
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$python is missing or older than 3.11: install Python 3.11+ (or set PYTHON=...)"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$python cannot make virtual environments: apt-get install python3-venv"
if [ -z "$llama_wheel" ] && ! command -v cmake >/dev/null; then
  die "building llama.cpp needs cmake and a C/C++ compiler: apt-get install cmake build-essential"
fi

venv="$prefix/venv"
say "virtual environment in $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
say "installing corral[agent] from $source_dir (no Qt)"
"${pip[@]}" "$source_dir[agent]"
case "$("$venv/bin/python" -c 'from corral.engine.security.tunnel import relay_mode; print(relay_mode())' 2>/dev/null)" in
  inproc) ;;
  native) say "warning: the tunnel's hand-over library (_rpcshim) was not built; tunnels use the native relay, which costs more per RPC message" ;;
  *) say "warning: the tunnel's native data path was not built (needs a C compiler and OpenSSL headers: apt-get install gcc libssl-dev, then run this again); tunnels use the slower Python TLS pumps" ;;
esac

if [ -n "$llama_wheel" ]; then
  [ -f "$llama_wheel" ] || die "no wheel at $llama_wheel"
  say "installing llama-cpp-python from $llama_wheel"
  "${pip[@]}" --force-reinstall --no-deps "$llama_wheel"
  "${pip[@]}" "$llama_wheel"
else
  say "llama-cpp-python with RPC for backend $backend: $("$venv/bin/python" "$here/install_llama.py" --backend "$backend" $portable --print-args)"
  "$venv/bin/python" "$here/install_llama.py" --backend "$backend" $portable
fi
if "$venv/bin/python" -c 'import PySide6' 2>/dev/null; then
  die "Qt (PySide6) ended up in $venv: a worker must not need it"
fi

if [ "$service" = system ]; then
  config=/etc/corral/agent.toml
  state=/var/lib/corral-agent
  cache_dir=/var/cache/corral-agent
else
  config="${XDG_CONFIG_HOME:-$HOME/.config}/corral-agent/agent.toml"
  state=""
  cache_dir=""
fi
if [ ! -e "$config" ]; then
  say "writing $config (docs/OPERATIONS.md lists every setting)"
  mkdir -p "$(dirname "$config")"
  {
    echo "# corral-agent settings (docs/OPERATIONS.md); flags override them; SIGHUP (systemctl reload) re-reads them"
    echo 'listen = "0.0.0.0:7340"'
    echo '# interfaces = ["eth0"]        # announce (mDNS) only here'
    echo '# devices = ["CUDA0"]          # share only these (corral-agent doctor lists them)'
    echo '# reserve_mib = { CUDA0 = 2048, default = 256 }   # keep this much free per device'
    echo '# rpc_threads = 8'
    echo '# rpc_spin = 30000             # OpenMP spins before idle worker threads sleep'
    [ -n "$cache_dir" ] && echo "cache_dir = \"$cache_dir\""
    echo '# cache_max_mib = 10240'
  } > "$config"
fi

say "checking the result (corral-agent doctor)"
doctor_args=()
[ -n "$state" ] && doctor_args=(--state-dir "$state" --log-dir /var/log/corral-agent)
"$venv/bin/corral-agent" --config "$config" "${doctor_args[@]}" doctor || true

case "$service" in
  system)
    id corral-agent >/dev/null 2>&1 || useradd --system --home-dir "$state" --shell /usr/sbin/nologin corral-agent
    sed "s|@BIN@|$venv/bin|g" "$here/systemd/corral-agent.service" > /etc/systemd/system/corral-agent.service
    systemctl daemon-reload
    systemctl enable --now corral-agent
    say "corral-agent runs as a system service (systemctl status corral-agent)"
    pair=("$venv/bin/corral-agent" pair --state-dir "$state")
    ;;
  user)
    unit_dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
    mkdir -p "$unit_dir"
    sed "s|@BIN@|$venv/bin|g" "$here/systemd/corral-agent.user.service" > "$unit_dir/corral-agent.service"
    systemctl --user daemon-reload
    systemctl --user enable --now corral-agent
    say "corral-agent runs as a user service (systemctl --user status corral-agent;"
    say "loginctl enable-linger $USER keeps it running after you log out)"
    pair=("$venv/bin/corral-agent" pair)
    ;;
  none)
    if [ -n "$start" ]; then
      say "starting corral-agent in the foreground (Ctrl-C stops it); pair with the code below"
      exec "$venv/bin/corral-agent" --config "$config" "${agent_args[@]}"
    fi
    say "installed. Start the agent with: $venv/bin/corral-agent --config $config"
    say "it prints the pairing code to type on the desktop"
    exit 0
    ;;
esac

# the service needs a moment to open its admin socket
for _ in $(seq 1 60); do
  if code="$("${pair[@]}" 2>/dev/null)"; then
    echo "$code"
    exit 0
  fi
  sleep 1
done
die "the agent did not answer; see: corral-agent doctor, and journalctl -u corral-agent"
