#!/usr/bin/env bash
# benches/load.sh: many clients at once (issue 21). cachalot and nginx side by side, in alternating rounds, at
# 100, 1,000, 5,000 and 10,000 connections (wrk -t2, keep-alive), on a cached blob (BLOB_KIB, 1 MiB) and on a
# manifest by tag. cachalot runs twice: with its per-request log line (RUST_LOG=info, the default; the log goes
# to a file) and without it (RUST_LOG=warn). nginx serves the same files with sendfile, 2 workers, access log
# off. Reports per server and level: requests/s (median of ROUNDS), p50 and p99 latency (of the median round),
# errors (non-2xx answers and socket errors over all rounds; cachalot's by status, from its own metrics), the
# server's CPU time per request (user + system over all rounds, all its processes), and peak RSS (VmHWM; every server is restarted for each target and level; nginx: the sum over its processes). Both cachalots set
# server.max_connections = MAX_CONNECTIONS explicitly, as a fleet-sized deployment would.
#
# Usage:  benches/load.sh                       # builds cachalot (cargo build --release) first
#         CACHALOT_BIN=path/to/cachalot benches/load.sh
# Knobs (env): LEVELS="100 1000 5000 10000" TARGETS="blob manifest" ROUNDS=3 DURATION=5s BLOB_KIB=1024
#              MAX_CONNECTIONS=20000 KEEP=0
# Needs: docker-registry, nginx, wrk, curl, awk, sha256sum; an open-file hard limit above 2 x the top level.
set -Eeuo pipefail
umask 022
LEVELS=${LEVELS:-100 1000 5000 10000}
TARGETS=${TARGETS:-blob manifest}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
BLOB_KIB=${BLOB_KIB:-1024}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-20000}
KEEP=${KEEP:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need curl; need awk; need wrk; need nginx; need docker-registry; need sha256sum coreutils
# wrk and every server started here inherit it: each connection is a descriptor on both sides.
ulimit -n "$(ulimit -Hn)"
top=0; for l in $LEVELS; do ((l > top)) && top=$l; done
(($(ulimit -n) > 2 * top + 512)) || die "open-file limit $(ulimit -n) is too low for $top connections"
locate_cachalot
W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-load.XXXXXX")
chmod 755 "$W" # nginx workers run as nobody when started as root
mkdir -p "$W/data" "$W/logs"
log "host: load average $(cut -d' ' -f1 /proc/loadavg), $(nproc) cores, sha_ni: $(grep -c sha_ni /proc/cpuinfo || true) cpus, open files $(ulimit -n)"

serve_upstream
head -c $((BLOB_KIB * 1024)) /dev/urandom >"$W/data/blob"
LAYER=sha256:$(sha256_of "$W/data/blob")
push_blob "$W/data/blob" "$LAYER"
seed_image "$LAYER" $((BLOB_KIB * 1024))

# Two cachalots, the per-request log line on and off. Every server is started afresh for each target and
# level (caches kept), so that a level's peak RSS is its own: freed memory is not always returned to the
# system, and a level would otherwise inherit the one before.
declare -A PORT PIDOF
start_cachalot() {
    local name=$1 level=info
    [[ -n ${PORT[$name]:-} ]] || PORT[$name]=$(free_port)
    cachalot_config "$W/$name.toml" "${PORT[$name]}" "$W/cache-$name" "max_connections = $MAX_CONNECTIONS"
    [[ $name == cachalot-quiet ]] && level=warn
    RUST_LOG=$level "$BIN" serve --config "$W/$name.toml" >>"$W/logs/$name.log" 2>&1 &
    PIDOF[$name]=$!; PIDS+=("$!")
    wait_listen "$name" "${PIDOF[$name]}" "${PORT[$name]}" 15 || die "$name did not start"
    base=http://127.0.0.1:${PORT[$name]}
    [[ $(http_code "$base/v2/$REPO/manifests/$TAG") == 200 ]] || die "$name: manifest warm-up failed"
    [[ $(http_code "$base/v2/$REPO/blobs/$LAYER") == 200 ]] || die "$name: blob warm-up failed"
}

# nginx: the same two files, 2 workers (one per core), enough connections for the top level.
mkdir -p "$W/www/v2/$REPO/blobs" "$W/www/v2/$REPO/manifests"
cp "$W/data/blob" "$W/www/v2/$REPO/blobs/$LAYER"
cp "$W/data/manifest.json" "$W/www/v2/$REPO/manifests/$TAG"
chmod -R a+rX "$W/www"
PORT[nginx]=$(free_port)
NGINX_MAIN="worker_processes 2; worker_rlimit_nofile $((2 * top + 1024));" NGINX_CONNECTIONS=$((top + 512)) \
    NGINX_LISTEN="backlog=65535" nginx_config "${PORT[nginx]}" "$W/www" \
    "location /v2/$REPO/manifests/ { default_type $MT_MANIFEST; }"
start_nginx() {
    run_nginx; PIDOF[nginx]=$NG_PID; PIDS+=("$NG_PID")
    wait_listen nginx "$NG_PID" "${PORT[nginx]}" 15 || die "nginx did not start"
}
SERVERS=(cachalot-log cachalot-quiet nginx)
start_all() {
    start_cachalot cachalot-log; start_cachalot cachalot-quiet; start_nginx
    sleep 1 # the first run's commits
}
stop_all() { for s in "${SERVERS[@]}"; do stop "${PIDOF[$s]}"; done; }

# server_pids NAME: the server's processes (nginx: master and workers).
server_pids() {
    local p=${PIDOF[$1]}
    echo "$p $(pgrep -P "$p" | tr '\n' ' ')"
}
# reset_peak NAME: start VmHWM over (clear_refs 5).
reset_peak() { for p in $(server_pids "$1"); do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }
# peak_mib NAME: the sum of VmHWM over the server's processes, MiB.
# cpu_ticks NAME: user + system CPU time of the server's processes so far, in clock ticks.
cpu_ticks() {
    local p t=0 v
    for p in $(server_pids "$1"); do
        v=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
peak_mib() {
    local p kb=0 v
    for p in $(server_pids "$1"); do
        v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
        kb=$((kb + ${v:-0}))
    done
    calc "$kb / 1024"
}
# statuses NAME: cachalot's answers so far by status, "200=N 503=M ...", from its metrics.
statuses() {
    [[ $1 == nginx ]] && return 0
    curl -s "http://127.0.0.1:${PORT[$1]}/metrics" | awk '
        /^cachalot_requests_total\{/ { if (match($0, /code="[0-9]+"/)) { c = substr($0, RSTART + 6, 3); n[c] += $NF } }
        END { for (c in n) printf "%s=%d ", c, n[c] }'
}
# status_diff BEFORE AFTER: the answers between two `statuses`, "200=N 503=M".
status_diff() {
    awk -v a="$1" -v b="$2" 'BEGIN { n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); o[kv[1]] = kv[2] }
        n = split(b, y, " "); for (i = 1; i <= n; i++) { split(y[i], kv, "="); d = kv[2] - o[kv[1]]; if (d) printf "%s%s=%d", sep, kv[1], d; sep = " " } }'
}
# to_ms VALUE: wrk's latency (e.g. 812.00us, 3.21ms, 1.02s) in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN { u = v; sub(/[0-9.]+/, "", u); x = v + 0
        if (u == "us") x /= 1000; else if (u == "s") x *= 1000; else if (u == "m") x *= 60000
        printf "%.2f", x }'
}

