#!/usr/bin/env bash
# Several steps of scripts/gpu_session.sh in one device call, for when machines are scarce: each step runs in
# $OUT/<step>/ under what is left of SECONDS (the call's limit less a margin), and its folder is packed into
# $OUT/<step>.tgz (the device returns at most 8 files) even when the deadline cut it short.
#   scripts/gpu_chain.sh SECONDS STEP [STEP ...]
# Unpack here with `tar -xzf <returned>/<step>.tgz`; a step cut short says so in its chain.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder whose files come back}
deadline=$(( $(date +%s) + ${1:?usage: gpu_chain.sh SECONDS STEP [STEP ...]} ))
shift
for step in "$@"; do
    left=$(( deadline - $(date +%s) ))
    mkdir -p "$OUT/$step"
    if [ "$left" -lt 30 ]; then
        echo "$step: not run, ${left}s left" | tee "$OUT/$step/chain.txt"
    else
        OUT="$OUT/$step" STEP_LIMIT_S=$(( left - 15 )) timeout --kill-after=5 "$left" scripts/gpu_session.sh "$step" \
            >"$OUT/$step/output.txt" 2>&1
        rc=$?
        echo "$step: exit $rc after $(( left - (deadline - $(date +%s)) ))s$([ $rc = 124 ] && echo ', cut by the deadline')" \
            | tee "$OUT/$step/chain.txt"
        tail -25 "$OUT/$step/output.txt"
    fi
    tar -czf "$OUT/$step.tgz" -C "$OUT" "$step" && rm -rf "${OUT:?}/$step"
done
