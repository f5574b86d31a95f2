# benches/lib.sh: what the bench scripts (compare.sh, callgrind.sh, insn_guard.sh, cold_ab.sh, one_stream_ab.sh, tls_ab.sh) share. Sourced, not run.
# The caller sets ROOT (for locate_cachalot) and, before seeding, UP; it appends every process it starts to
# PIDS and sets W to its work dir, which cleanup (on exit) stops and removes (KEEP=1 keeps the dir).

T0=${T0:-$(date +%s)}
KEEP=${KEEP:-0}

log() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "FATAL: $*"; exit 2; }
now() { date +%s.%N; }
# calc EXPR: evaluate with awk, print with 2 decimals (numbers only are interpolated into EXPR).
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan"; exit } if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
need() { command -v "$1" >/dev/null || die "missing tool: $1 (apt-get install ${2:-$1})"; }
sha256_of() {
    if command -v openssl >/dev/null; then openssl dgst -sha256 -r "$@" | cut -d' ' -f1; else sha256sum "$@" | cut -d' ' -f1; fi
}
# http_code ARGS...: curl and print only the status code.
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 60 "$@" || true; }

PIDS=()
W=""
cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    if [[ -n $W && -d $W ]]; then
        if ((rc != 0)); then
            for f in "$W"/logs/*.log; do
                [[ -s $f ]] || continue
                printf '\n--- last lines of %s\n' "${f##*/}" >&2
                tail -n 15 "$f" >&2
            done
        fi
        if [[ $KEEP == 1 ]]; then log "kept work dir $W"; else rm -rf "$W"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

trap cleanup EXIT
trap 'exit 130' INT TERM

# listening PORT: whether some socket listens on 127.0.0.1:PORT (or any address), read from /proc/net/tcp
# so that the server under measurement sees no probe.
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# free_port: a loopback port with no socket on it, below the kernel's ephemeral range, not used before.
USED_PORTS=" "
free_port() {
    local p lo span
    lo=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    if ((lo > 12000)); then span=$((lo - 10000)); lo=10000; else lo=20000; span=40000; fi
    for _ in $(seq 200); do
        p=$((lo + RANDOM % span))
        [[ $USED_PORTS == *" $p "* ]] && continue
        listening "$p" && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
    die "no free port found"
}

# push_blob FILE DIGEST: monolithic upload (POST then PUT ?digest=), checked by a HEAD.
push_blob() {
    local file=$1 digest=$2 hdrs loc sep code
    hdrs=$(curl -s -D - -o /dev/null --max-time 30 -X POST "$UP/v2/$REPO/blobs/uploads/") || die "upload POST failed"
    [[ $hdrs == *" 202"* ]] || die "upload POST: expected 202, got: ${hdrs%%$'\r'*}"
    loc=$(printf '%s\n' "$hdrs" | tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
    [[ -n $loc ]] || die "upload POST: no Location"
    [[ $loc == http* ]] || loc=$UP$loc
    sep='&'; [[ $loc == *\?* ]] || sep='?'
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 300 -X PUT -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' -T "$file" "$loc${sep}digest=$digest" || true)
    [[ $code == 201 ]] || die "upload PUT of $digest: expected 201, got $code"
    [[ $(http_code -I "$UP/v2/$REPO/blobs/$digest") == 200 ]] || die "HEAD of pushed blob $digest is not 200"
}


# The image every script seeds the upstream with: one layer, its config, and a manifest tagged $TAG in $REPO.
REPO=bench/app
TAG=v1
MT_MANIFEST=application/vnd.oci.image.manifest.v1+json
MT_CONFIG=application/vnd.oci.image.config.v1+json
MT_LAYER=application/vnd.oci.image.layer.v1.tar

# upstream_config FILE PORT ROOT ACCESSLOG: a docker-registry config serving ROOT on 127.0.0.1:PORT, plain
# HTTP, no auth; ACCESSLOG=1 logs one line per request to stdout (for counting upstream GETs).
upstream_config() {
    local disabled=true
    [[ $4 == 1 ]] && disabled=false
    cat >"$1" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: $disabled
storage:
  filesystem:
    rootdirectory: $3
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$2
EOF
}

# seed_image LAYER_DIGEST LAYER_BYTES: pushes a config naming the (already pushed) layer and a manifest of
# both, tagged $TAG; the manifest is left in $W/data/manifest.json. Sets CFG, MANIFEST and MANIFEST_BYTES.
seed_image() {
    local layer=$1 layer_bytes=$2 code
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]},"config":{}}' "$layer" >"$W/data/config.json"
    CFG=sha256:$(sha256_of "$W/data/config.json")
    push_blob "$W/data/config.json" "$CFG"
    printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"%s","digest":"%s","size":%d},"layers":[{"mediaType":"%s","digest":"%s","size":%d}]}' \
        "$MT_MANIFEST" "$MT_CONFIG" "$CFG" "$(stat -c %s "$W/data/config.json")" "$MT_LAYER" "$layer" "$layer_bytes" >"$W/data/manifest.json"
    MANIFEST=sha256:$(sha256_of "$W/data/manifest.json")
    MANIFEST_BYTES=$(stat -c %s "$W/data/manifest.json")
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "Content-Type: $MT_MANIFEST" \
        --data-binary @"$W/data/manifest.json" "$UP/v2/$REPO/manifests/$TAG" || true)
    [[ $code == 201 ]] || die "manifest PUT: expected 201, got $code"
}

