#!/usr/bin/env bash
# benches/compare.sh: side-by-side benchmark of cachalot (issues 2 and 6, "Performance").
#
# In one run it starts, all on loopback and all in front of the same upstream:
#   upstream  Debian's `docker-registry` (plain HTTP, no auth, filesystem storage), seeded by this script
#             with a random BLOB_MIB blob, a small config and an OCI image manifest tagged $TAG;
#   limit     nginx (sendfile on) serving the same blob file and the manifest as static files (and over TLS);
#   peer      `docker-registry` in proxy mode (proxy.remoteurl = the upstream);
#   subject   `cachalot serve --config FILE` (one default [[upstream]] = the upstream), and a second cachalot
#             serving HTTPS (rustls) for the TLS figure.
# and measures (every figure the median of several rounds, servers interleaved):
#   1. a cached blob, 1 stream and $STREAMS concurrent streams (total bytes / wall time): cachalot vs nginx
#      (target >= 0.9x), the peer for information; then the same over TLS, cachalot (rustls) vs nginx (OpenSSL), target >= 0.9x;
#   2. manifest GET and HEAD by tag, cached, with wrk: cachalot vs nginx's static file (target >= 0.5x) and vs the
#      peer (target >= 50x);
#   3. a cold blob (empty cache): cachalot's time vs a GET straight from the upstream (target <= 1.5x on loopback,
#      where client, upstream and cachalot share the cores); the CPU seconds per cold GiB of cachalot and of the
#      peer beside what `openssl dgst -sha256` needs to hash a GiB (target <= 2x), and beside what `dd` needs to
#      write a GiB into new files (the page-cache floor, which a VM's memory backing can make dear); and, with SHAPED=1, the same
#      cold GET with the upstream's side of loopback shaped to SHAPED_RATE by a tc htb class (target <= 1.05x);
#   4. $HERD concurrent cold GETs of one fresh blob: GETs the upstream received (cachalot 1, the peer ~$HERD), and
#      the time until the last client finishes vs one cold GET of a blob of the same size (target <= 1.2x);
#   5. cachalot's RSS: idle after start (target <= 16 MiB), peak while serving $STREAMS and $RSS_STREAMS
#      concurrent streams (target <= 64 MiB).
# and prints a table. Every process it starts is stopped on exit and the temp dir is removed (KEEP=1 keeps it).
#
# Usage:  benches/compare.sh                      # builds cachalot (cargo build --release) first
#         CACHALOT_BIN=path/to/cachalot benches/compare.sh
# Knobs (env): BLOB_MIB=256 STREAMS=16 RSS_STREAMS=64 DURATION=4s (wrk) CONNS=64 (wrk) ROUNDS=5 (rounds of the
#              blob and wrk figures, median) ONE_STREAM_ROUNDS=15 (rounds of the 1-stream figure, which is cheap
#              and the noisiest) ONE_STREAM_GETS=4 (the 1-stream figure fetches the blob that many times
#              in a row on one connection) COLD_REPS=5 (cold blobs, median) HERD=50 HERD_MIB=64 HERD_REPS=5
#              TLS=1 (0: skip the TLS figure) KEEP=0 STRICT=0 (exit 1 if a target fails)
#              SHAPED=1 (0: skip the shaped-link cold figure; it needs root and tc) SHAPED_RATE=1gbit SHAPED_REPS=3
#              CACHALOT_LOG=warn (RUST_LOG for cachalot) PERF=0 (1: perf profile of cachalot, hottest symbols)
#              RECYCLE=0 (1: figure 3 writes and deletes a blob's worth of zeros before each cold GET and each
#              dd, so fills and dd get pages the guest just freed, as benches/cold_ab.sh's RECYCLE does; on
#              a VM that hands free memory back to its host, fresh pages cost a host fault each)
# Needs: docker-registry, nginx, wrk, ab (apache2-utils), curl, awk, openssl (sha256sum will do when TLS=0).
# Exit status: 0 when every stage ran (targets missed are reported, and fail the run only with STRICT=1).
set -Eeuo pipefail
umask 022

BLOB_MIB=${BLOB_MIB:-256}
STREAMS=${STREAMS:-16}
RSS_STREAMS=${RSS_STREAMS:-64}
DURATION=${DURATION:-4s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-5}
ONE_STREAM_ROUNDS=${ONE_STREAM_ROUNDS:-15}
ONE_STREAM_GETS=${ONE_STREAM_GETS:-4}
COLD_REPS=${COLD_REPS:-5}
RECYCLE=${RECYCLE:-0}
HERD=${HERD:-50}
HERD_MIB=${HERD_MIB:-64}
HERD_REPS=${HERD_REPS:-5}
TLS=${TLS:-1}
SHAPED=${SHAPED:-1}
SHAPED_RATE=${SHAPED_RATE:-1gbit}
SHAPED_REPS=${SHAPED_REPS:-3}
declare -A R # the figures, by key
STRICT=${STRICT:-0}
CACHALOT_LOG=${CACHALOT_LOG:-warn}
PERF=${PERF:-0}
BLOB_BYTES=$((BLOB_MIB * 1048576))
HERD_BYTES=$((HERD_MIB * 1048576))

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
ACCEPT="$MT_MANIFEST, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"

need curl; need awk; need wrk; need ab apache2-utils; need nginx; need docker-registry
command -v openssl >/dev/null || need sha256sum coreutils
if [[ $TLS == 1 ]]; then need openssl; fi
if [[ $SHAPED == 1 ]] && { [[ $(id -u) != 0 ]] || ! command -v tc >/dev/null; }; then
    echo "SHAPED=1 needs root and tc (iproute2); the shaped-link figure is skipped" >&2
    SHAPED=0
fi

# shape_on PORT / shape_off: an htb class of SHAPED_RATE on lo for the packets whose source port is PORT (what
# the upstream sends), so every client of the upstream (a direct GET, a cache's fill) pulls through the same
# narrow link; other loopback traffic is not classified and passes unshaped. Removed on exit whatever happens.
SHAPING=0
shape_on() {
    tc qdisc add dev lo root handle 1: htb || return 1
    SHAPING=1
    tc class add dev lo parent 1: classid 1:1 htb rate "$SHAPED_RATE" ceil "$SHAPED_RATE" &&
        tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "$1" 0xffff flowid 1:1
}
shape_off() {
    ((SHAPING)) || return 0
    tc qdisc del dev lo root 2>/dev/null || true
    SHAPING=0
}
# set +e: under errexit the (exit $rc) that hands cleanup the status would end the trap before it.
trap 'rc=$?; set +e; shape_off; (exit $rc); cleanup' EXIT

