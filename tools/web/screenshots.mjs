// Drives the served page in headless Chromium (playwright-core): waits for the grid, moves
// the temperature slider, draws a stroke on the pad, loads the held-out digit, chooses and
// drops damaged blobs, opens the page with a default blob it refuses, and saves a
// screenshot after each step; then measures sampling speed at batch 1 in the page. Run by screenshots.sh, which serves the page and installs what this
// needs.
//
//   node tools/web/screenshots.mjs URL OUTDIR [BENCH_SAMPLES]

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, outDir, benchArg = "200"] = process.argv.slice(2);
if (!url || !outDir) {
  console.error("usage: node screenshots.mjs URL OUTDIR [BENCH_SAMPLES]");
  process.exit(2);
}

const profile = mkdtempSync(join(tmpdir(), "clayflow-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1120, height: 900 },
  deviceScaleFactor: 1,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const problems = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });

  const gridDone = () =>
    page.waitForFunction(
      () => window.clayflow?.state.grid.next === 36 && !window.clayflow.state.scoreDirty,
      null,
      { timeout: 60_000 },
    );
  const shot = async (name) => {
    const path = join(outDir, name);
    await page.screenshot({ path, fullPage: true });
    console.log(`saved ${path}`);
  };

  await page.goto(url);
  await page.evaluate(() => window.clayflow.ready);
  await gridDone();
  await shot("web-1-loaded.png");

  // Drag the slider's thumb from 0.8 to about 0.4 in small moves (input events as it moves).
  const slider = await page.locator("#temperature").boundingBox();
  const at = (t) => slider.x + 8 + ((slider.width - 16) * t) / 1.5;
  const y = slider.y + slider.height / 2;
  await page.mouse.move(at(0.8), y);
  await page.mouse.down();
  for (let i = 1; i <= 10; i++) await page.mouse.move(at(0.8 - 0.04 * i), y);
  await page.mouse.up();
  await gridDone();
  console.log(`temperature after the drag: ${await page.inputValue("#temperature")}`);
  await shot("web-2-slider.png");

  // Draw a "7" on the pad: a bar, then a slanted stroke down.
  const pad = await page.locator("#pad").boundingBox();
  const p = (x, y) => [pad.x + x, pad.y + y];
  const stroke = async (points) => {
    await page.mouse.move(...p(...points[0]));
    await page.mouse.down();
    for (let i = 1; i < points.length; i++) {
      const [x0, y0] = points[i - 1];
      const [x1, y1] = points[i];
      for (let s = 1; s <= 12; s++) {
        await page.mouse.move(...p(x0 + ((x1 - x0) * s) / 12, y0 + ((y1 - y0) * s) / 12));
      }
    }
    await page.mouse.up();
  };
  await stroke([[80, 70], [200, 68], [135, 225]]);
  await gridDone();
  const drawn = await page.evaluate(() => window.clayflow.state.lastScore);
  console.log(`drawn 7: ${drawn.bitsPerDim} bits/dim`);
  await shot("web-3-drawn.png");

  await page.click("#example");
  await gridDone();
  const held = await page.evaluate(() => window.clayflow.state.lastScore);
  console.log(`held-out digit on the pad: ${held.bitsPerDim} bits/dim (log_prob ${held.logProb})`);
  await shot("web-4-held-out.png");

  // A damaged copy of the default blob, chosen through the file input.
  const damaged = await page.evaluate(async () => {
    const b = new Uint8Array(await (await fetch("model.cfw")).arrayBuffer());
    b[b.length >> 1] ^= 0x40;
    return Array.from(b);
  });
  await page.setInputFiles("#file", {
    name: "damaged.cfw",
    mimeType: "application/octet-stream",
    buffer: Buffer.from(damaged),
  });
  await page.waitForSelector("#error:not([hidden])");
  console.log(`error shown: ${await page.textContent("#error")}`);
  await shot("web-5-error.png");

  // Drag and drop: a truncated copy (refused), then the intact blob (accepted again).
  const drop = (cut) =>
    page.evaluate(async (cut) => {
      const b = new Uint8Array(await (await fetch("model.cfw")).arrayBuffer());
      const data = new DataTransfer();
      data.items.add(new File([b.slice(0, b.length - cut)], cut ? "cut.cfw" : "intact.cfw"));
      document.dispatchEvent(new DragEvent("drop", { dataTransfer: data, cancelable: true }));
    }, cut);
  await drop(100);
  await page.waitForFunction(() => document.querySelector("#error").textContent.startsWith("cut.cfw"));
  console.log(`dropped a truncated blob: ${await page.textContent("#error")}`);
  await drop(0);
  await page.waitForSelector("#error", { state: "hidden" });
  await gridDone();
  console.log(`dropped the intact blob: ${await page.textContent("#model-info")}`);

  // A default blob the page refuses, on a fresh load (no previous model to keep): the
  // default one with its image size patched to 32x32 and its CRC-32 recomputed. That is a
  // valid blob (the parameter count does not depend on the image size), but not MNIST-shaped.
  const patched = await page.evaluate(async () => {
    const b = new Uint8Array(await (await fetch("model.cfw")).arrayBuffer());
    const v = new DataView(b.buffer);
    v.setUint16(12, 32, true);
    v.setUint16(14, 32, true);
    let crc = ~0;
    for (const x of b.subarray(0, b.length - 4)) {
      crc ^= x;
      for (let k = 0; k < 8; k++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
    }
    v.setUint32(b.length - 4, ~crc >>> 0, true);
    return Array.from(b);
  });
  const refused = await context.newPage();
  refused.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  await refused.route("**/model.cfw", (route) =>
    route.fulfill({ status: 200, contentType: "application/octet-stream", body: Buffer.from(patched) }),
  );
  await refused.goto(url);
  await refused.evaluate(() => window.clayflow.ready);
  await refused.waitForSelector("#grid-overlay:not([hidden])");
  console.log(`refused default blob: ${await refused.textContent("#error")}`);
  const path = join(outDir, "web-6-refused.png");
  await refused.screenshot({ path, fullPage: true });
  console.log(`saved ${path}`);
  await refused.close();

  const n = Number(benchArg);
  const ua = await page.evaluate(() => navigator.userAgent);
  const bench = await page.evaluate((n) => window.clayflow.bench(n), n);
  console.log(
    `browser (${ua.match(/(Headless)?Chrom(e|ium)\/[\d.]+/)?.[0] ?? ua}): ${bench.samples} samples ` +
      `(batch 1) in ${bench.seconds.toFixed(3)} s: ${bench.samplesPerSecond.toFixed(1)} samples/s, ` +
      `${bench.msPerSample.toFixed(2)} ms per sample`,
  );
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
