#!/bin/sh
# Prints its environment as a JSON array of names (to check what leaks in).
cat >/dev/null
printf '['
first=1
for name in $(env | sed 's/=.*//' | sort); do
  [ $first = 1 ] || printf ','
  first=0
  printf '"%s"' "$name"
done
printf ']\n'
