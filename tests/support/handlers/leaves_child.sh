#!/bin/sh
# Starts a background child that outlives the handler, writes its
# pid to $1, and exits 0 at once.
sleep 300 >/dev/null 2>&1 &
echo $! >"$1"
printf '{"ok":true}\n'
