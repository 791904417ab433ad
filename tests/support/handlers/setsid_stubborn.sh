#!/bin/sh
# Starts a child in a session of its own (pid to $1), then ignores
# SIGTERM and sleeps, so bunny's timeout ends it with SIGKILL to the group.
setsid sleep 300 </dev/null >/dev/null 2>&1 &
echo $! >"$1"
trap '' TERM
cat >/dev/null
sleep 30
printf '{"ok":true}\n'
