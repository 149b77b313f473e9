#!/usr/bin/env bash
# Install what lbsync's demo and tests need on a fresh Debian machine: etcd, nginx,
# HAProxy (+ the nginx Lua module and wrk) and podman (+ runc, debootstrap: the container
# test) from Debian's packages, and lbsync itself with its dev tools (podman-compose among
# them) into ./.venv. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# luajit2, not luajit: Debian's `luajit` (upstream LuaJIT) conflicts with OpenResty's
# libluajit2-5.1-2, which libnginx-mod-http-lua needs, and installing it removes the nginx
# Lua module. luajit2 is the same LuaJIT that nginx embeds; lbsync uses it to check Lua.
APT_PACKAGES=(
  etcd-server etcd-client nginx haproxy wrk
  libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core lua-resty-lrucache lua-cjson
  luajit2 python3-venv golang-go
  podman runc debootstrap uidmap slirp4netns fuse-overlayfs iproute2
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_packages() {
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

install_system_packages() {
  local missing
  missing=$(missing_packages)
  [ -z "$missing" ] && return 0
  echo "==> installing Debian packages:" $missing
  as_root apt-get update -qq
  # The packages' own services are not used (and need no starting): lbsync's demo and tests
  # run private etcd/nginx/HAProxy instances on free loopback ports.
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

install_python_env() {
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  local stamp=.venv/.lbsync-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing lbsync and its dev tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
  fi
}

install_system_packages
install_python_env
echo "==> ready: $(.venv/bin/lbsync --version), $(etcd --version | head -1), $(nginx -v 2>&1), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
