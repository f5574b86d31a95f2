#!/usr/bin/env bash
# benches/tls_ab.sh: cached-blob throughput over HTTPS of one or more cachalot builds beside nginx (OpenSSL),
# 1 and 16 streams, in one run (issue 16, part 2). Each build serves the blob with the same self-signed P-256
# certificate as nginx; ROUNDS rounds, the order rotating, of: 2 GETs in a row on one stream, then 16
# concurrent GETs; throughput = bytes / wall time; prints each median and its ratio to nginx. That is how the
# rustls crypto providers (`ring`, `aws-lc-rs`) were compared: build one binary per provider.
#
# Each protocol is compared with its like: HTTP/1.1 (curl --http1.1; nginx's default for `listen ... ssl`) and
# HTTP/2 (curl --http2, which cachalot offers by ALPN; nginx with `listen ... ssl http2`). curl receiving HTTP/2
# costs the client more CPU than HTTP/1.1, and the client shares the cores, so cachalot over HTTP/2 against
# nginx over HTTP/1.1 would compare the protocols, not the servers.
#
# Usage:  benches/tls_ab.sh BIN_A [BIN_B ...]      (MIB=128 ROUNDS=5 PROTOS="http1.1 http2")
# Needs: docker-registry, nginx, curl, openssl, awk, sha256sum.
set -Eeuo pipefail
MIB=${MIB:-128}
ROUNDS=${ROUNDS:-5}
PROTOS=${PROTOS:-http1.1 http2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
(($#)) || die "usage: $0 CACHALOT_BIN [CACHALOT_BIN ...]"
need curl; need awk; need nginx; need openssl; need docker-registry; need sha256sum coreutils
W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-tls-ab.XXXXXX")
chmod 755 "$W" # nginx workers run as nobody when started as root
serve_upstream
head -c $((MIB * 1048576)) /dev/urandom >"$W/blob"
d=sha256:$(sha256sum "$W/blob" | cut -d' ' -f1); push_blob "$W/blob" "$d"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -keyout "$W/tls.key" -out "$W/tls.crt" >/dev/null 2>&1
chmod a+r "$W/tls.key"
NAMES=(); URLS=()
i=0
for bin in "$@"; do
    P=$(free_port)
    cachalot_config "$W/c$i.toml" "$P" "$W/cache$i" $'tls_cert = "'"$W/tls.crt"$'"\ntls_key = "'"$W/tls.key"'"'
    mkdir -p "$W/logs"
    RUST_LOG=warn "$bin" serve --config "$W/c$i.toml" >"$W/logs/c$i.log" 2>&1 & PIDS+=($!)
    wait_listen "cachalot $bin" "${PIDS[-1]}" "$P" 15 || die "cachalot $bin did not start"
    u=https://127.0.0.1:$P/v2/$REPO/blobs/$d
    [[ $(http_code -k "$u") == 200 ]] || die "cachalot $bin: the warm-up GET failed"
    sleep 0.5 # the commit
    NAMES+=("bin$i"); URLS+=("$u"); i=$((i+1))
done
mkdir -p "$W/www/v2/$REPO/blobs" && cp "$W/blob" "$W/www/v2/$REPO/blobs/$d" && chmod -R a+rX "$W/www"
declare -A NGINX_PORT=([http1.1]=$(free_port) [http2]=$(free_port))
tls="ssl_certificate $W/tls.crt; ssl_certificate_key $W/tls.key; root $W/www;"
nginx_config "$(free_port)" "$W/www" "" "server { listen 127.0.0.1:${NGINX_PORT[http1.1]} ssl; $tls }
    server { listen 127.0.0.1:${NGINX_PORT[http2]} ssl http2; $tls }"
run_nginx; PIDS+=("$NG_PID")
wait_listen nginx "$NG_PID" "${NGINX_PORT[http2]}" 15 || die "nginx did not start"
NAMES+=(nginx); URLS+=("https://127.0.0.1:NGINX_PORT/v2/$REPO/blobs/$d")
# tput URL N PROTO: MiB/s of N concurrent clients (N=1: 2 GETs in a row) over PROTO; every GET must be a 200
# of MIB MiB, over PROTO.
tput() {
    local url=$1 n=$2 proto=$3 t0 t1 k=1 pids=() args bad
    ((n == 1)) && k=2
    url=${url/NGINX_PORT/${NGINX_PORT[$proto]}}
    t0=$(now)
    for _ in $(seq "$n"); do
        args=(); for _ in $(seq "$k"); do args+=(-o /dev/null "$url"); done
        curl -sk "--$proto" -w '%{http_code} %{size_download} %{http_version}\n' "${args[@]}" >>"$W/tput.out" & pids+=($!)
    done
    wait "${pids[@]}"
    t1=$(now)
    bad=$(awk -v sz=$((MIB * 1048576)) -v v="${proto#http}" '$1 != 200 || $2 != sz || $3 != v { b++ } END { print b + 0 }' "$W/tput.out")
    rm -f "$W/tput.out"
    ((bad == 0)) || die "$url: $bad GETs failed, were short, or not over $proto"
    awk -v b=$((n * k * MIB)) -v a="$t0" -v z="$t1" 'BEGIN { printf "%.0f", b / (z - a) }'
}
declare -A V
for p in $PROTOS; do
    for n in 1 16; do
        for r in $(seq "$ROUNDS"); do
            for k in "${!NAMES[@]}"; do
                j=$(((k + r) % ${#NAMES[@]}))
                V[${NAMES[j]}_${p}_$n]+="$(tput "${URLS[j]}" "$n" "$p") "
            done
        done
    done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); ${MIB} MiB blob, medians of $ROUNDS rounds"
for p in $PROTOS; do
    for n in 1 16; do
        ng=$(printf '%s\n' ${V[nginx_${p}_$n]} | median)
        for s in "${NAMES[@]}"; do
            m=$(printf '%s\n' ${V[${s}_${p}_$n]} | median)
            echo "$p, $n stream(s) $s: ${V[${s}_${p}_$n]}-> median $m MiB/s, $(awk -v a="$m" -v b="$ng" 'BEGIN { printf "%.2fx", a / b }') nginx"
        done
    done
done