declare -A RPS P50 P99 ERR PEAK CPU
TICK=$(getconf CLK_TCK)
for target in $TARGETS; do
    case $target in
        blob) path=/v2/$REPO/blobs/$LAYER ;;
        manifest) path=/v2/$REPO/manifests/$TAG ;;
        *) die "TARGETS: unknown target $target (blob, manifest)" ;;
    esac
    for c in $LEVELS; do
        log "$target, $c connections: $ROUNDS rounds of wrk -t2 -c$c -d$DURATION, servers interleaved"
        start_all
        declare -A before=()
        for s in "${SERVERS[@]}"; do reset_peak "$s"; before[$s]=$(statuses "$s"); done
        declare -A runs=() errs=() ticks=() reqs=()
        for r in $(seq "$ROUNDS"); do
            # Rotate the order, so no server always runs first (or last) in a round.
            for i in $(seq 0 $((${#SERVERS[@]} - 1))); do
                s=${SERVERS[$(((i + r) % ${#SERVERS[@]}))]}
                t0=$(cpu_ticks "$s")
                out=$(wrk -t2 -c"$c" -d"$DURATION" --timeout 10s --latency \
                    -H "Accept: $MT_MANIFEST" "http://127.0.0.1:${PORT[$s]}$path" 2>&1) || true
                printf '== %s %s c%s round %s\n%s\n' "$s" "$target" "$c" "$r" "$out" >>"$W/logs/wrk.log"
                rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
                p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
                p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
                non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' <<<"$out")
                sock=$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' <<<"$out")
                runs[$s]+="${rps:-0} $(to_ms "${p50:-0}") $(to_ms "${p99:-0}")"$'\n'
                errs[$s]=$((${errs[$s]:-0} + ${non2xx:-0} + ${sock:-0}))
                ticks[$s]=$((${ticks[$s]:-0} + $(cpu_ticks "$s") - t0))
                reqs[$s]=$((${reqs[$s]:-0} + $(awk '/requests in/ { print $1 }' <<<"$out")))
                log "  $s round $r: ${rps:-?} req/s, p50 ${p50:-?}, p99 ${p99:-?}, non-2xx ${non2xx:-0}, socket errors ${sock:-0}"
            done
        done
        for s in "${SERVERS[@]}"; do
            k=$target,$c,$s
            # The median round by requests/s, and its latencies.
            read -r RPS[$k] P50[$k] P99[$k] < <(printf '%s' "${runs[$s]}" | sort -g | awk '{ l[NR] = $0 } END { print l[int((NR + 1) / 2)] }')
            ERR[$k]="${errs[$s]}"
            [[ $s != nginx ]] && ERR[$k]+=" ($(status_diff "${before[$s]}" "$(statuses "$s")"))"
            PEAK[$k]=$(peak_mib "$s")
            # The server's CPU time per request over all rounds: steadier than req/s when other
            # work shares the machine.
            CPU[$k]=$(calc "${ticks[$s]} * 1000000 / $TICK / (${reqs[$s]} + 0.000001)")
        done
        stop_all
        unset before runs errs ticks reqs
    done
done

echo
echo "cachalot load benchmark: wrk -t2 -d$DURATION, median of $ROUNDS rounds; blob ${BLOB_KIB} KiB; $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg) at end"
printf '%-9s %6s  %-15s %10s %8s %9s %9s %9s %10s  %s\n' target conns server "req/s" "vs nginx" "p50 ms" "p99 ms" "peak MiB" "CPU us/req" "errors (non-2xx + socket)"
for target in $TARGETS; do
    for c in $LEVELS; do
        for s in "${SERVERS[@]}"; do
            k=$target,$c,$s; n=$target,$c,nginx
            printf '%-9s %6s  %-15s %10s %7sx %9s %9s %9s %10s  %s\n' "$target" "$c" "$s" "${RPS[$k]}" \
                "$(calc "${RPS[$k]} / (${RPS[$n]} + 0.000001)")" "${P50[$k]}" "${P99[$k]}" "${PEAK[$k]}" "${CPU[$k]}" "${ERR[$k]}"
        done
    done
done
