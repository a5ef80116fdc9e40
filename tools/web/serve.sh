#!/usr/bin/env bash
# Builds the page (build.sh) and serves tools/web/dist/ on http://127.0.0.1:PORT/ with
# Python's http.server until interrupted.
#
#   bash tools/web/serve.sh [--port N] [--blob PATH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port=8000
build_args=()
while (($#)); do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --blob) build_args+=(--blob "$2"); shift 2 ;;
        *) echo "usage: serve.sh [--port N] [--blob PATH]" >&2; exit 2 ;;
    esac
done
bash "$here/build.sh" "${build_args[@]}"
echo "serving tools/web/dist on http://127.0.0.1:$port/ (Ctrl-C stops)"
exec python3 -m http.server "$port" --bind 127.0.0.1 --directory "$here/dist"
