#!/usr/bin/env bash
# `cachalot import` against the disk's floor, in one run on one machine:
#   floor:  unpack the same bundle with tar, sha256sum every blob, one sync;
#   import: `cachalot import` of it into an empty cache (it hashes, stages, places, syncs once
#           and commits once).
# Bundles are generated here in the layout `cachalot export` writes (oci-layout, index.json,
# blobs/sha256/<hex> sorted by digest): IMAGES images of LAYERS small layers each (~250 bytes
# per object), every object distinct. Then the peak RSS of importing a BIG-image bundle.
#
#   benches/import.sh                 # 2,000 x 10 (24,000 objects), 3 runs each; 20,000 for RSS
#   IMAGES=500 BIG=0 benches/import.sh
#
# Uses target/release/cachalot (built if missing, or CACHALOT_BIN). Work files go under
# TMPDIR (default /var/tmp), which should be the disk a cache would be on.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES=${IMAGES:-2000}
LAYERS=${LAYERS:-10}
RUNS=${RUNS:-3}
BIG=${BIG:-20000}
BIN=${CACHALOT_BIN:-target/release/cachalot}
if [[ -z ${CACHALOT_BIN:-} ]]; then
    cargo build --release --quiet --bin cachalot
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/cachalot-import.XXXXXX")
trap 'rm -rf "$work"' EXIT

# gen IMAGES LAYERS OUT: writes a bundle.
gen() {
    python3 - "$@" <<'PY'
import hashlib, io, json, sys, tarfile
images, layers, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
blobs = {}
def put(data):
    d = hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return {"digest": "sha256:" + d, "size": len(data)}
entries = []
pad = "x" * 200
for i in range(images):
    config = put(json.dumps({"architecture": "amd64", "os": "linux", "i": i, "pad": pad}).encode())
    ls = [dict(put(f"image {i} layer {l}: {pad}".encode()),
               mediaType="application/vnd.oci.image.layer.v1.tar") for l in range(layers)]
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                    "layers": ls}).encode()
    top = put(m)
    entries.append(dict(top, mediaType="application/vnd.oci.image.manifest.v1+json",
                        annotations={"org.opencontainers.image.ref.name": f"bench.local/team/app:v{i}"}))
index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": entries}, indent=2).encode()
with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as t:
    def add(name, data=None):
        ti = tarfile.TarInfo(name)
        if data is None:
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        else:
            ti.size, ti.mode = len(data), 0o644
            t.addfile(ti, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    add("blobs/"); add("blobs/sha256/")
    for d in sorted(blobs):
        add("blobs/sha256/" + d, blobs[d])
print(f"{out}: {images} images, {len(blobs)} objects, {sum(map(len, blobs.values()))} bytes, "
      f"index.json {len(index)} bytes", file=sys.stderr)
PY
}

config() { # config DIR: a config whose cache is DIR/cache
    cat > "$1/cachalot.toml" <<TOML
[server]
listen = "127.0.0.1:0"

[cache]
dir = "$1/cache"
max_size = "100GiB"
offline = true

[[upstream]]
name = "bench.local"
url = "http://127.0.0.1:9"
default = true
TOML
}

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

gen "$IMAGES" "$LAYERS" "$work/bundle.tar"
floor_t=() import_t=() ratio_t=()
for r in $(seq "$RUNS"); do
    rm -rf "$work/x" "$work/c" && mkdir -p "$work/x" "$work/c" && sync
    t0=$(now)
    tar -xf "$work/bundle.tar" -C "$work/x"
    find "$work/x/blobs" -type f -print0 | xargs -0 sha256sum > /dev/null
    sync
    t1=$(now)
    floor_t+=("$(echo "$t1 - $t0" | bc)")
    config "$work/c" && sync
    t0=$(now)
    "$BIN" import --config "$work/c/cachalot.toml" "$work/bundle.tar" > /dev/null
    t1=$(now)
    import_t+=("$(echo "$t1 - $t0" | bc)")
    ratio_t+=("$(echo "scale=2; ${import_t[-1]} / ${floor_t[-1]}" | bc)")
    echo "run $r: floor ${floor_t[-1]}s, import ${import_t[-1]}s, ratio ${ratio_t[-1]}x"
done
floor=$(printf '%s\n' "${floor_t[@]}" | median)
imp=$(printf '%s\n' "${import_t[@]}" | median)
ratio=$(printf '%s\n' "${ratio_t[@]}" | median)
# Each run's ratio pairs a floor with the import right after it: on a shared disk that is
# steadier than the ratio of the medians.
echo "median of $RUNS: floor ${floor}s, import ${imp}s, ratio ${ratio}x (target <= 1.5x)"

if [[ $BIG -gt 0 ]]; then
    gen "$BIG" "$LAYERS" "$work/big.tar"
    rm -rf "$work/x" "$work/c" "$work/bundle.tar" && mkdir -p "$work/c" && config "$work/c"
    /usr/bin/time -v "$BIN" import --config "$work/c/cachalot.toml" "$work/big.tar" \
        > /dev/null 2> "$work/time.txt"
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time.txt")
    echo "import of $BIG images: peak RSS $((rss / 1024)) MiB, wall $wall (target < 128 MB)"
fi
echo "machine: $(nproc) cores, sha_ni on $(grep -c sha_ni /proc/cpuinfo) of them, $(uptime | sed 's/.*load/load/')"
