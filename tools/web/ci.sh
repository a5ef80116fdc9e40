#!/usr/bin/env bash
# CI for the web page's WebAssembly module (its own cargo workspace, so the root's fmt and
# clippy do not cover it): fmt and clippy, its unit tests on the host (the error texts
# against the kernel's Display, the MNIST-shape check), builds it for wasm32-unknown-unknown,
# checks that it has no imports, then has Node load it with the default blob
# (tools/firmware/model-glow-f16.cfw), sample with the firmware's seed and temperature and
# score the firmware's held-out digit, and compares those lines (and the error messages for
# two damaged blobs) with the host kernel's (examples/web_host.rs) byte for byte.
# Installs Node with apt-get when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
blob="$root/tools/firmware/model-glow-f16.cfw"
digit="$root/tools/firmware/digit.bin"
step() { printf '\n==> %s\n' "$*"; }

step "web tools"
if ! command -v node >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null
fi
node --version
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true

step "fmt, clippy (wasm32, and host: tests and examples), the module's unit tests (host)"
(
    cd "$here"
    cargo fmt --check
    cargo clippy --release --locked --quiet --target wasm32-unknown-unknown -- -D warnings
    cargo clippy --release --locked --quiet --all-targets -- -D warnings
    cargo test --release --locked --quiet
)

step "build the module (wasm32-unknown-unknown)"
bash "$here/build.sh"
wasm="$here/dist/clayflow.wasm"
node -e '
const m = new WebAssembly.Module(require("fs").readFileSync(process.argv[1]));
const imports = WebAssembly.Module.imports(m);
if (imports.length) { console.error("FAIL: the module imports", imports); process.exit(1); }
console.log("imports: none; exports:", WebAssembly.Module.exports(m).map(e => e.name).join(" "));
' "$wasm"

step "host kernel vs the module in Node (same blob, seed, temperature, digit)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The test profile reuses the build of `cargo test` earlier in .ci/run.
(cd "$root" && cargo run --profile "${WEB_HOST_PROFILE:-test}" --quiet --example web_host -- "$blob") >"$work/host.txt"
node "$here/check.mjs" "$wasm" "$blob" "$digit" >"$work/wasm.txt"
cat "$work/wasm.txt"
if ! diff -u "$work/host.txt" "$work/wasm.txt"; then
    echo "FAIL: the module's results differ from the host kernel's (not bit-identical)" >&2
    exit 1
fi
echo "wasm and host agree bit for bit"
