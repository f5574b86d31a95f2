#!/usr/bin/env bash
# benches/insn_guard.sh: the hot paths' instruction counts against a committed baseline (issue 16, part 3).
#
# Instructions counted by callgrind do not move with the machine's load the way req/s does, so they can
# guard the hot paths in CI. Counted per request, as benches/callgrind.sh counts them (the difference of two
# runs, divided by the difference of their request counts, so startup and shutdown cancel out):
#   manifest-get    a cached manifest GET by tag
#   manifest-head   a HEAD of it
#   blob-get-1mib   a GET of a cached 1 MiB blob (sendfile: its bytes cost the kernel, not these counts)
# One run serves N1 of each; one run per kind serves N2 of that kind and N1 of the others; the runs go
# two at a time. Each request kind goes over its own keep-alive connection (one curl invocation).
#
# Fails (exit 1) when a count rises more than TOLERANCE (15%) above BASELINE. A count that falls by more
# than that passes with a note: lower the baseline in a commit of its own that says why (UPDATE=1 rewrites the
# file with this run's counts). Run by .ci/run after the release build.
#
# Usage:  CACHALOT_BIN=target/release/cachalot benches/insn_guard.sh
#         benches/insn_guard.sh                           # builds cachalot (cargo build --release) first
# Knobs (env): BASELINE=benches/instructions.txt TOLERANCE=15 (percent) N1=100 N2=2100 UPDATE=0
#              KEEP=0 (1: keep the temp dir with the callgrind files)
# Needs: valgrind, docker-registry, curl, awk, openssl or sha256sum. About 20-40 s on 2 cores (18-42 s measured, load 2-9).
set -Eeuo pipefail
umask 022