# ---------------------------------------------------------------- processes
FAILED_STAGES=()
declare -A PID_OF
# launch NAME PORTVAR PIDVAR PATH [SCHEME]: run start_NAME and wait until PATH answers; if the port was taken in
# the meantime (the server says "address already in use"), retry on another port, at most 3 times.
launch() {
    local name=$1 portvar=$2 pidvar=$3 path=$4 scheme=${5:-http} pid
    for _ in 1 2 3; do
        "start_$name"
        pid=${!pidvar}
        PIDS+=("$pid"); PID_OF[$name]=$pid
        wait_http "$name" "$pid" "$scheme://127.0.0.1:${!portvar}$path" && return 0
        kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
        grep -qi 'address already in use' "$W/logs/$name.log" || return 1
        printf -v "$portvar" '%s' "$(free_port)"
        log "$name: its port was taken meanwhile; retrying on port ${!portvar}"
    done
    return 1
}

# wait_http NAME PID URL: wait until URL answers (any HTTP status) while PID lives.
wait_http() {
    local name=$1 pid=$2 url=$3 code
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { log "$name exited during startup:"; tail -n 20 "$W/logs/$name.log" >&2; return 1; }
        code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        [[ $code != 000 ]] && return 0
        sleep 0.1
    done
    log "$name did not answer on $url within 15s"
    return 1
}


# ---------------------------------------------------------------- build / locate cachalot
locate_cachalot

W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-bench.XXXXXX")
chmod 755 "$W" # nginx workers run as nobody when started as root
mkdir -p "$W/logs" "$W/data" "$W/www" "$W/upstream" "$W/peer" "$W/cachalot-cache"
# A private copy: another build into the same target dir cannot swap the binary under the run.
cp "$BIN" "$W/cachalot" && BIN_SRC=$BIN && BIN=$W/cachalot
log "work dir $W; cachalot $BIN_SRC"
LOAD0=$(cut -d' ' -f1 /proc/loadavg)
# steal_ticks: "steal total" jiffies of all CPUs so far. On a shared VM the host takes CPU time away from this
# machine (steal), which is most of the round-to-round noise; the table reports its share over the run.
steal_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t }' /proc/stat; }
STEAL0=$(steal_ticks)
log "host: load average $LOAD0, $(nproc) cores, $(awk '/MemTotal/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo) RAM, kernel $(uname -r)"

UP_PORT=$(free_port); NG_PORT=$(free_port); PEER_PORT=$(free_port); CA_PORT=$(free_port)
NGS_PORT=$(free_port); CAS_PORT=$(free_port)

# ---------------------------------------------------------------- upstream registry
# Access log (Combined format) goes to stdout: one line per request, written when the response completes.
start_upstream() {
upstream_config "$W/upstream.yml" "$UP_PORT" "$W/upstream" 1
docker-registry serve "$W/upstream.yml" >"$W/logs/upstream-access.log" 2>"$W/logs/upstream.log" &
UP_PID=$!
}
launch upstream UP_PORT UP_PID /v2/ || die "the upstream did not start"
UP=http://127.0.0.1:$UP_PORT
[[ $(http_code "$UP/v2/") == 200 ]] || die "upstream /v2/ is not 200"
log "upstream docker-registry on $UP (pid $UP_PID)"

# new_blob NAME MIB: random file, pushed; sets BLOB_FILE and BLOB_DIGEST. HASH_SECS: hashing time.
new_blob() {
    local name=$1 mib=$2 t
    BLOB_FILE=$W/data/$name
    head -c $((mib * 1048576)) /dev/urandom >"$BLOB_FILE"
    t=$(now)
    BLOB_DIGEST=sha256:$(sha256_of "$BLOB_FILE")
    HASH_SECS=$(calc "$(now) - $t")
    push_blob "$BLOB_FILE" "$BLOB_DIGEST"
}

# prep_blob NAME MIB: a fresh blob cheaply: the main blob's first bytes, then 64 random ones (urandom when larger),
# written and hashed in one pass; the digest goes to NAME.digest. Run in the background while another pushes.
prep_blob() {
    local f=$W/data/$1 bytes=$(($2 * 1048576))
    if ((bytes <= BLOB_BYTES && bytes > 64)); then
        { head -c $((bytes - 64)) "$MAIN_FILE"; head -c 64 /dev/urandom; } | tee "$f" | sha256_of >"$f.digest"
    else
        head -c "$bytes" /dev/urandom | tee "$f" | sha256_of >"$f.digest"
    fi
}

log "seeding the upstream: ${BLOB_MIB} MiB blob, config, manifest $REPO:$TAG"
new_blob main.bin "$BLOB_MIB"
MAIN_FILE=$BLOB_FILE; MAIN=$BLOB_DIGEST
HASH0_SECS=$HASH_SECS
log "sha256 of ${BLOB_MIB} MiB took ${HASH_SECS}s here: $(calc "$BLOB_MIB / $HASH_SECS") MiB/s on one core (a lower bound for any verifying cache fill)"
seed_image "$MAIN" "$BLOB_BYTES"

# Fresh blobs for the cold figures, one per measurement so that no cache has seen them: the next one is
# prepared while the current one is pushed.
EXTRA=(); EXTRA_MIB=()
for r in $(seq "$COLD_REPS"); do EXTRA+=("cold-c$r" "cold-p$r"); EXTRA_MIB+=("$BLOB_MIB" "$BLOB_MIB"); done
if [[ $SHAPED == 1 ]]; then
    for r in $(seq "$SHAPED_REPS"); do EXTRA+=("shaped-$r"); EXTRA_MIB+=("$BLOB_MIB"); done
