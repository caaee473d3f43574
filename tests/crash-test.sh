#!/usr/bin/env bash
# Longer runs of the SIGKILL crash test: tests/crash-test.sh [KILLS] [SEED]
# (tests/run.sh runs it with 4 kills; this runs as many as you like, printing the seed to replay a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export ISCSISNAP_CRASH_ITERATIONS="${1:-100}"
[ -n "${2:-}" ] && export ISCSISNAP_CRASH_SEED="$2"
dotnet build ISCSISnap.sln -c Release
dotnet test tests/ISCSISnap.Tests -c Release --no-build --filter "FullyQualifiedName~CrashTests" --logger "console;verbosity=detailed"