N1=${N1:-100}
N2=${N2:-2100}
TOLERANCE=${TOLERANCE:-15}
UPDATE=${UPDATE:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASELINE=${BASELINE:-$ROOT/benches/instructions.txt}
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
KINDS=(manifest-get manifest-head blob-get-1mib)
declare -A COUNT BASE

need curl; need awk; need valgrind; need docker-registry
command -v openssl >/dev/null || need sha256sum coreutils
((N2 > N1 && N1 > 0)) || die "need N2 > N1 > 0"
[[ $UPDATE == 1 || -s $BASELINE ]] || die "no baseline at $BASELINE (UPDATE=1 writes one)"

locate_cachalot
W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-insn-guard.XXXXXX")
mkdir -p "$W/logs" "$W/data" "$W/upstream" "$W/cg"
cp "$BIN" "$W/cachalot" && BIN_SRC=$BIN && BIN=$W/cachalot
# The runs start in background subshells, which do not add to PIDS: each leaves its pid in a file.
kill_runs() { for f in "$W"/cg/*.pid; do [[ -e $f ]] && kill -9 "$(cat "$f")" 2>/dev/null; done; return 0; }
# set +e: under errexit the (exit $rc) that hands cleanup the status would end the trap before it.
trap 'rc=$?; set +e; kill_runs; (exit $rc); cleanup' EXIT

UP_PORT=$(free_port)
upstream_config "$W/upstream.yml" "$UP_PORT" "$W/upstream" 0
docker-registry serve "$W/upstream.yml" >"$W/logs/upstream.log" 2>&1 &
PIDS+=($!)
wait_listen upstream "${PIDS[-1]}" "$UP_PORT" 15 || die "the upstream did not start"
UP=http://127.0.0.1:$UP_PORT
head -c 1048576 /dev/urandom >"$W/data/layer.bin"
LAYER=sha256:$(sha256_of "$W/data/layer.bin")
push_blob "$W/data/layer.bin" "$LAYER"
seed_image "$LAYER" 1048576

# requests CA KIND N: N requests of KIND on one connection; every answer must be a 200 of the right size.
requests() {
    local ca=$1 kind=$2 n=$3 cfg=$W/curl-$2-$RANDOM.cfg url size flags=() out bad
    case $kind in
        manifest-get) url=$ca/v2/$REPO/manifests/$TAG size=$MANIFEST_BYTES ;;
        manifest-head) url=$ca/v2/$REPO/manifests/$TAG size=0 flags=(-I) ;;
        blob-get-1mib) url=$ca/v2/$REPO/blobs/$LAYER size=1048576 ;;
    esac
    : >"$cfg"
    for _ in $(seq "$n"); do printf 'url = "%s"\noutput = "/dev/null"\n' "$url" >>"$cfg"; done
    out=$(curl -s "${flags[@]}" --max-time 300 -H "Accept: $MT_MANIFEST" -K "$cfg" \
        -w '%{http_code} %{num_connects} %{size_download}\n') || { log "$kind: curl failed"; return 1; }
    bad=$(awk -v sz="$size" '$1 != 200 || $3 != sz { b++ } END { print b + 0 }' <<<"$out")
    [[ $(wc -l <<<"$out") == "$n" && $bad == 0 ]] || { log "$kind x$n: $bad bad answers"; return 1; }
    (($(awk '{ c += $2 } END { print c + 0 }' <<<"$out") <= 1)) || log "warning: $kind x$n used more than one connection"
}

# run NAME MANIFEST_GETS MANIFEST_HEADS BLOB_GETS: a fresh cachalot under callgrind serving those requests
# after the same warm-up; writes its total instruction count to $W/cg/NAME.ir.
run() {
    local name=$1 port pid out=$W/cg/$1.out log=$W/logs/cachalot-$1.log ca counts=("$2" "$3" "$4") i
    port=$(free_port)
    cachalot_config "$W/$name.toml" "$port" "$W/cache-$name"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN" serve --config "$W/$name.toml" >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$W/cg/$name.pid"
    wait_listen "cachalot ($name)" "$pid" "$port" 120 || { tail -n 20 "$log" >&2; return 1; }
    ca=http://127.0.0.1:$port
    # The first GETs fill the cache; the rest settle lazily built state, alike in every run.
    for kind in "${KINDS[@]}"; do requests "$ca" "$kind" 5 || { stop "$pid"; return 1; }; done
    for i in "${!KINDS[@]}"; do requests "$ca" "${KINDS[i]}" "${counts[i]}" || { stop "$pid"; return 1; }; done
    stop "$pid"
    rm -f "$W/cg/$name.pid"
    awk '/^(summary|totals):/ { print $2; exit }' "$out" >"$W/cg/$name.ir"
    [[ $(cat "$W/cg/$name.ir") =~ ^[0-9]+$ ]] || { log "no total in $out"; return 1; }
}

log "cachalot $BIN_SRC under $(valgrind --version); N = $N1 and $N2; baseline $BASELINE"
# Two at a time: the counts do not depend on how the runs share the CPUs.
run base "$N1" "$N1" "$N1" & a=$!
run manifest-get "$N2" "$N1" "$N1" & b=$!
wait "$a" && wait "$b" || die "a callgrind run failed"
run manifest-head "$N1" "$N2" "$N1" & a=$!
run blob-get-1mib "$N1" "$N1" "$N2" & b=$!
wait "$a" && wait "$b" || die "a callgrind run failed"

while read -r k v; do [[ -z $k || $k == \#* ]] || BASE[$k]=$v; done < <(cat "$BASELINE" 2>/dev/null)
base=$(cat "$W/cg/base.ir")
fail=0
printf '%-14s %12s %12s %8s\n' kind instructions baseline ratio
for kind in "${KINDS[@]}"; do
    per=$((($(cat "$W/cg/$kind.ir") - base) / (N2 - N1)))
    COUNT[$kind]=$per
    b=${BASE[$kind]:-}
    if [[ -z $b ]]; then
        printf '%-14s %12s %12s %8s  %s\n' "$kind" "$per" - - "no baseline"
        fail=1
        continue
    fi
    verdict=$(awk -v p="$per" -v b="$b" -v t="$TOLERANCE" 'BEGIN {
        r = p / b; printf "%.3fx  ", r
        if (r > 1 + t / 100) print "FAIL: more than " t "% above the baseline"
        else if (r < 1 - t / 100) print "ok, and more than " t "% below: lower the baseline (UPDATE=1) in a commit saying why"
        else print "ok" }')
    printf '%-14s %12s %12s %s\n' "$kind" "$per" "$b" "$verdict"
    [[ $verdict == *FAIL* ]] && fail=1
done
if [[ $UPDATE == 1 ]]; then
    {
        if [[ -e $BASELINE ]]; then sed -n '/^#/p' "$BASELINE"; fi
        for kind in "${KINDS[@]}"; do echo "$kind ${COUNT[$kind]}"; done
    } >"$W/baseline.new"
    mv "$W/baseline.new" "$BASELINE"
    log "wrote $BASELINE"
    exit 0
fi
log "done in $(($(date +%s) - T0))s"
exit "$fail"
