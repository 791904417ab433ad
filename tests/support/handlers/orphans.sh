#!/bin/sh
# Starts two descendants that would outlive it: one in its process group,
# one in a session of its own. Writes the three pids to the directory named
# by $1 (handler.pid last, so its presence means all are there), then waits
# far longer than any test. For checking that nothing outlives bunny.
cat >/dev/null
dir=$1
sleep 300 &
echo $! >"$dir/child.pid"
setsid sleep 300 &
echo $! >"$dir/detached.pid"
echo $$ >"$dir/handler.pid.tmp" && mv "$dir/handler.pid.tmp" "$dir/handler.pid"
wait
