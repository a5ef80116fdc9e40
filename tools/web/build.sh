#!/usr/bin/env bash
# Builds the kernel for wasm32-unknown-unknown and assembles the static page in
# tools/web/dist/: index.html, app.js, kernel.js, clayflow.wasm, the default blob
# (model.cfw, a copy of tools/firmware/model-glow-f16.cfw or of --blob PATH) and the held-out
# digit the page offers (digit.bin). Prints the module's size.
#
#   bash tools/web/build.sh [--blob PATH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
blob="$root/tools/firmware/model-glow-f16.cfw"
while (($#)); do
    case "$1" in
        --blob) blob="$(realpath "$2")"; shift 2 ;;
        *) echo "usage: build.sh [--blob PATH]" >&2; exit 2 ;;
    esac
done
[[ -f "$blob" ]] || { echo "build.sh: no blob at $blob" >&2; exit 1; }

(cd "$here" && cargo build --release --locked --target wasm32-unknown-unknown --quiet)
wasm="$here/target/wasm32-unknown-unknown/release/clayflow_web.wasm"

dist="$here/dist"
rm -rf "$dist"
mkdir -p "$dist"
cp "$here/www/index.html" "$here/www/app.js" "$here/www/kernel.js" "$dist/"
cp "$wasm" "$dist/clayflow.wasm"
cp "$blob" "$dist/model.cfw"
cp "$root/tools/firmware/digit.bin" "$dist/digit.bin"
echo "clayflow.wasm: $(stat -c %s "$dist/clayflow.wasm") bytes (model.cfw: $(stat -c %s "$dist/model.cfw") bytes from ${blob#"$root"/})"
