# Sourced by llama-bench.sh and tunnel-ab.sh: steps that run detached (setsid), so the device
# tool's command limit does not kill them, and a call again on the same machine picks up
# where the last one was. The caller sets START=$SECONDS and WAIT (its seconds to wait);
# wait_for's margin, log tail and whether it says the exit status come from WAIT_MARGIN
# (default 5 s), WAIT_TAIL (default 5 lines) and WAIT_SAY_RC (set: say it).
left() { echo $((WAIT - (SECONDS - START))); }
detached() {  # NAME COMMAND: run once, detached; /tmp/NAME.done gets its exit status
  [ -f /tmp/$1.started ] && return
  touch /tmp/$1.started
  setsid nohup bash -c "{ $2; } > /tmp/$1.log 2>&1; echo \$? > /tmp/$1.done" >/dev/null 2>&1 < /dev/null &
}
wait_for() {  # NAME: until /tmp/NAME.done or out of time
  while [ ! -f /tmp/$1.done ] && [ "$(left)" -gt "${WAIT_MARGIN:-5}" ]; do sleep 1; done
  [ -f /tmp/$1.done ] || { echo "$1 still running"; tail -"${WAIT_TAIL:-5}" /tmp/$1.log; return 1; }
  [ -z "${WAIT_SAY_RC:-}" ] || echo "$1 rc=$(cat /tmp/$1.done) at $((SECONDS - START)) s"
}
