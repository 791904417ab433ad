#!/bin/sh
# Records when each attempt runs, for tests that check that two attempts of
# one job never run at once: appends to the file named by $1
#   start JOB_ID JOB_ATTEMPT PID NANOSECONDS
#   end   JOB_ID JOB_ATTEMPT PID NANOSECONDS ok|fail|term
# ("term": stopped by SIGTERM, as bunny stops an attempt).
# Payload: [seconds for attempt 1, seconds for later attempts, exit code],
# each optional (a bare number: the seconds for every attempt).
# Result: {"job":JOB_ID,"attempt":JOB_ATTEMPT}.
log=$1
now() { date +%s%N; }
p=$(cat | tr -d '[] \n')
IFS=, read -r s1 s2 code <<EOT
$p
EOT
[ -n "$s1" ] || s1=0
[ -n "$s2" ] || s2=$s1
[ -n "$code" ] || code=0
s=$s1
[ "$JOB_ATTEMPT" = 1 ] || s=$s2
pid=
trap 'echo "end $JOB_ID $JOB_ATTEMPT $$ $(now) term" >>"$log"; [ -n "$pid" ] && kill "$pid" 2>/dev/null; exit 143' TERM INT
echo "start $JOB_ID $JOB_ATTEMPT $$ $(now)" >>"$log"
if [ "$s" != 0 ]; then
  sleep "$s" &
  pid=$!
  wait "$pid"
fi
if [ "$code" = 0 ]; then
  echo "end $JOB_ID $JOB_ATTEMPT $$ $(now) ok" >>"$log"
  printf '{"job":"%s","attempt":%s}\n' "$JOB_ID" "$JOB_ATTEMPT"
else
  echo "end $JOB_ID $JOB_ATTEMPT $$ $(now) fail" >>"$log"
  echo "failing on purpose" >&2
  exit "$code"
fi
