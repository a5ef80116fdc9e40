#!/usr/bin/env bash
# Outside CI: serves the page, opens it in headless Chromium (playwright-core), moves the
# slider, draws on the pad, drops a damaged blob, saves screenshots to OUTDIR (default
# docs/) and prints the page's sampling speed at batch 1.
# Installs chromium (apt-get) and playwright-core (npm, into tools/web/node_modules) when
# missing.
#
#   bash tools/web/screenshots.sh [--out DIR] [--blob PATH] [--bench N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/docs"
bench=200
port=8765
serve_args=()
while (($#)); do
    case "$1" in
        --out) out="$(realpath "$2")"; shift 2 ;;
        --blob) serve_args+=(--blob "$2"); shift 2 ;;
        --bench) bench="$2"; shift 2 ;;
        *) echo "usage: screenshots.sh [--out DIR] [--blob PATH] [--bench N]" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"

if ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [[ ! -d "$here/node_modules/playwright-core" ]]; then
    (cd "$here" && npm install --no-save --no-package-lock --silent playwright-core)
fi

log="$(mktemp)"
bash "$here/serve.sh" --port "$port" "${serve_args[@]}" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
    grep -q '^serving' "$log" && curl -sf "http://127.0.0.1:$port/" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
done
grep '^clayflow.wasm' "$log"
node "$here/screenshots.mjs" "http://127.0.0.1:$port/" "$out" "$bench"
