// The page: a grid of samples (temperature slider, seed), a pad to draw a digit on with its
// bits/dim, and blob loading (model.cfw next to the page, or a dropped/chosen file). All
// kernel work runs on the main thread in small slices (one sample or one score per task),
// so the slider and the pad stay responsive while the grid fills in.

import { Kernel, SIDE, PIXELS, describeBlob } from "./kernel.js";

const COLS = 6;
const ROWS = 6;
const CELLS = COLS * ROWS;
const GAP = 2;
const PAD_SCALE = 10; // the pad is 280x280: 10x10 pad pixels per model pixel
const BRUSH = 22;

const $ = (id) => document.getElementById(id);

const state = {
  kernel: null,
  modelBytes: null,
  modelName: null,
  grid: { next: CELLS, seed: 0n, temperature: 0.8, sampleMs: 0 },
  scoreDirty: false,
  lastScore: null,
  digit: null, // the held-out digit (digit.bin), once fetched
};

// ---------- scheduling: one slice of kernel work per task ----------

const channel = new MessageChannel();
let pumping = false;
channel.port1.onmessage = pump;
function schedule() {
  if (!pumping && state.kernel && state.modelBytes !== null) {
    pumping = true;
    channel.port2.postMessage(0);
  }
}

function pump() {
  pumping = false;
  if (state.modelBytes === null) return;
  if (state.scoreDirty) {
    state.scoreDirty = false;
    scorePad();
  } else if (state.grid.next < CELLS) {
    gridStep();
  }
  if (state.scoreDirty || state.grid.next < CELLS) schedule();
}

// ---------- the sample grid ----------

const grid = $("grid");
grid.width = COLS * SIDE + (COLS + 1) * GAP;
grid.height = ROWS * SIDE + (ROWS + 1) * GAP;
const gctx = grid.getContext("2d");
gctx.fillStyle = "#2a2f3b";
gctx.fillRect(0, 0, grid.width, grid.height);

function greyImage(ctx, pixels) {
  const img = ctx.createImageData(SIDE, SIDE);
  for (let p = 0; p < PIXELS; p++) {
    const v = pixels[p];
    img.data[4 * p] = v;
    img.data[4 * p + 1] = v;
    img.data[4 * p + 2] = v;
    img.data[4 * p + 3] = 255;
  }
  return img;
}

function readGridControls() {
  const t = Number($("temperature").value);
  $("temperature-value").value = t.toFixed(2);
  let seed = 0n;
  try {
    seed = BigInt.asUintN(64, BigInt(Math.max(0, Math.floor(Number($("seed").value) || 0))));
  } catch {
    seed = 0n;
  }
  return { seed, temperature: t };
}

function requestGrid() {
  const { seed, temperature } = readGridControls();
  Object.assign(state.grid, { next: 0, seed, temperature, sampleMs: 0 });
  schedule();
}

function gridStep() {
  const g = state.grid;
  const i = g.next;
  const t = performance.now();
  let pixels;
  try {
    pixels = state.kernel.sample(g.seed + BigInt(i), g.temperature);
  } catch (e) {
    g.next = CELLS;
    showGridMessage(`sampling failed: ${e.message}`);
    return;
  }
  g.sampleMs += performance.now() - t;
  const x = GAP + (i % COLS) * (SIDE + GAP);
  const y = GAP + Math.floor(i / COLS) * (SIDE + GAP);
  gctx.putImageData(greyImage(gctx, pixels), x, y);
  g.next = i + 1;
  if (g.next === CELLS) {
    const ms = g.sampleMs / CELLS;
    $("grid-stats").textContent =
      `seeds ${g.seed}…${g.seed + BigInt(CELLS - 1)} at temperature ${g.temperature.toFixed(2)}: ` +
      `${ms.toFixed(1)} ms per sample, ${(1000 / ms).toFixed(0)} samples/s (batch 1, this browser)`;
  }
}

function showGridMessage(text) {
  const o = $("grid-overlay");
  o.textContent = text;
  o.hidden = text === null;
}

