#!/usr/bin/env bash
# benches/callgrind.sh: instructions per cached manifest GET (and HEAD) by tag, counted by callgrind.
#
# A wall-clock req/s figure on a shared 2-core machine moves by tens of percent with other load; an
# instruction count does not. For each method it:
#   1. starts Debian's `docker-registry` as the upstream (plain HTTP, filesystem storage, 127.0.0.1) and seeds
#      it through the registry API with a small config blob, a small layer and an OCI manifest tagged $TAG;
#   2. runs `cachalot serve` under `valgrind --tool=callgrind`, with one default [[upstream]] = that registry
#      and tag_ttl = "1h", so every request below is a cache hit that never reaches the upstream;
#   3. warms the manifest (WARM GETs and HEADs, one connection), then sends N requests for it by tag on one
#      keep-alive connection (one curl invocation), checks they all answered 200 over one connection, and
#      stops cachalot with SIGTERM so callgrind writes its totals;
# once with N = N1 and once with N = N2, and reports (Ir(N2) - Ir(N1)) / (N2 - N1): the instructions per
# request, with startup, warm-up and shutdown cancelled out. Readiness is polled in /proc/net/tcp, not with
# HTTP requests, so both runs serve exactly the same requests apart from the N.
# Then it prints callgrind_annotate's hottest functions (inclusive, then self) of each N2 run, which include
# startup, and (with python3) the same difference per function: where the instructions of one request go.
#
# Usage:  benches/callgrind.sh                       # builds cachalot (cargo build --release) first
#         CACHALOT_BIN=path/to/cachalot benches/callgrind.sh
# Knobs (env): N1=200 N2=1200 METHODS="GET HEAD" WARM=20 REPS=1 (runs per N; the median per-request figure
#              is reported) TOP=30 (functions shown; 0: none) WIDTH=200 (profile line width)
#              CACHALOT_LOG=warn (RUST_LOG for cachalot, as benches/compare.sh; `info`, the default level, adds
#              the per-request log line, written to a file) KEEP=0 (1: keep the temp dir and callgrind files)
# Needs: valgrind (callgrind_annotate), docker-registry, curl, awk, openssl or sha256sum; python3 for the
#        per-request profile. About 20 s per cachalot run (4 runs with the defaults).
# Output: one line per method, `GET : <Ir> instructions per request (...)`, then the profiles.
# The count is of instructions in user space (callgrind sees no kernel work), and a `rep movsb` counts once per
# byte, so large memcpys weigh more here than on the CPU.
set -Eeuo pipefail
umask 022

N1=${N1:-200}
N2=${N2:-1200}
METHODS=${METHODS:-GET HEAD}
WARM=${WARM:-20}
REPS=${REPS:-1}
TOP=${TOP:-30}
CACHALOT_LOG=${CACHALOT_LOG:-warn}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
ACCEPT="$MT_MANIFEST"

need curl; need awk; need valgrind; need callgrind_annotate valgrind; need docker-registry
command -v openssl >/dev/null || need sha256sum coreutils
((N2 > N1 && N1 >= 0)) || die "need N2 > N1 >= 0"

# ---------------------------------------------------------------- build / locate cachalot
locate_cachalot

W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-callgrind.XXXXXX")
mkdir -p "$W/logs" "$W/data" "$W/upstream" "$W/cg"
# A private copy: another build into the same target dir cannot swap the binary under the run.
cp "$BIN" "$W/cachalot" && BIN_SRC=$BIN && BIN=$W/cachalot
log "work dir $W; cachalot $BIN_SRC; $(valgrind --version)"

