#!/bin/sh
# SeaweedFS in one process (master, volume server, filer, S3 gateway) with one S3 identity, the vlforge
# credentials from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). They are written to a
# private config file (umask 077) outside the data folder, never echoed. Extra arguments go to `weed server`
# (ports, -ip); compose and the native-stack test (tests/integration/servers.py) both start it this way.
set -eu

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
data_dir="${SEAWEEDFS_DIR:-/data}"
config_dir="${SEAWEEDFS_CONFIG_DIR:-/tmp/seaweedfs-config}"

umask 077
mkdir -p "$data_dir" "$config_dir"
cat >"$config_dir/s3.json" <<JSON
{"identities": [{"name": "vlforge",
  "credentials": [{"accessKey": "${AWS_ACCESS_KEY_ID}", "secretKey": "${AWS_SECRET_ACCESS_KEY}"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON

exec weed server -dir="$data_dir" -s3 -s3.config="$config_dir/s3.json" "$@"