$("temperature").addEventListener("input", requestGrid);
$("seed").addEventListener("input", requestGrid);
$("new-seed").addEventListener("click", () => {
  $("seed").value = String(Math.floor(Math.random() * 1e6));
  requestGrid();
});

// ---------- the drawing pad ----------

const pad = $("pad");
const pctx = pad.getContext("2d", { willReadFrequently: true });
const seen = $("seen");
const sctx = seen.getContext("2d");

function clearPad() {
  pctx.fillStyle = "#000";
  pctx.fillRect(0, 0, pad.width, pad.height);
  requestScore();
}

function padPoint(e) {
  const r = pad.getBoundingClientRect();
  return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
}

let last = null;
pad.addEventListener("pointerdown", (e) => {
  pad.setPointerCapture(e.pointerId);
  last = padPoint(e);
  pctx.fillStyle = "#fff";
  pctx.beginPath();
  pctx.arc(last[0], last[1], BRUSH / 2, 0, 2 * Math.PI);
  pctx.fill();
  requestScore();
});
pad.addEventListener("pointermove", (e) => {
  if (last === null) return;
  const p = padPoint(e);
  Object.assign(pctx, { strokeStyle: "#fff", lineWidth: BRUSH, lineCap: "round", lineJoin: "round" });
  pctx.beginPath();
  pctx.moveTo(last[0], last[1]);
  pctx.lineTo(p[0], p[1]);
  pctx.stroke();
  last = p;
  requestScore();
});
for (const end of ["pointerup", "pointercancel"]) pad.addEventListener(end, () => (last = null));

/** The pad as the model's 28x28 pixels: the mean of each 10x10 block (white strokes). */
function padPixels() {
  const d = pctx.getImageData(0, 0, pad.width, pad.height).data;
  const out = new Uint8Array(PIXELS);
  for (let y = 0; y < SIDE; y++) {
    for (let x = 0; x < SIDE; x++) {
      let sum = 0;
      for (let dy = 0; dy < PAD_SCALE; dy++) {
        const row = (y * PAD_SCALE + dy) * pad.width + x * PAD_SCALE;
        for (let dx = 0; dx < PAD_SCALE; dx++) sum += d[4 * (row + dx)];
      }
      out[y * SIDE + x] = Math.round(sum / (PAD_SCALE * PAD_SCALE));
    }
  }
  return out;
}

function requestScore() {
  state.scoreDirty = true;
  schedule();
}

function scorePad() {
  const pixels = padPixels();
  sctx.putImageData(greyImage(sctx, pixels), 0, 0);
  try {
    state.lastScore = state.kernel.score(pixels);
    $("bpd").textContent = state.lastScore.bitsPerDim.toFixed(3);
  } catch (e) {
    state.lastScore = null;
    $("bpd").textContent = "–";
    showError(`scoring failed: ${e.message}`);
  }
}

/** Puts 28x28 pixels on the pad, each as a 10x10 block (so padPixels reads them back exactly). */
function drawOnPad(pixels) {
  const small = document.createElement("canvas");
  small.width = small.height = SIDE;
  const c = small.getContext("2d");
  c.putImageData(greyImage(c, pixels), 0, 0);
  pctx.imageSmoothingEnabled = false;
  pctx.drawImage(small, 0, 0, pad.width, pad.height);
  requestScore();
}

$("clear").addEventListener("click", clearPad);
$("example").addEventListener("click", () => state.digit && drawOnPad(state.digit));

// ---------- models ----------

function showError(text) {
  const box = $("error");
  box.textContent = text ?? "";
  box.hidden = text === null;
}

/** Loads a blob; on refusal shows the kernel's message and keeps the previous model. */
function useBlob(bytes, name) {
  const k = state.kernel;
  const refused = k.loadBlob(bytes);
  if (refused === null) {
    state.modelBytes = bytes;
    state.modelName = name;
    showError(null);
    showGridMessage(null);
    $("model-info").innerHTML = "";
    $("model-info").append(Object.assign(document.createElement("b"), { textContent: name }),
      `: ${describeBlob(bytes)}`);
    updateReferences();
    requestGrid();
    requestScore();
    return true;
  }
  let text = `${name} was not loaded: ${refused}`;
  if (state.modelBytes !== null && k.loadBlob(state.modelBytes) === null) {
    text += `\nStill showing ${state.modelName}.`;
  } else {
    state.modelBytes = null;
    state.grid.next = CELLS;
    showGridMessage(`No model: ${refused}`);
    $("model-info").textContent = "no model loaded";
    $("bpd").textContent = "–";
  }
  showError(text);
  return false;
}

