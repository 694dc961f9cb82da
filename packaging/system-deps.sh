#!/usr/bin/env bash
# System libraries Qt needs even offscreen (a bare Debian/Ubuntu lacks some), plus what the
# tests use to check the packaging for real: Xvfb and the X libraries for the bundle's window,
# xwininfo, desktop-file-validate; and gcc with OpenSSL's headers for the tunnel's native relay
# (setup.py). Installs them when run as root with apt-get; otherwise says
# what to install and carries on.
set -u
need=()
for lib in libEGL.so.1 libGL.so.1 libfontconfig.so.1 libglib-2.0.so.0 libxkbcommon.so.0 libdbus-1.so.3 \
    libxkbcommon-x11.so.0 libxcb-cursor.so.0 libxcb-icccm.so.4 libxcb-image.so.0 libxcb-keysyms.so.1 \
    libxcb-randr.so.0 libxcb-render-util.so.0 libxcb-shape.so.0 libxcb-xkb.so.1; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need+=("$lib")
done
for tool in Xvfb xvfb-run xwininfo desktop-file-validate gcc; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
# the tunnel's native relay (setup.py) is built against OpenSSL's libcrypto
[ -f /usr/include/openssl/evp.h ] || need+=(openssl/evp.h)
[ ${#need[@]} -eq 0 ] && exit 0
pkgs="libegl1 libgl1 libfontconfig1 libglib2.0-0 libxkbcommon0 libdbus-1-3"
pkgs="$pkgs libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1"
pkgs="$pkgs libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1"
pkgs="$pkgs xvfb xauth x11-utils desktop-file-utils gcc libc6-dev libssl-dev"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system libraries and test tools: $pkgs"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs) >/dev/null
else
  echo "warning: missing ${need[*]}; install: sudo apt-get install $pkgs" >&2
fi
exit 0