# locate_cachalot: sets BIN to $CACHALOT_BIN, or builds cachalot (cargo build --release) in $ROOT and
# sets BIN to the result; an absolute path either way.
locate_cachalot() {
    if [[ -n ${CACHALOT_BIN:-} ]]; then
        BIN=$CACHALOT_BIN
    else
        log "building cachalot (cargo build --release) in $ROOT"
        (cd "$ROOT" && cargo build --release --quiet --bin cachalot) || die "cargo build failed"
        BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/cachalot
    fi
    [[ -x $BIN ]] || die "cachalot binary not found at $BIN"
    BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
}

# cachalot_config FILE PORT DIR [SERVER_LINES]: a cachalot config listening on 127.0.0.1:PORT with its cache in
# DIR and $UP as the one, default upstream; SERVER_LINES (for example the TLS keys) go into [server].
cachalot_config() {
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
${4:-}

[cache]
dir = "$3"
tag_ttl = "1h"

[[upstream]]
name = "upstream.bench"
url = "$UP"
default = true
EOF
}

# serve_upstream: a docker-registry (no access log) with its storage in $W/up on a free port, waited for; sets
# UP. For the A/B scripts (compare.sh starts its own, with an access log and port-clash retries).
serve_upstream() {
    local port
    port=$(free_port)
    mkdir -p "$W/up" "$W/logs"
    upstream_config "$W/up.yml" "$port" "$W/up" 0
    docker-registry serve "$W/up.yml" >"$W/logs/upstream.log" 2>&1 &
    PIDS+=($!)
    UP=http://127.0.0.1:$port
    for _ in $(seq 100); do [[ $(http_code "$UP/v2/") == 200 ]] && return 0; sleep 0.1; done
    die "the upstream did not answer on $UP"
}

# serve_cachalot BIN N: cachalot BIN in front of $UP, its cache in $W/cacheN, on a free port, waited for; sets
# CA_PORT and CA_PID.
serve_cachalot() {
    local bin=$1 n=$2
    CA_PORT=$(free_port)
    mkdir -p "$W/cache$n" "$W/logs"
    cachalot_config "$W/c$n.toml" "$CA_PORT" "$W/cache$n"
    RUST_LOG=warn "$bin" serve --config "$W/c$n.toml" >"$W/logs/c$n.log" 2>&1 &
    CA_PID=$!
    PIDS+=("$CA_PID")
    for _ in $(seq 100); do [[ $(http_code "http://127.0.0.1:$CA_PORT/v2/") == 200 ]] && return 0; sleep 0.1; done
    die "cachalot $bin did not answer on port $CA_PORT"
}

# nginx_config PORT WWW [SERVER_LINES] [HTTP_LINES]: $W/nginx/nginx.conf for nginx serving WWW on 127.0.0.1:PORT
# with sendfile and tcp_nopush, its pid and temp files under $W/nginx, its errors in $W/logs/nginx.log.
# SERVER_LINES go into the server block, HTTP_LINES (for example another server) into http. NGINX_MAIN (default
# "worker_processes auto;"), NGINX_CONNECTIONS (4096) and NGINX_LISTEN (listen parameters, e.g. a backlog) size it.
nginx_config() {
    mkdir -p "$W/nginx/tmp" "$W/logs"
    cat >"$W/nginx/nginx.conf" <<EOF
daemon off;
${NGINX_MAIN:-worker_processes auto;}
pid $W/nginx/nginx.pid;
error_log $W/logs/nginx.log warn;
events { worker_connections ${NGINX_CONNECTIONS:-4096}; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $W/nginx/tmp/body;
    proxy_temp_path $W/nginx/tmp/proxy;
    fastcgi_temp_path $W/nginx/tmp/fastcgi;
    uwsgi_temp_path $W/nginx/tmp/uwsgi;
    scgi_temp_path $W/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$1 ${NGINX_LISTEN:-};
        root $2;
        ${3:-}
    }
    ${4:-}
}
EOF
}

# run_nginx: starts nginx on $W/nginx/nginx.conf in the foreground of a background job; sets NG_PID.
run_nginx() {
    nginx -p "$W/nginx" -e "$W/logs/nginx.log" -c "$W/nginx/nginx.conf" >>"$W/logs/nginx.log" 2>&1 &
    NG_PID=$!
}

# wait_listen NAME PID PORT SECS: wait until PORT listens while PID lives.
wait_listen() {
    local name=$1 pid=$2 port=$3 secs=$4
    for _ in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || { log "$name exited during startup"; return 1; }
        listening "$port" && return 0
        sleep 0.1
    done
    log "$name did not listen on port $port within ${secs}s"
    return 1
}

# stop PID: SIGTERM (cachalot shuts down gracefully; a background job of a script ignores SIGINT),
# then wait: callgrind writes its file on exit. SIGKILL after 60 s.
stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
