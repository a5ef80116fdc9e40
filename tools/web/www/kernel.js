// The clayflow kernel's WebAssembly module (tools/web/src/abi.rs) behind a small class.
// Used by the page (app.js) and by the CI check in Node (../check.mjs), so the check runs
// the same glue as the page. No imports: the module needs nothing from JavaScript.

export const SIDE = 28;
export const PIXELS = SIDE * SIDE;

const utf8 = new TextDecoder();

/** A failure the kernel (or the module's own checks) reported, with its message. */
export class KernelError extends Error {}

export class Kernel {
  /** Instantiates the module from its bytes (ArrayBuffer or typed array). */
  static async instantiate(bytes) {
    const { instance } = await WebAssembly.instantiate(bytes, {});
    return new Kernel(instance.exports);
  }

  constructor(exports) {
    this.x = exports;
  }

  bytes(ptr, len) {
    return new Uint8Array(this.x.memory.buffer, ptr, len);
  }

  /** The message of the last failure (the kernel's words for a kernel error). */
  message() {
    return utf8.decode(this.bytes(this.x.cf_message_ptr(), this.x.cf_message_len()));
  }

  /**
   * Loads a weight blob (Uint8Array). Returns null when the kernel accepted it and the page
   * can use it, else the reason. Either way the previous model is gone.
   */
  loadBlob(blob) {
    const ptr = this.x.cf_blob_reserve(blob.length);
    if (ptr === 0) return this.message();
    this.bytes(ptr, blob.length).set(blob);
    return this.x.cf_load(blob.length) === 0 ? null : this.message();
  }

  /** One sample (seed: integer or BigInt, taken modulo 2^64). Returns its 784 pixels. */
  sample(seed, temperature) {
    if (this.x.cf_sample(BigInt.asUintN(64, BigInt(seed)), temperature) !== 0) {
      throw new KernelError(this.message());
    }
    return this.bytes(this.x.cf_pixels_ptr(), PIXELS).slice();
  }

  /** The last sample's dequantized f32 values. */
  values() {
    return new Float32Array(this.x.memory.buffer, this.x.cf_values_ptr(), PIXELS).slice();
  }

  /** FNV-1a (32 bit) of the last sample's f32 values, computed in the module. */
  checksum() {
    return this.x.cf_checksum() >>> 0;
  }

  /** log p (nats) and bits/dim of 784 pixels (0..255). */
  score(pixels) {
    this.bytes(this.x.cf_digit_ptr(), PIXELS).set(pixels);
    if (this.x.cf_score() !== 0) throw new KernelError(this.message());
    return { logProb: this.x.cf_log_prob(), bitsPerDim: this.x.cf_bits_per_dim() };
  }

  /** The firmware's fixed check inputs (tools/firmware/src/shared.rs). */
  get checkSeed() {
    return BigInt.asUintN(64, this.x.cf_check_seed());
  }
  get checkTemperature() {
    return this.x.cf_check_temperature();
  }
  get checkDigitIndex() {
    return this.x.cf_check_digit_index() >>> 0;
  }
  get checkDigitLabel() {
    return this.x.cf_check_digit_label() >>> 0;
  }
}

/** A short description of a blob the kernel accepted, from its header (kernel/FORMAT.md). */
export function describeBlob(blob) {
  const v = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const version = v.getUint16(8, true);
  const dtype = { 1: "f32", 2: "f16" }[v.getUint8(10)] ?? "?";
  const steps = v.getUint8(21);
  const levels = version >= 2 ? v.getUint8(18) : 1;
  const glow = version >= 2 && (v.getUint8(19) & 1) === 1;
  const hidden = v.getUint16(26, true);
  const params = v.getUint32(36, true);
  const kind = glow ? "Glow" : "RealNVP";
  const shape = levels > 1 ? `${levels} levels × ${steps / levels} steps` : `${steps} couplings`;
  return `${kind}, ${shape}, hidden ${hidden}, ${params.toLocaleString("en")} parameters, ` +
    `${dtype} weights, ${blob.length.toLocaleString("en")} bytes (format v${version})`;
}
