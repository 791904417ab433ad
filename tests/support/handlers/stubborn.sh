#!/bin/sh
# Ignores SIGTERM (so an attempt bunny stops lives until SIGKILL);
# payload: seconds to sleep. Appends "start|end JOB_ID JOB_ATTEMPT PID" to $1.
log=$1
trap '' TERM
s=$(cat | tr -d '[] \n')
echo "start $JOB_ID $JOB_ATTEMPT $$" >>"$log"
sleep "${s:-0}"
echo "end $JOB_ID $JOB_ATTEMPT $$" >>"$log"
printf '{"job":"%s","attempt":%s}\n' "$JOB_ID" "$JOB_ATTEMPT"