fi
for r in $(seq "$HERD_REPS"); do EXTRA+=("herd-c$r" "herd-s$r"); EXTRA_MIB+=("$HERD_MIB" "$HERD_MIB"); done
EXTRA+=(herd-p); EXTRA_MIB+=("$HERD_MIB")
declare -A DIGEST_OF
prep_blob "${EXTRA[0]}" "${EXTRA_MIB[0]}"
for i in "${!EXTRA[@]}"; do
    prep_pid=""
    if ((i + 1 < ${#EXTRA[@]})); then prep_blob "${EXTRA[i + 1]}" "${EXTRA_MIB[i + 1]}" & prep_pid=$!; fi
    f=$W/data/${EXTRA[i]}
    d=sha256:$(cat "$f.digest")
    [[ $d =~ ^sha256:[0-9a-f]{64}$ ]] || die "could not prepare blob ${EXTRA[i]}"
    push_blob "$f" "$d"
    DIGEST_OF[${EXTRA[i]}]=$d
    rm -f "$f" "$f.digest"
    if [[ -n $prep_pid ]]; then wait "$prep_pid" || die "could not prepare blob ${EXTRA[i + 1]}"; fi
done
COLD_C=(); COLD_P=()
for r in $(seq "$COLD_REPS"); do COLD_C+=("${DIGEST_OF[cold-c$r]}"); COLD_P+=("${DIGEST_OF[cold-p$r]}"); done
HERD_C=(); HERD_S=()
for r in $(seq "$HERD_REPS"); do HERD_C+=("${DIGEST_OF[herd-c$r]}"); HERD_S+=("${DIGEST_OF[herd-s$r]}"); done
HERD_P=${DIGEST_OF[herd-p]}
SHAPED_D=()
if [[ $SHAPED == 1 ]]; then for r in $(seq "$SHAPED_REPS"); do SHAPED_D+=("${DIGEST_OF[shaped-$r]}"); done; fi

# The CPU that hashing a GiB takes here: `openssl dgst -sha256` of the main blob (in the page cache), the
# median of 3, in CPU seconds (user + system) per GiB: what any verifying fill must spend at least.
OSSL=()
TIMEFORMAT='%U %S'
for _ in 1 2 3; do
    read -r u sy < <({ time openssl dgst -sha256 "$MAIN_FILE" >/dev/null; } 2>&1)
    OSSL+=("$(calc "($u + $sy) * 1024 / $BLOB_MIB")")
done
unset TIMEFORMAT
R[openssl_cpu_gib]=$(printf '%s\n' "${OSSL[@]}" | median)
log "openssl dgst -sha256: ${OSSL[*]} CPU s per GiB -> median ${R[openssl_cpu_gib]}"
log "upstream seeded: blob $MAIN, manifest $MANIFEST, $((2 * COLD_REPS)) cold blobs, $((2 * HERD_REPS + 1)) herd blobs"

# ---------------------------------------------------------------- TLS certificate (nginx and cachalot alike)
NG_TLS_BLOCK=""
if [[ $TLS == 1 ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -keyout "$W/tls.key" -out "$W/tls.crt" >"$W/logs/openssl.log" 2>&1 ||
        die "openssl could not make a certificate"
    chmod a+r "$W/tls.key"
    # http2 as cachalot offers it by ALPN: curl (like Docker's and containerd's Go client) then speaks
    # HTTP/2 to both, and the figure compares like with like (benches/tls_ab.sh has HTTP/1.1 as well).
    NG_TLS_BLOCK="server { listen 127.0.0.1:$NGS_PORT ssl http2; ssl_certificate $W/tls.crt; ssl_certificate_key $W/tls.key; root $W/www; }"
fi

# ---------------------------------------------------------------- nginx (the limit)
mkdir -p "$W/www/v2/$REPO/blobs" "$W/www/v2/$REPO/manifests"
ln "$MAIN_FILE" "$W/www/v2/$REPO/blobs/$MAIN" 2>/dev/null || cp "$MAIN_FILE" "$W/www/v2/$REPO/blobs/$MAIN"
cp "$W/data/manifest.json" "$W/www/v2/$REPO/manifests/$TAG"
# A HERD_MIB file, for the floor of figure 4: HERD clients fetching a file nginx already has.
head -c "$HERD_BYTES" "$MAIN_FILE" >"$W/www/herd.bin"
chmod -R a+rX "$W/www" "$W/data"
start_nginx() {
    nginx_config "$NG_PORT" "$W/www" "add_header Docker-Distribution-API-Version registry/2.0 always;
        location /v2/$REPO/manifests/ { default_type $MT_MANIFEST; }" "$NG_TLS_BLOCK"
    run_nginx
}
launch nginx NG_PORT NG_PID "/v2/$REPO/manifests/$TAG" || die "nginx did not start"
NG=http://127.0.0.1:$NG_PORT
NGS=https://127.0.0.1:$NGS_PORT
PID_OF[nginx-tls]=$NG_PID
log "nginx on $NG (pid $NG_PID)$( [[ $TLS == 1 ]] && echo ", and on $NGS")"

# ---------------------------------------------------------------- docker-registry proxy (the peer)
start_peer() {
cat >"$W/peer.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/peer
http:
  addr: 127.0.0.1:$PEER_PORT
proxy:
  remoteurl: $UP
EOF
docker-registry serve "$W/peer.yml" >"$W/logs/peer.log" 2>&1 &
PEER_PID=$!
}
launch peer PEER_PORT PEER_PID /v2/ || die "the peer did not start"
PEER=http://127.0.0.1:$PEER_PORT
log "peer docker-registry proxy on $PEER (pid $PEER_PID)"

# ---------------------------------------------------------------- cachalot (the subject)
# write_cachalot_config [tls]: the plain instance's config, or with "tls" the HTTPS one's.
write_cachalot_config() {
    local file=$W/cachalot.toml port=$CA_PORT dir=$W/cachalot-cache tls=""
    if [[ ${1:-} == tls ]]; then
        file=$W/cachalot-tls.toml port=$CAS_PORT dir=$W/cachalot-tls-cache
        tls=$'tls_cert = "'"$W/tls.crt"$'"\ntls_key = "'"$W/tls.key"'"'
    fi
    cachalot_config "$file" "$port" "$dir" "$tls"
}
start_cachalot() {
    write_cachalot_config
    RUST_LOG=$CACHALOT_LOG "$BIN" serve --config "$W/cachalot.toml" >"$W/logs/cachalot.log" 2>&1 &
    CA_PID=$!
}
start_cachalot-tls() {
    write_cachalot_config tls
    RUST_LOG=$CACHALOT_LOG "$BIN" serve --config "$W/cachalot-tls.toml" >"$W/logs/cachalot-tls.log" 2>&1 &
    CAS_PID=$!
}
CA_OK=1
write_cachalot_config
if ! "$BIN" check-config --config "$W/cachalot.toml" >"$W/logs/cachalot-check.log" 2>&1; then
    log "cachalot check-config rejected the config:"; sed 's/^/    /' "$W/logs/cachalot-check.log" >&2
    CA_OK=0; FAILED_STAGES+=("cachalot check-config")
fi
if ((CA_OK)); then
    if launch cachalot CA_PORT CA_PID /v2/; then
        CA=http://127.0.0.1:$CA_PORT
        log "cachalot on $CA (pid $CA_PID)"
        # Idle: started, /v2/ answered once, nothing cached yet.
        sleep 1
        R_IDLE_RSS=$(awk '/^VmRSS:/ { printf "%.2f", $2 / 1024 }' "/proc/$CA_PID/status")
        log "  cachalot idle RSS after start: $R_IDLE_RSS MiB"
    else
        CA_OK=0; FAILED_STAGES+=("cachalot startup")
    fi
fi
CAS_OK=0
if ((CA_OK)) && [[ $TLS == 1 ]]; then
    if launch cachalot-tls CAS_PORT CAS_PID /v2/ https; then
        CAS=https://127.0.0.1:$CAS_PORT; CAS_OK=1
        log "cachalot (TLS) on $CAS (pid $CAS_PID)"
    else
        FAILED_STAGES+=("cachalot TLS startup")
    fi
fi

# ---------------------------------------------------------------- helpers for the measurements
# fetch_check NAME URL DIGEST BYTES: one GET, status 200, size and sha256 checked. Prints seconds.
fetch_check() {
    local name=$1 url=$2 digest=$3 bytes=$4 out got sum
    out=$(curl -sk --max-time 300 -o "$W/fetch.tmp" -w '%{http_code} %{size_download} %{time_total}' "$url" || true)
    read -r code got secs <<<"$out"
    [[ $code == 200 ]] || { log "$name: GET $url -> ${code:-none}"; rm -f "$W/fetch.tmp"; return 1; }
    [[ $got == "$bytes" ]] || { log "$name: GET $url -> $got bytes, want $bytes"; rm -f "$W/fetch.tmp"; return 1; }
    sum=sha256:$(sha256_of "$W/fetch.tmp"); rm -f "$W/fetch.tmp"
    [[ $sum == "$digest" ]] || { log "$name: GET $url -> body sha256 $sum, want $digest"; return 1; }
    echo "$secs"
}

# streams URL N BYTES: N concurrent GETs; prints MiB/s = total bytes / wall time (all must be 200 + full size).
streams() {
    local url=$1 n=$2 bytes=$3 t0 t1 i k gets=1 args=() pids=() bad=0 total=0 code got
    ((n == 1)) && gets=$ONE_STREAM_GETS
    for k in $(seq "$gets"); do args+=(-o /dev/null "$url"); done
    t0=$(now)
    for i in $(seq "$n"); do
        curl -sk --max-time 600 -w '%{http_code} %{size_download}\n' "${args[@]}" >"$W/st.$i" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    t1=$(now)
    for i in $(seq "$n"); do
        while read -r code got; do
            if [[ $code == 200 && $got == "$bytes" ]]; then total=$((total + got)); else bad=$((bad + 1)); fi
        done <"$W/st.$i"
    done
    rm -f "$W"/st.*
    ((bad == 0 && total == n * gets * bytes)) || { log "streams $url: $bad of $((n * gets)) GETs failed or were short"; return 1; }
    calc "$total / 1048576 / ($t1 - $t0)"
}

# cpu_ticks NAME: user+system clock ticks used so far by that server's processes (nginx: master + workers).
CLK=$(getconf CLK_TCK)
cpu_ticks() {
    local pids=${PID_OF[$1]:-} p t=0 v
    [[ -n $pids ]] || { echo 0; return; }
    [[ $1 == nginx* ]] && pids="$pids $(pgrep -P "$pids" | tr '\n' ' ')"
    for p in $pids; do
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# rss_sampler PID OUT: sample VmRSS every 50 ms until killed, writing the max (KiB) to OUT.
rss_sampler() {
    local pid=$1 out=$2 max=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        ((${v:-0} > max)) && { max=$v; echo "$max" >"$out"; }
        sleep 0.05
    done
}
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
# reset_hwm PID: reset the peak-RSS counter (Linux clear_refs 5); returns non-zero if not permitted.
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null; }

# rss_watch_start NAME PID / rss_watch_stop NAME PID KEY WHAT: peak RSS of PID in between, in MiB, into R[KEY].
# The kernel's peak counter is reset first (clear_refs 5) and read after; VmRSS is also sampled every 50 ms.
declare -A RSS_SAMPLER RSS_RESET
rss_watch_start() {
    local name=$1 pid=$2
    RSS_RESET[$name]=1
    reset_hwm "$pid" || RSS_RESET[$name]=0
    echo 0 >"$W/rss.$name"
    rss_sampler "$pid" "$W/rss.$name" &
    RSS_SAMPLER[$name]=$!
}
rss_watch_stop() {
    local name=$1 pid=$2 key=$3 what=$4 sampled hwm label=$1
    [[ $name == ca ]] && label=cachalot
    kill "${RSS_SAMPLER[$name]}" 2>/dev/null; wait "${RSS_SAMPLER[$name]}" 2>/dev/null || true
    sampled=$(cat "$W/rss.$name")
    hwm=$(hwm_kib "$pid")
    if ((RSS_RESET[$name])); then R[$key]=$(calc "$hwm / 1024"); else R[$key]=$(calc "$sampled / 1024"); fi
    log "  $label peak RSS during $what: VmHWM $(calc "$hwm / 1024") MiB$( ((RSS_RESET[$name])) || echo ' (could not reset: includes startup)'), max sampled VmRSS $(calc "$sampled / 1024") MiB"
}

# wrk_rps NAME METHOD URL: requests/s of METHOD on URL (non-2xx responses make it fail). GET runs wrk; HEAD
# runs ab (apache2-utils) with keep-alive, since wrk waits for a body after a HEAD response and stalls.
wrk_rps() {
    local name=$1 method=$2 url=$3 out rps bad
    [[ $method == HEAD ]] && { ab_rps "$@"; return; }
    out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --timeout 10s -H "Accept: $ACCEPT" "$url" 2>&1) || { log "$name: wrk failed: $out"; return 1; }
    printf '%s\n' "$out" >>"$W/logs/wrk.log"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' <<<"$out")
    local errs; errs=$(awk '/Socket errors:/' <<<"$out")
    [[ -n $rps ]] || { log "$name: no Requests/sec in wrk output"; return 1; }
    [[ -z $bad ]] || { log "$name: wrk saw $bad non-2xx responses"; return 1; }
    [[ -z $errs ]] || log "  $name: wrk: $errs"
    log "  $name $method: $rps requests/s ($(awk '/Latency/ && !/Distribution/ { print "latency avg " $2 ", max " $4; exit }' <<<"$out"))"
    echo "$rps"
}

ab_rps() {
    local name=$1 method=$2 url=$3 out rps bad failed
    out=$(ab -q -k -i -c "$CONNS" -t "${DURATION%s}" -n 100000000 -H "Accept: $ACCEPT" "$url" 2>&1) || { log "$name: ab failed: $(tail -n 3 <<<"$out")"; return 1; }
    printf '%s\n' "$out" >>"$W/logs/ab.log"
    rps=$(awk '/^Requests per second:/ { print $4 }' <<<"$out")
    bad=$(awk '/^Non-2xx responses:/ { print $3 }' <<<"$out")
    failed=$(awk '/^Failed requests:/ { print $3 }' <<<"$out")
    [[ -n $rps ]] || { log "$name: no Requests per second in ab output"; return 1; }
    [[ -z $bad ]] || { log "$name: ab saw $bad non-2xx responses"; return 1; }
    [[ ${failed:-0} == 0 ]] || { log "$name: ab counted $failed failed requests"; return 1; }
    log "  $name $method: $rps requests/s (ab -k -c$CONNS)"
    echo "$rps"
}

# manifest_check NAME BASE: GET by tag returns 200 and the exact manifest bytes.
manifest_check() {
    local name=$1 base=$2 code sum
    code=$(curl -sk --max-time 30 -H "Accept: $ACCEPT" -o "$W/m.tmp" -w '%{http_code}' "$base/v2/$REPO/manifests/$TAG" || true)
    [[ $code == 200 ]] || { log "$name: manifest GET -> $code"; return 1; }
    sum=sha256:$(sha256_of "$W/m.tmp"); rm -f "$W/m.tmp"
    [[ $sum == "$MANIFEST" ]] || { log "$name: manifest bytes differ (sha256 $sum, want $MANIFEST)"; return 1; }
}

upstream_gets() { grep -c "\"GET /v2/$REPO/blobs/$1 " "$W/logs/upstream-access.log" || true; }
upstream_heads() { grep -c "\"HEAD /v2/$REPO/blobs/$1 " "$W/logs/upstream-access.log" || true; }

# herd NAME BASE DIGEST: HERD concurrent cold GETs of DIGEST, all must be 200 with the full size and one body's
# sha256 is checked. Sets HERD_GETS (GETs of DIGEST the upstream logged), HERD_BAD and HERD_SECS (until the last
# client finished).
herd() {
    local name=$1 base=$2 digest=$3 pids=() i code got sum t0 secs
    HERD_BAD=0
    t0=$(now)
    for i in $(seq "$HERD"); do
        local out=/dev/null
        ((i == 1)) && out=$W/herd.body
        curl -s --max-time 600 -o "$out" -w '%{http_code} %{size_download}\n' "$base/v2/$REPO/blobs/$digest" >"$W/herd.$i" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    secs=$(calc "$(now) - $t0")
    HERD_SECS=$secs
    for i in $(seq "$HERD"); do
        read -r code got <"$W/herd.$i" || true
        [[ ${code:-} == 200 && ${got:-} == "$HERD_BYTES" ]] || { HERD_BAD=$((HERD_BAD + 1)); log "  $name herd GET $i: ${code:-none} ${got:-0} bytes"; }
    done
    sum=sha256:$(sha256_of "$W/herd.body"); rm -f "$W"/herd.*
    [[ $sum == "$digest" ]] || { log "  $name herd: body sha256 $sum, want $digest"; HERD_BAD=$((HERD_BAD + 1)); }
    sleep 1 # the access log line is written when the upstream response completes
    HERD_GETS=$(upstream_gets "$digest")
    log "  $name: $HERD concurrent cold GETs in ${secs}s, $HERD_BAD bad; upstream saw $HERD_GETS GET and $(upstream_heads "$digest") HEAD for the blob"
}

# perf_start TAG / perf_stop TAG: with PERF=1, profile cachalot (perf record) between the two calls and print the
# hottest symbols. Off by default: it costs CPU and needs perf.
PERF_PID=""
perf_start() {
    [[ $PERF == 1 && $CA_OK == 1 ]] || return 0
    perf record -F 499 -g -o "$W/perf.$1.data" -p "$CA_PID" >"$W/logs/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 0.3
}
perf_stop() {
    [[ -n $PERF_PID ]] || return 0
    kill -INT "$PERF_PID" 2>/dev/null; wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=""
    log "  perf, cachalot during $1: hottest symbols (self time)"
    perf report -i "$W/perf.$1.data" --stdio --no-children -g none --sort dso,sym --percent-limit 1.5 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 25 | sed 's/^/      /' >&2 || true
}

# ---------------------------------------------------------------- results
R[hash_secs]=$HASH0_SECS
stage_failed() { FAILED_STAGES+=("$1"); log "stage failed: $1"; }
# measure KEY STAGE CMD...: run CMD in a subshell, store its output as R[KEY], or record the failed stage.
measure() {
    local key=$1 stage=$2 v
    shift 2
    if v=$("$@"); then R[$key]=$v; else stage_failed "$stage"; return 1; fi
}

# ---------------------------------------------------------------- 0. correctness + warm-up
log "checking every server (manifest bytes, blob sha256) and warming the caches"
manifest_check nginx "$NG" || die "nginx does not serve the manifest"
manifest_check upstream "$UP" || die "upstream does not serve the manifest"
t=$(fetch_check nginx "$NG/v2/$REPO/blobs/$MAIN" "$MAIN" "$BLOB_BYTES") || die "nginx blob check failed"
log "  nginx: manifest ok, blob ok (${t}s)"
t=$(fetch_check upstream "$UP/v2/$REPO/blobs/$MAIN" "$MAIN" "$BLOB_BYTES") || die "upstream blob check failed"
log "  upstream: manifest ok, blob ok (${t}s)"
# warm NAME BASE: manifest, then the blob until a GET of it no longer reaches the upstream (cached).
warm() {
    local name=$1 base=$2 t g0 try
    manifest_check "$name" "$base" || return 1
    t=$(fetch_check "$name" "$base/v2/$REPO/blobs/$MAIN" "$MAIN" "$BLOB_BYTES") || return 1
    log "  $name: manifest ok, blob ok, cold (${t}s)"
    for try in 1 2 3 4 5; do
        sleep 0.5
        g0=$(upstream_gets "$MAIN")
        t=$(fetch_check "$name" "$base/v2/$REPO/blobs/$MAIN" "$MAIN" "$BLOB_BYTES") || return 1
        sleep 0.3
        if [[ $(upstream_gets "$MAIN") == "$g0" ]]; then
            log "  $name: blob ok, cached (${t}s, no upstream GET)"
            return 0
        fi
        log "  $name: GET $try after the fill still reached the upstream; retrying"
    done
    log "  $name: the blob never got cached"
    return 1
}
PEER_OK=1
warm peer "$PEER" || { PEER_OK=0; stage_failed "peer warm-up"; }
if ((CA_OK)); then
    warm cachalot "$CA" || { CA_OK=0; stage_failed "cachalot warm-up"; }
fi

# blob_rounds N: ROUNDS (1 stream: ONE_STREAM_ROUNDS) rounds of N concurrent streams against each server of F1_NAMES/F1_KEYS/F1_URLS, the order
# rotated each round so drifting background load hits every server alike. Stores R[KEY_N] (median MiB/s) and
# R[cpu_KEY_N] (server CPU seconds per GiB sent).
blob_rounds() {
    local n=$1 r k i s v gets rounds=$ROUNDS
    declare -A VALS=() CPU0=() BAD=()
    ((n == 1)) && rounds=$ONE_STREAM_ROUNDS
    for s in "${F1_NAMES[@]}"; do CPU0[$s]=$(cpu_ticks "$s"); done
    for r in $(seq "$rounds"); do
        for k in "${!F1_NAMES[@]}"; do
            i=$(((k + r - 1) % ${#F1_NAMES[@]}))
            s=${F1_NAMES[i]}
            [[ -n ${BAD[$s]:-} ]] && continue
            if v=$(streams "${F1_URLS[i]}" "$n" "$BLOB_BYTES"); then VALS[$s]+="$v "; else BAD[$s]=1; fi
        done
    done
    for i in "${!F1_NAMES[@]}"; do
        s=${F1_NAMES[i]}
        if [[ -n ${BAD[$s]:-} ]]; then stage_failed "$s $n streams"; continue; fi
        v=$(printf '%s\n' ${VALS[$s]} | median)
        R[${F1_KEYS[i]}_$n]=$v
        gets=$n; ((n == 1)) && gets=$ONE_STREAM_GETS
        R[cpu_${F1_KEYS[i]}_$n]=$(calc "($(cpu_ticks "$s") - ${CPU0[$s]}) / $CLK / ($rounds * $gets * $BLOB_MIB / 1024)")
        log "  $s, $n stream(s): ${VALS[$s]}MiB/s -> median $v MiB/s; server CPU ${R[cpu_${F1_KEYS[i]}_$n]} s per GiB sent"
    done
}

# ---------------------------------------------------------------- 1 + 5. cached blob throughput, peak RSS
log "figure 1: cached ${BLOB_MIB} MiB blob, 1 and $STREAMS streams (median of $ONE_STREAM_ROUNDS and $ROUNDS rounds, servers interleaved)"
F1_NAMES=(nginx); F1_KEYS=(ng); F1_URLS=("$NG/v2/$REPO/blobs/$MAIN")
if ((PEER_OK)); then F1_NAMES+=(peer); F1_KEYS+=(peer); F1_URLS+=("$PEER/v2/$REPO/blobs/$MAIN"); fi
if ((CA_OK)); then F1_NAMES+=(cachalot); F1_KEYS+=(ca); F1_URLS+=("$CA/v2/$REPO/blobs/$MAIN"); fi
blob_rounds 1
((PEER_OK)) && rss_watch_start peer "$PEER_PID"
((CA_OK)) && rss_watch_start ca "$CA_PID"
perf_start streams
blob_rounds "$STREAMS"
perf_stop streams
((PEER_OK)) && rss_watch_stop peer "$PEER_PID" peer_rss "the $STREAMS-stream rounds"
((CA_OK)) && rss_watch_stop ca "$CA_PID" ca_rss "the $STREAMS-stream rounds"

if ((CA_OK)); then
    log "figure 5: cachalot's peak RSS while serving $RSS_STREAMS concurrent streams of the cached blob (1 round)"
    rss_watch_start ca "$CA_PID"
    if v=$(streams "$CA/v2/$REPO/blobs/$MAIN" "$RSS_STREAMS" "$BLOB_BYTES"); then
        log "  cachalot, $RSS_STREAMS streams: $v MiB/s"
    else
        stage_failed "cachalot $RSS_STREAMS streams"
    fi
    rss_watch_stop ca "$CA_PID" ca_rss_many "$RSS_STREAMS streams"
fi

if ((CAS_OK)); then
    log "figure 1 over TLS: cachalot (rustls) vs nginx (OpenSSL), both HTTP/2 over TLS with the same P-256 certificate"
    if warm cachalot-tls "$CAS"; then
        F1_NAMES=(nginx-tls cachalot-tls); F1_KEYS=(ngs cas)
        F1_URLS=("$NGS/v2/$REPO/blobs/$MAIN" "$CAS/v2/$REPO/blobs/$MAIN")
        blob_rounds 1
        blob_rounds "$STREAMS"
    else
        stage_failed "cachalot TLS warm-up"
    fi
fi

# ---------------------------------------------------------------- 2. manifest by tag with wrk
log "figure 2: manifest GET (wrk -t2) and HEAD (ab -k) by tag, cached, -c$CONNS for $DURATION, median of $ROUNDS rounds"
F2_NAMES=(nginx); F2_KEYS=(ng); F2_URLS=("$NG/v2/$REPO/manifests/$TAG")
if ((PEER_OK)); then F2_NAMES+=(peer); F2_KEYS+=(peer); F2_URLS+=("$PEER/v2/$REPO/manifests/$TAG"); fi
if ((CA_OK)); then F2_NAMES+=(cachalot); F2_KEYS+=(ca); F2_URLS+=("$CA/v2/$REPO/manifests/$TAG"); fi
((CA_OK)) && perf_start manifests
for method in GET HEAD; do
    declare -A RPS=() BAD=()
    for r in $(seq "$ROUNDS"); do
        for k in "${!F2_NAMES[@]}"; do
            i=$(((k + r - 1) % ${#F2_NAMES[@]}))
            s=${F2_NAMES[i]}
            [[ -n ${BAD[$s]:-} ]] && continue
            if v=$(wrk_rps "$s" "$method" "${F2_URLS[i]}"); then RPS[$s]+="$v "; else BAD[$s]=1; fi
        done
    done
    for i in "${!F2_NAMES[@]}"; do
        s=${F2_NAMES[i]}
        if [[ -n ${BAD[$s]:-} ]]; then stage_failed "$s wrk $method"; continue; fi
        R[${F2_KEYS[i]}_rps_$method]=$(printf '%s\n' ${RPS[$s]} | median)
        log "  $s $method: ${RPS[$s]}-> median ${R[${F2_KEYS[i]}_rps_$method]} requests/s"
    done
done
if ((CA_OK)); then
    perf_stop manifests
    manifest_check cachalot "$CA" || stage_failed "cachalot manifest after wrk"
fi

# ---------------------------------------------------------------- 3. cold blob
log "figure 3: cold ${BLOB_MIB} MiB blob, $COLD_REPS fresh blobs each (median)"
# What writing new bytes into the page cache costs here, measured just before the fills: `dd` of the
# main blob (in the page cache) into 3 new files beside the caches, kept until the fills are done so
# each write takes fresh pages as a fill does. On a VM whose host reclaims free guest memory, touching
# fresh pages costs a host fault each, and this floor can exceed the hash (the README has figures).
# recycle: with RECYCLE=1, hands the next write pages just freed (see the knobs above).
recycle() {
    ((RECYCLE)) || return 0
    dd if=/dev/zero of="$W/recycle" bs=1M count="$BLOB_MIB" status=none && rm -f "$W/recycle"
}
((RECYCLE)) && log "  RECYCLE=1: every cold GET and dd below gets pages just freed"
DDW=()
TIMEFORMAT='%U %S'
for i in 1 2 3; do
    recycle
    read -r u sy < <({ time dd if="$MAIN_FILE" of="$W/floor.$i" bs=1M status=none; } 2>&1)
    ((RECYCLE)) && rm -f "$W/floor.$i"
    DDW+=("$(calc "($u + $sy) * 1024 / $BLOB_MIB")")
done
unset TIMEFORMAT
R[dd_write_cpu_gib]=$(printf '%s\n' "${DDW[@]}" | median)
log "  dd into new files: ${DDW[*]} CPU s per GiB -> median ${R[dd_write_cpu_gib]}"
DIRECT=(); CA_COLD=(); PEER_COLD=(); CA_COLD_CPU=()
CA_CPU0=$(cpu_ticks cachalot); PEER_CPU0=$(cpu_ticks peer)
for r in $(seq "$COLD_REPS"); do
    dc=${COLD_C[$((r - 1))]}; dp=${COLD_P[$((r - 1))]}
    recycle
    if t=$(fetch_check upstream "$UP/v2/$REPO/blobs/$dc" "$dc" "$BLOB_BYTES"); then DIRECT+=("$t"); else stage_failed "direct cold $r"; fi
    if ((CA_OK)); then
        recycle
        c0=$(cpu_ticks cachalot)
        if ((r == 1)); then perf_start cold; fi
        if t=$(fetch_check cachalot "$CA/v2/$REPO/blobs/$dc" "$dc" "$BLOB_BYTES"); then CA_COLD+=("$t"); else stage_failed "cachalot cold $r"; fi
        CA_COLD_CPU+=("$(calc "($(cpu_ticks cachalot) - $c0) / $CLK")")
        if ((r == 1)); then perf_stop cold; fi
    fi
    if ((PEER_OK)); then
        recycle
        if t=$(fetch_check peer "$PEER/v2/$REPO/blobs/$dp" "$dp" "$BLOB_BYTES"); then PEER_COLD+=("$t"); else stage_failed "peer cold $r"; fi
    fi
done
log "  direct from upstream: ${DIRECT[*]:-} s; cachalot cold: ${CA_COLD[*]:-} s; peer cold: ${PEER_COLD[*]:-} s; cachalot CPU per cold fill: ${CA_COLD_CPU[*]:-} s"
sleep 1
# CPU per cold GiB over the whole loop (the commits and the peer's second, filling GET included), per GiB pulled.
((${#CA_COLD[@]})) && R[ca_cold_cpu_gib]=$(calc "($(cpu_ticks cachalot) - $CA_CPU0) / $CLK / (${#CA_COLD[@]} * $BLOB_MIB / 1024)")
((${#PEER_COLD[@]})) && R[peer_cold_cpu_gib]=$(calc "($(cpu_ticks peer) - $PEER_CPU0) / $CLK / (${#PEER_COLD[@]} * $BLOB_MIB / 1024)")
log "  CPU s per cold GiB: cachalot ${R[ca_cold_cpu_gib]:-ERR}, peer ${R[peer_cold_cpu_gib]:-ERR}, openssl dgst -sha256 ${R[openssl_cpu_gib]}"
rm -f "$W"/floor.*
if [[ -n ${R[ca_cold_cpu_gib]:-} ]]; then R[ca_cold_cpu_gib_less_dd]=$(calc "${R[ca_cold_cpu_gib]} - ${R[dd_write_cpu_gib]}"); fi
g_ca=""; g_peer=""
for r in $(seq "$COLD_REPS"); do
    g_ca+="$(($(upstream_gets "${COLD_C[$((r - 1))]}") - 1)) "  # minus the direct GET
    g_peer+="$(upstream_gets "${COLD_P[$((r - 1))]}") "
done
log "  upstream GETs per cold GET: cachalot ${g_ca}; peer ${g_peer}(distribution 2.8 serves a cold client with its own upstream stream and fills the cache with another GET)"
((${#DIRECT[@]})) && R[direct_cold]=$(printf '%s\n' "${DIRECT[@]}" | median)
((${#CA_COLD[@]})) && R[ca_cold]=$(printf '%s\n' "${CA_COLD[@]}" | median)
((${#PEER_COLD[@]})) && R[peer_cold]=$(printf '%s\n' "${PEER_COLD[@]}" | median)

# ---------------------------------------------------------------- 3b. cold blob over a shaped link
if [[ $SHAPED == 1 ]] && ((CA_OK)); then
    log "figure 3b: cold ${BLOB_MIB} MiB blob with the upstream's sending side shaped to $SHAPED_RATE (tc htb on lo), $SHAPED_REPS fresh blobs"
    if shape_on "$UP_PORT"; then
        SD=(); SC=()
        for r in $(seq "$SHAPED_REPS"); do
            d=${SHAPED_D[$((r - 1))]}
            if t=$(fetch_check upstream "$UP/v2/$REPO/blobs/$d" "$d" "$BLOB_BYTES"); then SD+=("$t"); else stage_failed "shaped direct $r"; fi
            if t=$(fetch_check cachalot "$CA/v2/$REPO/blobs/$d" "$d" "$BLOB_BYTES"); then SC+=("$t"); else stage_failed "shaped cachalot $r"; fi
        done
        shape_off
        log "  shaped: direct ${SD[*]:-} s; cachalot cold ${SC[*]:-} s"
        ((${#SD[@]})) && R[shaped_direct]=$(printf '%s\n' "${SD[@]}" | median)
        ((${#SC[@]})) && R[shaped_ca]=$(printf '%s\n' "${SC[@]}" | median)
    else
        shape_off
        stage_failed "tc shaping (another root qdisc on lo?)"
    fi
fi

# ---------------------------------------------------------------- 4. thundering herd
log "figure 4: $HERD concurrent cold GETs of one fresh ${HERD_MIB} MiB blob vs one cold GET of another, $HERD_REPS times (median)"
if ((CA_OK)); then
    SINGLE=(); HERDT=(); HERD_RATIO=(); R[ca_herd]=0
    for r in $(seq "$HERD_REPS"); do
        if t=$(fetch_check cachalot "$CA/v2/$REPO/blobs/${HERD_S[r - 1]}" "${HERD_S[r - 1]}" "$HERD_BYTES"); then
            SINGLE+=("$t")
        else
            stage_failed "cachalot single cold $r"; continue
        fi
        herd cachalot "$CA" "${HERD_C[r - 1]}"
        ((HERD_BAD == 0)) || stage_failed "cachalot herd bodies"
        ((HERD_GETS > R[ca_herd])) && R[ca_herd]=$HERD_GETS
        HERDT+=("$HERD_SECS"); HERD_RATIO+=("$(calc "$HERD_SECS / $t")")
    done
    log "  one cold GET: ${SINGLE[*]:-} s; $HERD at once, last finished after: ${HERDT[*]:-} s; ratios ${HERD_RATIO[*]:-}"
    ((${#SINGLE[@]})) && R[ca_single]=$(printf '%s\n' "${SINGLE[@]}" | median)
    ((${#HERDT[@]})) && R[ca_herd_secs]=$(printf '%s\n' "${HERDT[@]}" | median)
fi
# The floor for the herd: delivering HERD copies takes this long even when the file is already at hand.
NGH=()
for r in $(seq "$HERD_REPS"); do
    if v=$(streams "$NG/herd.bin" "$HERD" "$HERD_BYTES"); then NGH+=("$(calc "$HERD * $HERD_MIB / $v")"); else stage_failed "nginx herd $r"; fi
done
log "  nginx, $HERD concurrent GETs of a ${HERD_MIB} MiB static file: ${NGH[*]:-} s"
((${#NGH[@]})) && R[ng_herd_secs]=$(printf '%s\n' "${NGH[@]}" | median)
if ((PEER_OK)); then
    herd peer "$PEER" "$HERD_P"; R[peer_herd]=$HERD_GETS
    ((HERD_BAD == 0)) || stage_failed "peer herd bodies"
fi

if ((CA_OK)); then
    kill -0 "$CA_PID" 2>/dev/null || stage_failed "cachalot died"
    log "cachalot VmHWM since the reset before the $RSS_STREAMS-stream round: $(calc "$(hwm_kib "$CA_PID") / 1024") MiB (covers figures 2-4 too)"
    if [[ $(http_code "$CA/metrics") == 200 ]]; then
        log "cachalot /metrics (cache lookups, upstream requests, bytes):"
        curl -s "$CA/metrics" | grep -E '^cachalot_(cache_lookups|upstream_requests|served_bytes|digest_mismatches)' | sed 's/^/    /' >&2 || true
    fi
fi

# ---------------------------------------------------------------- table
ANY_MISS=0
isnum() { [[ ${1:-} =~ ^[0-9]+([.][0-9]+)?$ ]]; }
cmp() { awk "BEGIN { print ($1) ? 1 : 0 }"; }
val() { echo "${R[$1]:-ERR}"; }
line() { printf '%-44s %11s %20s %9s %9s  %s\n' "$@"; }
# ratio_row FIGURE CACHALOT BASELINE_LABEL BASELINE OP TARGET: ratio = cachalot / baseline; OP empty = info row.
ratio_row() {
    local fig=$1 ca=$2 blabel=$3 base=$4 op=$5 tv=$6 ratio=- res=FAIL
    if isnum "$ca" && isnum "$base" && [[ $(cmp "$base > 0") == 1 ]]; then
        ratio=$(calc "$ca / $base")x
        [[ -n $op && $(cmp "${ratio%x} $op $tv") == 1 ]] && res=PASS
    fi
    if [[ -z $op ]]; then res=info; tv=-; else tv="$op ${tv}x"; fi
    [[ $res == FAIL ]] && ANY_MISS=1
    line "$fig" "$ca" "$blabel $base" "$ratio" "$tv" "$res"
}
echo
read -r st0 tt0 <<<"$STEAL0"; read -r st1 tt1 <<<"$(steal_ticks)"
echo "cachalot benchmark: blob ${BLOB_MIB} MiB, $STREAMS streams, wrk -c$CONNS -d$DURATION, medians of $ROUNDS rounds ($ONE_STREAM_ROUNDS for 1 stream, $COLD_REPS cold, $HERD_REPS herds); $(nproc) cores, load average $LOAD0 at start, $(cut -d' ' -f1 /proc/loadavg) at end, CPU steal $(calc "100 * ($st1 - $st0) / ($tt1 - $tt0 + 1)")% of the run"
line "figure" "cachalot" "baseline" "ratio" "target" "result"
printf '%0.s-' $(seq 104); echo
for n in 1 "$STREAMS"; do
    ratio_row "1. cached blob, $n stream(s), MiB/s" "$(val "ca_$n")" nginx "$(val "ng_$n")" '>=' 0.9
    ratio_row "   peer, $n stream(s), MiB/s" "$(val "peer_$n")" nginx "$(val "ng_$n")" "" ""
done
ratio_row "   server CPU s per GiB sent, $STREAMS streams" "$(val "cpu_ca_$STREAMS")" nginx "$(val "cpu_ng_$STREAMS")" "" ""
if [[ $TLS == 1 ]]; then
    for n in 1 "$STREAMS"; do
        ratio_row "   TLS, $n stream(s), MiB/s" "$(val "cas_$n")" nginx-tls "$(val "ngs_$n")" '>=' 0.9
        ratio_row "   TLS vs plain HTTP, $n stream(s)" "$(val "cas_$n")" plain "$(val "ca_$n")" "" ""
    done
fi
for method in GET HEAD; do
    ratio_row "2. manifest $method by tag (wrk), req/s" "$(val ca_rps_$method)" nginx "$(val ng_rps_$method)" '>=' 0.5
    ratio_row "   vs the peer, req/s" "$(val ca_rps_$method)" peer "$(val peer_rps_$method)" '>=' 50
done
ratio_row "3. cold ${BLOB_MIB} MiB blob, s" "$(val ca_cold)" direct "$(val direct_cold)" '<=' 1.5
ratio_row "   peer cold, s" "$(val peer_cold)" direct "$(val direct_cold)" "" ""
ratio_row "   vs sha256 of the blob alone (openssl), s" "$(val ca_cold)" sha256 "$(val hash_secs)" "" ""
PAGES=""; ((RECYCLE)) && PAGES=", recycled"
ratio_row "   CPU s per cold GiB$PAGES" "$(val ca_cold_cpu_gib)" openssl "$(val openssl_cpu_gib)" '<=' 2
ratio_row "   peer CPU s per cold GiB$PAGES" "$(val peer_cold_cpu_gib)" openssl "$(val openssl_cpu_gib)" "" ""
ratio_row "   dd into new files, CPU s/GiB$PAGES" "$(val dd_write_cpu_gib)" openssl "$(val openssl_cpu_gib)" "" ""
ratio_row "   CPU s per cold GiB less dd$PAGES" "$(val ca_cold_cpu_gib_less_dd)" openssl "$(val openssl_cpu_gib)" "" ""
if [[ $SHAPED == 1 ]]; then
    ratio_row "   cold over a $SHAPED_RATE link, s" "$(val shaped_ca)" direct "$(val shaped_direct)" '<=' 1.05
fi
v=$(val ca_herd); res=FAIL; [[ $v == 1 ]] && res=PASS
[[ $res == FAIL ]] && ANY_MISS=1
line "4. $HERD concurrent cold GETs: upstream GETs" "$v" "peer $(val peer_herd)" - "= 1" "$res"
ratio_row "   last of $HERD done, s" "$(val ca_herd_secs)" "1 cold GET" "$(val ca_single)" '<=' 1.2
ratio_row "   vs $HERD GETs of a static file, s" "$(val ca_herd_secs)" nginx "$(val ng_herd_secs)" "" ""
v=${R_IDLE_RSS:-ERR}; res=FAIL; isnum "$v" && [[ $(cmp "$v <= 16") == 1 ]] && res=PASS
[[ $res == FAIL ]] && ANY_MISS=1
line "5. idle RSS after start, MiB" "$v" "" - "<= 16" "$res"
v=$(val ca_rss); res=FAIL; isnum "$v" && [[ $(cmp "$v <= 64") == 1 ]] && res=PASS
[[ $res == FAIL ]] && ANY_MISS=1
line "   peak RSS, $STREAMS streams, MiB" "$v" "peer $(val peer_rss)" - "<= 64" "$res"
v=$(val ca_rss_many); res=FAIL; isnum "$v" && [[ $(cmp "$v <= 64") == 1 ]] && res=PASS
[[ $res == FAIL ]] && ANY_MISS=1
line "   peak RSS, $RSS_STREAMS streams, MiB" "$v" "" - "<= 64" "$res"
echo

if ((${#FAILED_STAGES[@]})); then
    log "stages that failed: ${FAILED_STAGES[*]}"
    exit 1
fi
log "done in $(($(date +%s) - T0))s"
if ((ANY_MISS)) && [[ $STRICT == 1 ]]; then exit 1; fi
exit 0