# ---------------------------------------------------------------- upstream registry
UP_PORT=$(free_port)
upstream_config "$W/upstream.yml" "$UP_PORT" "$W/upstream" 0
docker-registry serve "$W/upstream.yml" >"$W/logs/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_listen upstream "$UP_PID" "$UP_PORT" 15 || die "the upstream did not start"
UP=http://127.0.0.1:$UP_PORT
[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$UP/v2/") == 200 ]] || die "upstream /v2/ is not 200"

head -c 4096 /dev/urandom >"$W/data/layer.bin"
LAYER=sha256:$(sha256_of "$W/data/layer.bin")
push_blob "$W/data/layer.bin" "$LAYER"
seed_image "$LAYER" 4096
log "upstream docker-registry on $UP (pid $UP_PID), seeded with $REPO:$TAG = $MANIFEST ($MANIFEST_BYTES bytes)"

# ---------------------------------------------------------------- one measured run
# requests CA METHOD N: N requests for the manifest by tag on one connection; checks every answer.
requests() {
    local ca=$1 method=$2 n=$3 cfg=$W/curl.cfg out bad conns
    ((n > 0)) || return 0
    : >"$cfg"
    for _ in $(seq "$n"); do printf 'url = "%s/v2/%s/manifests/%s"\noutput = "/dev/null"\n' "$ca" "$REPO" "$TAG" >>"$cfg"; done
    local head=()
    [[ $method == HEAD ]] && head=(-I)
    out=$(curl -s "${head[@]}" --max-time 600 -H "Accept: $ACCEPT" -K "$cfg" \
        -w '%{http_code} %{num_connects} %{size_download}\n') || { log "curl failed"; return 1; }
    # Every answer 200; one connection for all of them; GET bodies the manifest's size.
    local get=0
    [[ $method == GET ]] && get=1
    bad=$(awk -v get="$get" -v sz="$MANIFEST_BYTES" \
        '$1 != 200 || (get && $3 != sz) { b++ } END { print b + 0 }' <<<"$out")
    conns=$(awk '{ c += $2 } END { print c + 0 }' <<<"$out")
    [[ $(wc -l <<<"$out") == "$n" && $bad == 0 ]] || { log "$method x$n: $bad bad answers: $(sort <<<"$out" | uniq -c | head -3)"; return 1; }
    ((conns <= 1)) || log "warning: $method x$n used $conns connections (wanted 1): curl did not keep the connection alive"
}

# run METHOD N REP: a fresh cachalot under callgrind; sets RUN_IR to its total Ir.
RUN_IR=""
run() {
    local method=$1 n=$2 rep=$3 port pid out dir
    port=$(free_port)
    dir=$W/cache-$method-$n-$rep
    out=$W/cg/callgrind.$method.$n.$rep.out
    cachalot_config "$W/cachalot.toml" "$port" "$dir"
    RUST_LOG=$CACHALOT_LOG valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN" serve --config "$W/cachalot.toml" >"$W/logs/cachalot-$method-$n-$rep.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_listen cachalot "$pid" "$port" 120 || { tail -n 20 "$W/logs/cachalot-$method-$n-$rep.log" >&2; return 1; }
    local ca=http://127.0.0.1:$port
    # Warm: the first GET fills the cache from the upstream; the rest settle lazily built state.
    requests "$ca" GET "$WARM" || return 1
    requests "$ca" HEAD "$WARM" || return 1
    requests "$ca" "$method" "$n" || return 1
    stop "$pid"
    [[ -s $out ]] || { log "callgrind wrote no $out"; tail -n 20 "$W/logs/cachalot-$method-$n-$rep.log" >&2; return 1; }
    RUN_IR=$(awk '/^(summary|totals):/ { print $2; exit }' "$out")
    [[ $RUN_IR =~ ^[0-9]+$ ]] || { log "no total in $out"; return 1; }
}

# ---------------------------------------------------------------- measure
declare -A RESULT
for method in $METHODS; do
    [[ $method == GET || $method == HEAD ]] || die "METHODS: GET and/or HEAD, not $method"
    per=()
    for rep in $(seq "$REPS"); do
        run "$method" "$N1" "$rep" || die "run $method x$N1 failed"
        i1=$RUN_IR
        run "$method" "$N2" "$rep" || die "run $method x$N2 failed"
        i2=$RUN_IR
        p=$(awk -v a="$i1" -v b="$i2" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }')
        log "$method rep $rep: Ir($N1) = $i1, Ir($N2) = $i2 -> $p per request"
        per+=("$p")
    done
    RESULT[$method]=$(printf '%s\n' "${per[@]}" | median)
    RESULT[$method.all]="${per[*]}"
done

echo
echo "cachalot $BIN_SRC, RUST_LOG=$CACHALOT_LOG, manifest by tag (cached, tag_ttl 1h), one keep-alive connection"
for method in $METHODS; do
    printf '%-4s: %s instructions per request (median of %s: %s; N = %s and %s)\n' \
        "$method" "${RESULT[$method]}" "$REPS" "${RESULT[$method.all]}" "$N1" "$N2"
done

# tidy: shorten callgrind_annotate's file:function lines (registry and toolchain paths, the binary's path).
tidy() {
    sed -E -e 's|/root/\.cargo/registry/src/[^/]*/||; s|/rustc/[0-9a-f]+/||; s| \[[^]]*\]$||' \
        -e "s|$ROOT/||" | cut -c1-"${WIDTH:-200}"
}
# top FILE INCLUSIVE: the TOP heaviest functions of a callgrind file, as callgrind_annotate lists them.
top() {
    callgrind_annotate --inclusive="$2" "$1" 2>/dev/null |
        awk -v top="$TOP" '/^ *[0-9,]+ +\(/ && !/PROGRAM TOTALS/ && shown < top { print; shown++ }' | tidy
}

if ((TOP > 0)); then
    for method in $METHODS; do
        f=$W/cg/callgrind.$method.$N2.1.out
        [[ -s $f ]] || continue
        echo
        echo "=== $method x$N2, whole run (startup, warm-up and shutdown included): top $TOP by inclusive Ir"
        top "$f" yes
        echo
        echo "=== $method x$N2, whole run: top $TOP by self Ir"
        top "$f" no
    done
    # Per request: the difference of the two runs by function, divided by N2 - N1 (python3 only).
    if command -v python3 >/dev/null; then
        for method in $METHODS; do
            a=$W/cg/callgrind.$method.$N1.1.out b=$W/cg/callgrind.$method.$N2.1.out
            [[ -s $a && -s $b ]] || continue
            echo
            echo "=== $method, per request: (Ir in the x$N2 run - Ir in the x$N1 run) / $((N2 - N1)), by function"
            python3 - "$a" "$b" $((N2 - N1)) "$TOP" <<'PY' | tidy
import collections, re, sys

def parse(path):
    """Self cost per function and inclusive cost per call arc, from a callgrind out file."""
    names, self_ir, arcs = {}, collections.Counter(), collections.Counter()
    fn = cfn = None
    in_call = False
    def name(spec):
        m = re.match(r"\((\d+)\)(?: (.*))?", spec)
        if not m:
            return spec
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))
    for line in open(path, errors="replace"):
        if line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            ir = int(parts[1]) if len(parts) > 1 else 0
            if in_call:
                arcs[(fn, cfn)] += ir
                in_call = False
            else:
                self_ir[fn] += ir
        elif line.startswith("fn="):
            fn = name(line[3:].strip())
        elif line.startswith("cfn="):
            cfn = name(line[4:].strip())
        elif line.startswith("calls="):
            in_call = True
    incl = collections.Counter(self_ir)
    for (caller, callee), ir in arcs.items():
        if caller != callee:
            incl[caller] += ir
    return self_ir, incl

a, b, n, top = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
(sa, ia), (sb, ib) = parse(a), parse(b)
total = (sum(sb.values()) - sum(sa.values())) / n
for title, x, y in (("self", sa, sb), ("inclusive, without the frames above 90% (threads, runtime)", ia, ib)):
    print(f"--- {title}")
    d = {k: (y[k] - x[k]) / n for k in set(x) | set(y)}
    rows = [kv for kv in sorted(d.items(), key=lambda kv: -kv[1]) if kv[1] <= 0.9 * total]
    for k, v in rows[:top]:
        print(f"{v:10.0f}  {k}")
PY
        done
    fi
fi
log "done in $(($(date +%s) - T0))s"
