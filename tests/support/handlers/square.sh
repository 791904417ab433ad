#!/bin/sh
# Example exec handler. Payload: a number n, or [n, seconds] to sleep first.
# Result: {"n":n,"square":n*n,"attempt":JOB_ATTEMPT,"job":JOB_ID}.
set -eu
payload=$(cat | tr -d '[] \n')
n=${payload%%,*}
sleep_s=0
[ "$payload" != "$n" ] && sleep_s=${payload#*,}
case $n in ''|*[!0-9-]*) echo "payload must be a number or [number, seconds]" >&2; exit 2 ;; esac
[ "$sleep_s" != 0 ] && sleep "$sleep_s"
printf '{"n":%s,"square":%s,"attempt":%s,"job":"%s"}\n' "$n" "$((n * n))" "$JOB_ATTEMPT" "$JOB_ID"
