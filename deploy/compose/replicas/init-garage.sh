#!/bin/sh
# One-shot setup of the compose example's Garage cluster (see docker-compose.yml); running it
# again changes nothing that is already done.
#   1. writes .env with fresh random secrets, unless it exists;
#   2. starts the three Garage nodes and waits until each answers;
#   3. connects them, gives each a role (zone dc1, GARAGE_CAPACITY of space, 100G by default)
#      and applies that first layout;
#   4. creates the bucket "cachalot", imports the S3 key of .env, and allows it read and write.
set -eu
cd "$(dirname "$0")"

if [ ! -f .env ]; then
    hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
    (
        umask 077
        {
            echo "GARAGE_RPC_SECRET=$(hex 32)"
            echo "CACHALOT_S3_ACCESS_KEY_ID=GK$(hex 12)"
            echo "CACHALOT_S3_SECRET_ACCESS_KEY=$(hex 32)"
            echo "CACHALOT_CLUSTER_SECRET=$(hex 32)"
        } >.env
    )
    echo "wrote .env (keep it: the replicas and Garage read their secrets from it)"
fi
. ./.env

docker compose up -d garage1 garage2 garage3

# The image has no shell: every command is the garage binary itself, run in a node's container.
garage() {
    node=$1
    shift
    docker compose exec -T "$node" /garage "$@"
}

# Runs "$@" until it succeeds, for at most a minute.
retry() {
    tries=0
    until "$@"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            echo "gave up on: $*" >&2
            exit 1
        fi
        sleep 1
    done
}
answers() { garage "$1" status >/dev/null 2>&1; }
for node in garage1 garage2 garage3; do
    retry answers "$node"
done

# Without rpc_public_addr, `node id -q` prints the bare id; the compose service name is the host.
id1=$(garage garage1 node id -q)
id2=$(garage garage2 node id -q)
id3=$(garage garage3 node id -q)
garage garage1 node connect "$id2@garage2:3901"
garage garage1 node connect "$id3@garage3:3901"
garage garage2 node connect "$id3@garage3:3901"

if garage garage1 json-api GetClusterLayout | grep -Eq '^  "version": 0,?$'; then
    garage garage1 layout assign -z dc1 -c "${GARAGE_CAPACITY:-100G}" "$id1" "$id2" "$id3"
    garage garage1 layout apply --version 1
fi

# A layout just applied may take a moment to reach every node, and a bucket needs it.
bucket() { garage garage1 bucket info cachalot >/dev/null 2>&1 || garage garage1 bucket create cachalot; }
retry bucket
garage garage1 key info "$CACHALOT_S3_ACCESS_KEY_ID" >/dev/null 2>&1 ||
    garage garage1 key import --yes -n cachalot \
        "$CACHALOT_S3_ACCESS_KEY_ID" "$CACHALOT_S3_SECRET_ACCESS_KEY"
garage garage1 bucket allow --read --write --key "$CACHALOT_S3_ACCESS_KEY_ID" cachalot

echo "Garage is ready. Start the replicas with: docker compose up -d"
