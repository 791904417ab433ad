#!/bin/sh
# One link of a chain of processes, each the parent of the next:
# $1 pid file (every link appends its pid), $2 links still to start.
echo $$ >>"$1"
if [ "$2" -gt 0 ]; then
  "$0" "$1" $(($2 - 1)) </dev/null >/dev/null 2>&1 &
fi
exec sleep 300
