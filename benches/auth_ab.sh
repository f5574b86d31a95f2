#!/usr/bin/env bash
# benches/auth_ab.sh: what client authentication costs on the hot path (issue 12: "cached manifest GETs with
# credentials at least 0.8x the anonymous rate").
#
# In one run it starts, on loopback: a seeded `docker-registry` (the upstream), a cachalot without [auth]
# ("off") and one with [auth] (htpasswd with one bcrypt user, anonymous = true: "on"), both the same release
# build, each with the manifest cached. Then, ROUNDS times, the order rotating, it runs wrk for DURATION on the
# cached manifest GET by tag: off anonymously, on anonymously, and on with a valid `Authorization: Basic`
# header (the verified credential is remembered, so only the first request pays for bcrypt). It prints the
# median req/s of each and the ratios; the issue's target is on+credentials >= 0.8x off.
#
# Usage:  benches/auth_ab.sh                       # builds cachalot (cargo build --release) first
#         CACHALOT_BIN=path/to/cachalot benches/auth_ab.sh
# Knobs (env): ROUNDS=5 DURATION=4s CONNS=64 THREADS=2 COST=10 (bcrypt cost of the user) KEEP=0 STRICT=0 (exit 1
#              below 0.8x) CACHALOT_LOG=warn
# Needs: docker-registry, wrk, htpasswd (apache2-utils), curl, awk.
set -Eeuo pipefail
umask 022

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
COST=${COST:-10}
STRICT=${STRICT:-0}
CACHALOT_LOG=${CACHALOT_LOG:-warn}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need curl; need awk; need wrk; need docker-registry; need htpasswd apache2-utils
ACCEPT="$MT_MANIFEST, application/vnd.oci.image.index.v1+json"

locate_cachalot
W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-auth-ab.XXXXXX")
mkdir -p "$W/logs" "$W/data"
cp "$BIN" "$W/cachalot" && BIN=$W/cachalot

serve_upstream
log "upstream docker-registry on $UP"
head -c 1048576 /dev/urandom >"$W/data/layer.bin"
LAYER=sha256:$(sha256_of "$W/data/layer.bin")
push_blob "$W/data/layer.bin" "$LAYER"
seed_image "$LAYER" 1048576

USER_NAME=bench
PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
htpasswd -nbB -C "$COST" "$USER_NAME" "$PASSWORD" | sed '/^$/d' >"$W/htpasswd"
AUTH_HEADER="Authorization: Basic $(printf '%s:%s' "$USER_NAME" "$PASSWORD" | base64 -w0)"

# start NAME AUTH_LINES: a cachalot (config from lib.sh plus AUTH_LINES) on a free port; sets PORT_<NAME>.
start() {
    local name=$1 port
    port=$(free_port)
    mkdir -p "$W/cache-$name"
    cachalot_config "$W/$name.toml" "$port" "$W/cache-$name"
    printf '%s\n' "$2" >>"$W/$name.toml"
    RUST_LOG=$CACHALOT_LOG "$BIN" serve --config "$W/$name.toml" >"$W/logs/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        [[ $(http_code -H "$AUTH_HEADER" "http://127.0.0.1:$port/v2/") == 200 ]] && break
        sleep 0.1
    done
    [[ $(http_code -H "$AUTH_HEADER" "http://127.0.0.1:$port/v2/") == 200 ]] || die "cachalot $name did not start"
    printf -v "PORT_$name" '%s' "$port"
}
start off ""
start on "$(printf '[auth]\nhtpasswd = "%s"\nanonymous = true\n' "$W/htpasswd")"

MPATH=/v2/$REPO/manifests/$TAG
for name in off on; do
    port_var=PORT_$name
    url=http://127.0.0.1:${!port_var}$MPATH
    body=$(curl -s --max-time 30 -H "$AUTH_HEADER" -H "Accept: $ACCEPT" "$url")
    [[ $body == "$(cat "$W/data/manifest.json")" ]] || die "cachalot $name: the manifest is not upstream's"
done
# Without credentials, or with wrong ones, "on" must refuse where it should (a bench of a server that lets
# anything through would measure nothing).
[[ $(http_code -H "Authorization: Basic $(printf 'bench:wrong' | base64 -w0)" "http://127.0.0.1:$PORT_on$MPATH") == 401 ]] ||
    die "cachalot on accepted a wrong password"

# rate NAME HEADER...: req/s of one wrk run on cachalot NAME's manifest URL.
rate() {
    local name=$1 port_var=PORT_$1 out
    shift
    local hdr=(-H "Accept: $ACCEPT")
    for h in "$@"; do hdr+=(-H "$h"); done
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" "${hdr[@]}" "http://127.0.0.1:${!port_var}$MPATH")
    if grep -q "Non-2xx" <<<"$out"; then die "wrk on $name saw non-2xx answers: $out"; fi
    awk '/^Requests\/sec:/ { print $2 }' <<<"$out"
}

declare -A RATES
CASES=(off-anonymous on-anonymous on-credentials)
for r in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        c=${CASES[(i + r) % 3]}
        case $c in
            off-anonymous) v=$(rate off) ;;
            on-anonymous) v=$(rate on) ;;
            on-credentials) v=$(rate on "$AUTH_HEADER") ;;
        esac
        RATES[$c]+="$v "
        log "round $r: $c $v req/s"
    done
done

med() { tr ' ' '\n' <<<"${RATES[$1]}" | sed '/^$/d' | median; }
OFF=$(med off-anonymous); ON_ANON=$(med on-anonymous); ON_CREDS=$(med on-credentials)
RATIO=$(calc "$ON_CREDS / $OFF")
printf '\ncached manifest GET by tag, wrk -t%s -c%s -d%s, median of %s rounds (req/s)\n' "$THREADS" "$CONNS" "$DURATION" "$ROUNDS"
printf '  %-28s %10s\n' "no [auth]" "$OFF" "[auth], anonymous" "$ON_ANON" "[auth], Basic credentials" "$ON_CREDS"
printf '  credentials / no [auth]   %sx (target >= 0.8x)\n' "$RATIO"
printf '  credentials / anonymous   %sx\n' "$(calc "$ON_CREDS / $ON_ANON")"
if [[ $STRICT == 1 ]] && awk "BEGIN { exit !($RATIO < 0.8) }"; then exit 1; fi
