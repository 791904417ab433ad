#!/bin/sh
# Always fails with a message on stderr.
cat >/dev/null
echo "cannot render: texture missing" >&2
exit 3
