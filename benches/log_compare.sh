#!/usr/bin/env bash
# benches/log_compare.sh: the log lines of two cachalot builds for the same requests, compared (issue 21).
#
# The request line is written by cachalot's own layer, byte for byte as tracing-subscriber's fmt layer wrote it;
# unit tests hold the two side by side (src/request_log/tests.rs). This checks it from the outside, on real
# servers: a docker-registry upstream seeded with a small image, then for each format (text, JSON) each build is
# started afresh, sent the same requests (manifest GET miss and hit, HEAD, blob miss and hit and range, unknown
# tag, unknown blob, /v2/, tags list, DELETE, a malformed name), stopped, and its log compared with the other's
# after masking what differs from run to run: timestamps, durations, ports and the cache directory.
#
# Usage:  BEFORE=path/to/old/cachalot AFTER=path/to/new/cachalot benches/log_compare.sh
# Needs: docker-registry, curl, sed, diff, openssl or sha256sum. About 10 s.
# Output: `text: identical (N request lines)` and the same for json, or the diff; exit 1 on a difference.
set -Eeuo pipefail
umask 022
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need curl; need docker-registry; need diff
command -v openssl >/dev/null || need sha256sum coreutils
[[ -x ${BEFORE:-} && -x ${AFTER:-} ]] || die "set BEFORE and AFTER to two cachalot binaries"
W=$(mktemp -d "${TMPDIR:-/tmp}/cachalot-log-compare.XXXXXX")
mkdir -p "$W/data"
serve_upstream
head -c 5000 /dev/urandom >"$W/data/blob"
LAYER=sha256:$(sha256_of "$W/data/blob")
push_blob "$W/data/blob" "$LAYER"
seed_image "$LAYER" 5000

# requests CA: the same requests, one curl each, in order.
requests() {
    local ca=$1 a="Accept: $MT_MANIFEST"
    curl -s -o /dev/null -H "$a" "$ca/v2/$REPO/manifests/$TAG"
    curl -s -o /dev/null -H "$a" "$ca/v2/$REPO/manifests/$TAG"
    curl -s -o /dev/null -I -H "$a" "$ca/v2/$REPO/manifests/$TAG"
    curl -s -o /dev/null "$ca/v2/$REPO/blobs/$LAYER"
    # The fill commits after the answer: without the wait the next GET may be `coalesced`, not a `hit`.
    sleep 0.5
    curl -s -o /dev/null "$ca/v2/$REPO/blobs/$LAYER"
    curl -s -o /dev/null -r 0-9 "$ca/v2/$REPO/blobs/$LAYER"
    curl -s -o /dev/null "$ca/v2/$REPO/manifests/nope"
    curl -s -o /dev/null "$ca/v2/nothere/blobs/sha256:$(printf '0%.0s' {1..64})"
    curl -s -o /dev/null "$ca/v2/"
    curl -s -o /dev/null "$ca/v2/$REPO/tags/list"
    curl -s -o /dev/null -X DELETE "$ca/v2/$REPO/manifests/$TAG"
    curl -s -o /dev/null "$ca/v2/%22x%0A/manifests/a"
}

fail=0
for fmt in text json; do
    for which in before after; do
        bin=$BEFORE
        [[ $which == after ]] && bin=$AFTER
        port=$(free_port)
        cachalot_config "$W/$which-$fmt.toml" "$port" "$W/cache-$which-$fmt"
        printf '\n[log]\nformat = "%s"\n' "$fmt" >>"$W/$which-$fmt.toml"
        RUST_LOG=info "$bin" serve --config "$W/$which-$fmt.toml" >"$W/$which-$fmt.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_listen "cachalot ($which, $fmt)" "$pid" "$port" 20 || die "cachalot ($which) did not start"
        requests "http://127.0.0.1:$port"
        # Lines leave through the log writer a few milliseconds late; stopping flushes them too.
        sleep 0.3
        stop "$pid"
        sed -E -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z/<time>/' \
            -e 's/duration_ms"?[=:][0-9.e+-]*/duration_ms=<ms>/g' \
            -e "s|$W/cache-$which-$fmt|<cache>|g" -e 's/127\.0\.0\.1:[0-9]+/127.0.0.1:<port>/g' \
            "$W/$which-$fmt.log" >"$W/$which-$fmt.masked"
    done
    if diff "$W/before-$fmt.masked" "$W/after-$fmt.masked"; then
        echo "$fmt: identical ($(grep -cE '}: request |"message":"request"' "$W/after-$fmt.masked" || true) request lines, $(wc -l <"$W/after-$fmt.masked") lines)"
    else
        echo "$fmt: the logs differ (above: < before, > after)"
        fail=1
    fi
done
log "done in $(($(date +%s) - T0))s"
exit "$fail"
