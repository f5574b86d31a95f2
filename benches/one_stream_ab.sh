#!/usr/bin/env bash
# benches/one_stream_ab.sh: the one-stream cached-blob figure, for one or more cachalot builds against nginx,
# over many interleaved rounds. Every server sends the same file (nginx gets a hard link to the blob cachalot
# cached), so the page cache is shared. Prints each round, each server's median, and for each build the median
# and quartiles of its per-round ratio to nginx: with the host stealing CPU time, a round's throughput moves by
# up to 2x, and the paired ratio is steadier than either median.
#
# Usage:  benches/one_stream_ab.sh BIN_A [BIN_B ...]      (ROUNDS=31 GETS=4 MIB=256)
# Needs: docker-registry, nginx, curl, awk, sha256sum.
set -Eeuo pipefail
ROUNDS=${ROUNDS:-31}
GETS=${GETS:-4}
MIB=${MIB:-256}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
(($#)) || die "usage: $0 CACHALOT_BIN [CACHALOT_BIN ...]"
need curl; need awk; need nginx; need docker-registry; need sha256sum coreutils

W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-one-ab.XXXXXX")
chmod 755 "$W" # nginx workers run as nobody when started as root
mkdir -p "$W/www/b"
serve_upstream
head -c $((MIB * 1048576)) /dev/urandom >"$W/blob"
D=sha256:$(sha256sum "$W/blob" | cut -d' ' -f1)
push_blob "$W/blob" "$D"
rm -f "$W/blob"

URLS=(); NAMES=(nginx)
for i in $(seq 0 $(($# - 1))); do
    bin=${*:$((i + 1)):1}
    serve_cachalot "$bin" "$i"
    URLS+=("http://127.0.0.1:$CA_PORT/v2/$REPO/blobs/$D"); NAMES+=("bin$i")
    [[ $(http_code "${URLS[i]}") == 200 ]] || die "bin$i: the blob GET failed"
    log "bin$i = $bin on port $CA_PORT"
done
sleep 1 # the commit
f=$(find "$W/cache0" -type f -size "$((MIB * 1048576))c" | head -1)
[[ -n $f ]] || die "the cached blob file was not found under $W/cache0"
ln "$f" "$W/www/b/blob"
chmod -R a+rX "$W/www"

NG_PORT=$(free_port)
nginx_config "$NG_PORT" "$W/www"
run_nginx
PIDS+=("$NG_PID")
URLS=("http://127.0.0.1:$NG_PORT/b/blob" "${URLS[@]}")
for _ in $(seq 100); do [[ $(http_code -I "${URLS[0]}") == 200 ]] && break; sleep 0.1; done

# one URL: MiB/s of GETS back-to-back GETs on one connection (all must be 200 and whole).
one() {
    local args=() t0 t1 out
    for _ in $(seq "$GETS"); do args+=(-o /dev/null "$1"); done
    t0=$(now)
    out=$(curl -s -w '%{http_code} %{size_download}\n' "${args[@]}")
    t1=$(now)
    [[ $(grep -c "^200 $((MIB * 1048576))\$" <<<"$out") == "$GETS" ]] || die "GET $1: $out"
    calc "$GETS * $MIB / ($t1 - $t0)"
}
for u in "${URLS[@]}"; do one "$u" >/dev/null; done # warm the page cache and every server

# Rounds rotate the order, so drifting background load hits every server alike.
for r in $(seq "$ROUNDS"); do
    line="round $r:"
    for k in "${!URLS[@]}"; do
        i=$(((k + r - 1) % ${#URLS[@]}))
        V[i]=$(one "${URLS[i]}")
    done
    for i in "${!URLS[@]}"; do line+=" ${NAMES[i]}=${V[i]}"; done
    echo "$line" | tee -a "$W/rounds"
done
for i in "${!URLS[@]}"; do
    echo "${NAMES[i]}: median $(awk -v c=$((i + 3)) '{ split($c, a, "="); print a[2] }' "$W/rounds" | median) MiB/s"
done
for i in $(seq 1 $#); do
    awk -v c=$((i + 3)) '{ split($3, n, "="); split($c, a, "="); print a[2] / n[2] }' "$W/rounds" | sort -g |
        awk -v name="bin$((i - 1))" '{ v[NR] = $1 } END {
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%s / nginx, per round: median %.3f, quartiles %.3f-%.3f (%d rounds)\n", name, m, v[int((NR + 3) / 4)], v[int((3 * NR + 3) / 4)], NR }'
done
