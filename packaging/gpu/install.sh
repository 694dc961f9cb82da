# Sourced by setup.sh and handover.sh: installs Corral (with the tunnel's native parts) and the
# carried wheels into /tmp/site, once per host.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site
# the tunnel's native parts (setup.py's optional extensions; handover.sh's older shim) need
# OpenSSL's headers (carried in .devsrc/openssl-include where the host has none) and an
# unversioned libcrypto.so: CFLAGS and LDFLAGS say where, for every caller
[ -f /usr/include/openssl/evp.h ] || export CFLAGS="-I$PWD/.devsrc/openssl-include"
if ! ldconfig -p | grep -q 'libcrypto\.so '; then
  mkdir -p /tmp/sslib && ln -sf "$(ldconfig -p | awk '/libcrypto\.so\.3 /{print $NF; exit}')" /tmp/sslib/libcrypto.so
  export LDFLAGS="-L/tmp/sslib"
fi
if [ ! -f /tmp/site.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devsrc/*.whl 2>&1 | tail -2
  python3 -m pip install --no-deps --no-build-isolation --target /tmp/site --upgrade . > /tmp/pip-corral.log 2>&1
  grep -i -B2 -A8 "error\|optional" /tmp/pip-corral.log | head -30
  touch /tmp/site.done
fi
