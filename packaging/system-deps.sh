#!/usr/bin/env bash
# System libraries Qt needs even offscreen (a bare Debian/Ubuntu lacks some). Installs them
# when run as root with apt-get; otherwise says what to install and carries on.
set -u
need=()
for lib in libEGL.so.1 libGL.so.1 libfontconfig.so.1 libglib-2.0.so.0 libxkbcommon.so.0 libdbus-1.so.3; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need+=("$lib")
done
[ ${#need[@]} -eq 0 ] && exit 0
pkgs="libegl1 libgl1 libfontconfig1 libglib2.0-0 libxkbcommon0 libdbus-1-3"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Qt's system libraries: $pkgs"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs) >/dev/null
else
  echo "warning: Qt needs ${need[*]}; install: sudo apt-get install $pkgs" >&2
fi
exit 0
