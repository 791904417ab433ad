#!/bin/sh
# Starts a child in a session of its own (pid to $1), then writes
# more stdout than handler.max_output_bytes (bunny SIGKILLs the group at once).
setsid sleep 300 </dev/null >/dev/null 2>&1 &
echo $! >"$1"
cat >/dev/null
sleep 0.3  # the child has called setsid() by now
head -c 4000000 /dev/zero | tr '\0' 'x'
sleep 30
