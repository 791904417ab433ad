#!/bin/sh
# Appends its pid to $1, SIGKILLs its parent (the guard), and
# goes on working for minutes.
echo $$ >>"$1"
cat >/dev/null
kill -9 $PPID
sleep 300
printf '{"ok":true}\n'
