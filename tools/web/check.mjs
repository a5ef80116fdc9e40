// CI check of the WebAssembly module in Node: loads the module and a blob, samples with the
// firmware's seed and temperature, scores the firmware's held-out digit, and prints the
// firmware's `checksum:` and `digit:` lines, then the module's error messages for two
// damaged copies of the blob, exactly as `cargo run --example web_host -- BLOB` prints them
// (tools/web/ci.sh diffs the two). Uses the page's own glue (www/kernel.js).
//
//   node tools/web/check.mjs MODULE.wasm BLOB DIGIT            # the result lines
//   node tools/web/check.mjs MODULE.wasm BLOB DIGIT --time N   # samples/s at batch 1

import { readFileSync } from "node:fs";
import { Kernel, PIXELS } from "./www/kernel.js";

const usage = "usage: node check.mjs MODULE.wasm BLOB DIGIT [--time N]";

/** The f32 `v` as Rust's `{}` prints it: the shortest decimal that reads back as `v`. */
function rustF32(v) {
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
  if (v === 0) return Object.is(v, -0) ? "-0" : "0";
  for (let p = 1; p <= 9; p++) {
    const s = v.toExponential(p - 1);
    if (Math.fround(Number(s)) === v) return plain(s);
  }
  throw new Error(`no round-trip decimal for ${v}`); // 9 digits always round-trip an f32
}

/** "-1.2345e+3" -> "-1234.5" (Rust's Display never uses an exponent). */
function plain(s) {
  const [mantissa, exp] = s.split("e");
  const negative = mantissa.startsWith("-");
  const digits = mantissa.replace("-", "").replace(".", "").replace(/0+$/, "") || "0";
  const point = Number(exp) + 1; // digits before the decimal point
  let out;
  if (point <= 0) out = "0." + "0".repeat(-point) + digits;
  else if (point >= digits.length) out = digits + "0".repeat(point - digits.length);
  else out = digits.slice(0, point) + "." + digits.slice(point);
  return (negative ? "-" : "") + out;
}

const hex8 = (n) => "0x" + (n >>> 0).toString(16).padStart(8, "0");
const f32bits = (v) => hex8(new Uint32Array(new Float32Array([v]).buffer)[0]);

/** FNV-1a (32 bit) over the little-endian bytes of f32 values, as shared.rs computes it. */
function fnv1a32(values) {
  let h = 0x811c9dc5;
  for (const b of new Uint8Array(values.buffer, values.byteOffset, values.byteLength)) {
    h = Math.imul(h ^ b, 0x01000193);
  }
  return h >>> 0;
}

/** The two damaged copies of the blob that web_host.rs makes too. */
function damaged(blob) {
  const at = Math.floor(blob.length / 2);
  const flipped = blob.slice();
  flipped[at] ^= 0x40;
  return [
    [`byte ${at} xor 0x40`, flipped],
    ["last 100 bytes cut", blob.slice(0, Math.max(0, blob.length - 100))],
  ];
}

function fail(message) {
  console.error(`check.mjs: ${message}`);
  process.exit(1);
}

async function main(args) {
  const [wasmPath, blobPath, digitPath, ...rest] = args;
  if (!digitPath || !(rest.length === 0 || (rest.length === 2 && rest[0] === "--time"))) {
    fail(usage);
  }
  const kernel = await Kernel.instantiate(readFileSync(wasmPath));
  const blob = new Uint8Array(readFileSync(blobPath));
  const digit = new Uint8Array(readFileSync(digitPath));
  if (digit.length !== PIXELS) fail(`${digitPath}: ${digit.length} bytes, expected ${PIXELS}`);
  const refused = kernel.loadBlob(blob);
  if (refused !== null) fail(`${blobPath}: ${refused}`);
  const seed = kernel.checkSeed;
  const temperature = kernel.checkTemperature;

  if (rest.length === 2) {
    const n = Number(rest[1]);
    if (!(Number.isInteger(n) && n > 0)) fail(`--time ${rest[1]}: expected a positive number`);
    kernel.sample(seed, temperature); // untimed first sample, as web_host does
    const t = performance.now();
    for (let i = 0n; i < BigInt(n); i++) kernel.sample(seed + i, temperature);
    const s = (performance.now() - t) / 1e3;
    console.log(
      `node ${process.version}: ${n} samples (batch 1) in ${s.toFixed(3)} s: ` +
        `${(n / s).toFixed(1)} samples/s, ${((s * 1e3) / n).toFixed(2)} ms per sample`,
    );
    return;
  }

  kernel.sample(seed, temperature);
  const checksum = kernel.checksum();
  if (fnv1a32(kernel.values()) !== checksum) {
    fail("the module's checksum differs from the one computed here over its values");
  }
  const { logProb, bitsPerDim } = kernel.score(digit);
  const dtype = { 1: "f32", 2: "f16" }[blob[10]] ?? "?";
  const lines = [
    `checksum: ${hex8(checksum)} (${dtype} weights, seed ${seed}, temperature ${rustF32(temperature)}, FNV-1a over the f32 sample)`,
    `digit: held-out image ${kernel.checkDigitIndex} (label ${kernel.checkDigitLabel}): ` +
      `log_prob ${rustF32(logProb)} nats (${f32bits(logProb)}), ` +
      `${rustF32(bitsPerDim)} bits/dim (${f32bits(bitsPerDim)})`,
  ];
  for (const [label, bad] of damaged(blob)) {
    const message = kernel.loadBlob(bad);
    if (message === null) fail(`the damaged blob (${label}) loaded`);
    lines.push(`error (${label}): ${message}`);
  }
  // The module works again after refusals.
  if (kernel.loadBlob(blob) !== null) fail("reloading the blob after the refusals failed");
  kernel.sample(seed, temperature);
  if (kernel.checksum() !== checksum) fail("a second sample after reloading differs");
  console.log(lines.join("\n"));
}

await main(process.argv.slice(2));
