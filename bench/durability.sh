#!/bin/sh
# Issue 4's figures, measured with the bench harness:
#  1. submit throughput with journal.fsync=always vs off, 64 concurrent
#     producers (single submits, then batches of 64);
#  2. replay time and RSS for 1,000,000 queued 200-byte jobs.
# relay runs on core 0, the load generator on core 1 (taskset). Prints
# key=value lines; everything it starts it stops.
#
#   bench/durability.sh [SECONDS_PER_RUN] [JOBS_FOR_REPLAY]
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-5}
fill=${2:-1000000}
ci/deps
command -v taskset >/dev/null || apt-get install -y -qq util-linux >/dev/null
[ -f _build/bench/build.ninja ] || meson setup _build/bench -Dbuildtype=release -Dtests=false >/dev/null
ninja -C _build/bench relay bench/relay_bench >/dev/null
bin=$(pwd)/_build/bench

work=$(mktemp -d)
relay_pid=""
cleanup() {
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
tests/support/pki.sh "$work/pki"
cat > "$work/policy.json" <<'JSON'
{"principals": {"producer": {"dns_san": "producer.test"}},
 "grants": [{"principal": "producer", "allow": ["submit", "read"], "queues": ["*"]}]}
JSON
cat > "$work/relay.json" <<'JSON'
{"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
 "tls": {"cert": "pki/server.crt", "key": "pki/server.key", "client_ca": "pki/ca.crt"},
 "policy": "policy.json", "limits": {"max_jobs": 4000000, "max_held_bytes": 4294967296}}
JSON

start_relay() {  # journal-dir fsync-mode
  : > "$work/relay.log"
  taskset -c 0 "$bin/relay" --config "$work/relay.json" --journal-dir "$1" --set "journal.fsync=$2" 2>"$work/relay.log" &
  relay_pid=$!
  for _ in $(seq 600); do grep -q '"listener":"ops"' "$work/relay.log" 2>/dev/null && break; sleep 0.05; done
  port=$(sed -n 's/.*"listener":"api","addr":"127.0.0.1:\([0-9]*\)".*/\1/p' "$work/relay.log")
  [ -n "$port" ] || { cat "$work/relay.log" >&2; exit 1; }
}
stop_relay() {
  kill -TERM "$relay_pid"
  wait "$relay_pid" || true
  relay_pid=""
}

for batch in 1 64; do
  for mode in always off; do
    start_relay "$work/j-$mode-$batch" "$mode"
    printf 'fsync=%s ' "$mode"
    taskset -c 1 "$bin/bench/relay_bench" submit --port "$port" --pki "$work/pki" --connections 64 \
      --batch "$batch" --seconds "$seconds" --payload-bytes 200 --server-pid "$relay_pid"
    curl -s "http://$(sed -n 's/.*"listener":"ops","addr":"\([^"]*\)".*/\1/p' "$work/relay.log")/metrics" |
      awk '/^relay_journal_records_per_fsync_(sum|count) /{v[$1]=$2} /^relay_journal_fsyncs_total /{f=$2}
           END {if (v["relay_journal_records_per_fsync_count"] > 0) printf "  fsyncs=%d records_per_fsync=%.1f\n", f, v["relay_journal_records_per_fsync_sum"]/v["relay_journal_records_per_fsync_count"]}'
    stop_relay
  done
done

start_relay "$work/j-replay" always
taskset -c 1 "$bin/bench/relay_bench" fill --port "$port" --pki "$work/pki" --count "$fill" --batch 1000 \
  --connections 4 --payload-bytes 200 --server-pid "$relay_pid" | sed 's/^/fill: /'
stop_relay
start_relay "$work/j-replay" always
rss=$(awk '/^VmRSS/{print $2}' "/proc/$relay_pid/status")
line=$(grep '"event":"journal_replayed"' "$work/relay.log")
echo "replay: jobs=$(echo "$line" | sed 's/.*"jobs":\([0-9]*\).*/\1/') records=$(echo "$line" | sed 's/.*"records":\([0-9]*\).*/\1/') bytes=$(echo "$line" | sed 's/.*"bytes":\([0-9]*\).*/\1/') milliseconds=$(echo "$line" | sed 's/.*"milliseconds":\([0-9]*\).*/\1/') rss_kb_after_replay=$rss"
stop_relay
