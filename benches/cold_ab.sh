#!/usr/bin/env bash
# benches/cold_ab.sh: cold blob GETs through two or more cachalot builds, interleaved, beside a GET straight
# from the upstream, to compare changes to the fill path. Each GET is of a fresh blob no cache has seen.
# For every cachalot GET it prints the time, the client's CPU, and each cachalot thread's CPU and run-queue
# wait (from /proc/<tid>/schedstat): a hash thread with much less CPU than the wall time and little
# run-queue wait is a hash waiting for bytes. Each build's CPU seconds per cold GiB (the whole process, user +
# system of every thread, from /proc/<tid>/schedstat, from the GET's start until its commit) are summed up at the end beside what `openssl dgst -sha256`
# takes to hash a GiB on this machine.
#
# RECYCLE=1 writes and deletes MIB of zeros just before each cachalot GET, so that the fill's page-cache
# pages are ones the guest just freed. On a VM whose host backs memory lazily (free pages handed back to
# it), a page the guest has not touched lately costs a host fault on first write, charged to the writer:
# here that more than doubled a fill's CPU (4.25 against 2.10 s per GiB, same session), and `dd` into a
# new file swung from 0.35 to 2.9 s per GiB by that alone. Run both ways and say which.
#
# Usage:  benches/cold_ab.sh BIN_A [BIN_B ...]      (REPS=5 MIB=256 RECYCLE=0)
# Needs: docker-registry, curl, awk, sha256sum.
set -Eeuo pipefail
REPS=${REPS:-5}
MIB=${MIB:-256}
RECYCLE=${RECYCLE:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
(($#)) || die "usage: $0 CACHALOT_BIN [CACHALOT_BIN ...]"
need curl; need awk; need docker-registry; need sha256sum coreutils; need openssl

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
# What hashing alone costs here: openssl over one of the blobs, CPU seconds per GiB, median of 3.
TIMEFORMAT='%U %S'
OSSL=""
for _ in 1 2 3; do
    read -r u sy < <({ time openssl dgst -sha256 "$W/blob" >/dev/null; } 2>&1)
    OSSL+="$(calc "($u + $sy) * 1024 / $MIB") "
done
unset TIMEFORMAT
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
declare -A TIMES CPU
for _ in $(seq "$REPS"); do
    t=$(curl -s -o /dev/null -w '%{time_total}' "$UP/v2/$REPO/blobs/${DIGESTS[$j]}"); j=$((j + 1))
    echo "direct $t"; TIMES[direct]+="$t "
    for i in "${!PORTS[@]}"; do
        d=${DIGESTS[$j]}; j=$((j + 1))
        if ((RECYCLE)); then
            # Pages just freed, as a cache evicting while it fills would hand back (see the header).
            dd if=/dev/zero of="$W/recycle" bs=1M count="$MIB" status=none && rm -f "$W/recycle"
        fi
        schedstat "${CPIDS[$i]}" >"$W/s0"
        out=$( { /usr/bin/time -f 'client-cpu %U+%S' curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}' \
            "http://127.0.0.1:${PORTS[$i]}/v2/$REPO/blobs/$d"; } 2>"$W/ct")
        read -r code size secs <<<"$out"
        [[ $code == 200 && $size == $((MIB * 1048576)) ]] || die "bin$i: GET $d -> $code, $size bytes"
        echo "bin$i $secs s, $(cat "$W/ct")"; TIMES[bin$i]+="$secs "
        sleep 0.5 # the commit
        schedstat "${CPIDS[$i]}" >"$W/s1"
        join -a2 -e0 -o 0,1.2,1.3,2.2,2.3 "$W/s0" "$W/s1" >"$W/s"
        awk '$4 - $2 > 20 { printf "    thread %s: cpu %d ms, run-queue wait %d ms\n", $1, $4 - $2, $5 - $3 }' "$W/s"
        # Every thread's CPU (schedstat's nanoseconds, not the clock ticks of /proc/PID/stat).
        cpu=$(awk -v mib="$MIB" '{ ms += $4 - $2 } END { printf "%.2f", ms / 1000 * 1024 / mib }' "$W/s")
        echo "    process CPU: $cpu s per GiB"; CPU[bin$i]+="$cpu "
    done
done
echo
for k in direct $(seq -f 'bin%g' 0 $(($# - 1))); do
    echo "$k: ${TIMES[$k]}-> median $(printf '%s\n' ${TIMES[$k]} | median) s"
done
for k in $(seq -f 'bin%g' 0 $(($# - 1))); do
    echo "$k CPU s per cold GiB: ${CPU[$k]}-> median $(printf '%s\n' ${CPU[$k]} | median)"
done
echo "openssl dgst -sha256, CPU s per GiB: ${OSSL}-> median $(printf '%s\n' $OSSL | median)"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