/** The bits/dim of the held-out digit and of an empty pad, as a scale for the score. */
function updateReferences() {
  const k = state.kernel;
  const parts = [];
  try {
    if (state.digit) {
      const d = k.score(state.digit).bitsPerDim;
      parts.push(`held-out digit ${k.checkDigitIndex} (a ${k.checkDigitLabel}): ${d.toFixed(3)}`);
    }
    parts.push(`an empty pad: ${k.score(new Uint8Array(PIXELS)).bitsPerDim.toFixed(3)}`);
  } catch (e) {
    parts.push(`(reference scores failed: ${e.message})`);
  }
  $("score-hint").textContent =
    `The density of the drawing under the model: lower means more likely, roughly more ` +
    `digit-like, but a flow also rates blank and very simple images highly. For scale, ` +
    `${parts.join("; ")}.`;
}

async function fetchBytes(url) {
  const r = await fetch(url, { cache: "no-cache" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${r.statusText}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function loadDefault() {
  try {
    useBlob(await fetchBytes("model.cfw"), "model.cfw");
  } catch (e) {
    showError(`the default model could not be fetched: ${e.message}`);
    showGridMessage("No model: drop a blob on the page.");
  }
}

async function useFile(file) {
  if (!file) return;
  try {
    useBlob(new Uint8Array(await file.arrayBuffer()), file.name);
  } catch (e) {
    showError(`${file.name} could not be read: ${e.message}`);
  }
}

$("file").addEventListener("change", (e) => {
  useFile(e.target.files[0]);
  e.target.value = "";
});
$("default-model").addEventListener("click", loadDefault);
document.addEventListener("dragover", (e) => {
  e.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (e) => {
  if (e.relatedTarget === null) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  useFile(e.dataTransfer.files[0]);
});

// ---------- start ----------

/**
 * Samples per second at batch 1 over `n` samples, seeds 2026.. at temperature 0.8 (the
 * firmware's, as the native and Node measurements use), for the benchmark script.
 */
function bench(n = 100) {
  const k = state.kernel;
  const [seed, temperature] = [k.checkSeed, k.checkTemperature];
  k.sample(seed, temperature); // untimed first sample, as the native measurement does
  const t = performance.now();
  for (let i = 0; i < n; i++) k.sample(seed + BigInt(i), temperature);
  const s = (performance.now() - t) / 1000;
  return { samples: n, seconds: s, samplesPerSecond: n / s, msPerSample: (1000 * s) / n };
}

async function start() {
  clearPad();
  readGridControls();
  let wasm;
  try {
    wasm = await fetchBytes("clayflow.wasm");
    state.kernel = await Kernel.instantiate(wasm);
  } catch (e) {
    showError(`the WebAssembly module could not be loaded: ${e.message}`);
    showGridMessage("No kernel.");
    return;
  }
  const k = state.kernel;
  $("footer").textContent =
    `Kernel: clayflow.wasm, ${wasm.length.toLocaleString("en")} bytes (no allocator, no imports). ` +
    `The grid's first cell at seed ${k.checkSeed}, temperature 0.80 is the sample that CI checks ` +
    `bit for bit against the native kernel.`;
  $("example").textContent = `held-out digit ${k.checkDigitIndex}`;
  try {
    state.digit = await fetchBytes("digit.bin");
    if (state.digit.length !== PIXELS) throw new Error(`${state.digit.length} bytes, expected ${PIXELS}`);
  } catch (e) {
    state.digit = null;
    $("example").disabled = true;
    $("example").title = `digit.bin: ${e.message}`;
  }
  await loadDefault();
}

window.clayflow = { state, bench, ready: start() };
