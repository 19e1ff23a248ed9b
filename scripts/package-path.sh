#!/bin/sh
# For a host where glyphq cannot be pip-installed (the GPU benchmark host): print a folder that holds a
# link named glyphq to this checkout, to put on PYTHONPATH:
#   export PYTHONPATH=$(scripts/package-path.sh):$PYTHONPATH
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${TMPDIR:-/tmp}/glyphq-path-$(id -u)
mkdir -p "$dir"
ln -sfn "$root" "$dir/glyphq"
echo "$dir"
