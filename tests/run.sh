#!/usr/bin/env bash
# Runs every ISCSISnap test. First installs the real clients the tests drive (libiscsi's tools, qemu-img with its
# iSCSI driver, promtool); under CI (CI=true) anything still missing fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v iscsi-ls >/dev/null 2>&1 || missing+=(libiscsi-bin)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
compgen -G "/usr/lib/*/qemu/block-iscsi.so" >/dev/null || missing+=(qemu-block-extra)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "tests/run.sh: cannot install ${missing[*]} (not root, no sudo): apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

dotnet build ISCSISnap.sln -c Release
dotnet test ISCSISnap.sln -c Release --no-build --logger "console;verbosity=normal" "$@"
