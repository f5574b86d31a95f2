#!/usr/bin/env bash
# benches/cold_ab.sh: cold blob GETs through two or more cachalot builds, interleaved, beside a GET straight
# from the upstream, to compare changes to the fill path. Each GET is of a fresh blob no cache has seen.
# For every cachalot GET it prints the time, the client's CPU, and each cachalot thread's CPU and run-queue
# wait (from /proc/<tid>/schedstat): a hash thread with much less CPU than the wall time and little
# run-queue wait is a hash waiting for bytes.
#
# Usage:  benches/cold_ab.sh BIN_A [BIN_B ...]      (REPS=5 MIB=256)
# Needs: docker-registry, curl, awk, sha256sum.
set -Eeuo pipefail
REPS=${REPS:-5}
MIB=${MIB:-256}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
(($#)) || die "usage: $0 CACHALOT_BIN [CACHALOT_BIN ...]"
need curl; need awk; need docker-registry; need sha256sum coreutils

W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-cold-ab.XXXXXX")
serve_upstream

# Fresh blobs: one random base, each a copy with its last 64 bytes new.
log "pushing $((REPS * ($# + 1))) blobs of $MIB MiB"
head -c $((MIB * 1048576)) /dev/urandom >"$W/base"
DIGESTS=()
for _ in $(seq $((REPS * ($# + 1)))); do
    { head -c $((MIB * 1048576 - 64)) "$W/base"; head -c 64 /dev/urandom; } >"$W/blob"
    d=sha256:$(sha256sum "$W/blob" | cut -d' ' -f1)
    push_blob "$W/blob" "$d"
    DIGESTS+=("$d")
done
rm -f "$W/base" "$W/blob"

PORTS=(); CPIDS=()
for i in $(seq 0 $(($# - 1))); do
    bin=${*:$((i + 1)):1}
    serve_cachalot "$bin" "$i"
    CPIDS+=("$CA_PID"); PORTS+=("$CA_PORT")
    log "bin$i = $bin on port $CA_PORT"
done

# schedstat PID: "tid cpu_ms runqueue_ms" per thread.
schedstat() {
    for t in /proc/"$1"/task/*; do
        echo "$(basename "$t") $(awk '{ printf "%d %d", $1 / 1e6, $2 / 1e6 }' "$t/schedstat")"
    done | sort
}

j=0
declare -A TIMES
for _ in $(seq "$REPS"); do
    t=$(curl -s -o /dev/null -w '%{time_total}' "$UP/v2/$REPO/blobs/${DIGESTS[$j]}"); j=$((j + 1))
    echo "direct $t"; TIMES[direct]+="$t "
    for i in "${!PORTS[@]}"; do
        d=${DIGESTS[$j]}; j=$((j + 1))
        schedstat "${CPIDS[$i]}" >"$W/s0"
        out=$( { /usr/bin/time -f 'client-cpu %U+%S' curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}' \
            "http://127.0.0.1:${PORTS[$i]}/v2/$REPO/blobs/$d"; } 2>"$W/ct")
        read -r code size secs <<<"$out"
        [[ $code == 200 && $size == $((MIB * 1048576)) ]] || die "bin$i: GET $d -> $code, $size bytes"
        echo "bin$i $secs s, $(cat "$W/ct")"; TIMES[bin$i]+="$secs "
        sleep 0.5 # the commit
        schedstat "${CPIDS[$i]}" >"$W/s1"
        join -a2 -e0 -o 0,1.2,1.3,2.2,2.3 "$W/s0" "$W/s1" |
            awk '$4 - $2 > 20 { printf "    thread %s: cpu %d ms, run-queue wait %d ms\n", $1, $4 - $2, $5 - $3 }'
    done
done
echo
for k in direct $(seq -f 'bin%g' 0 $(($# - 1))); do
    echo "$k: ${TIMES[$k]}-> median $(printf '%s\n' ${TIMES[$k]} | median) s"
done
