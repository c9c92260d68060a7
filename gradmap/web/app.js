// The page: loads model.json and the model, explains pictures, draws the maps, and answers the
// test hook (?image=URL&method=NAME[&samples=N]) with a JSON document in <pre id="result">.
import * as G from "./gradmap.js";

const params = new URLSearchParams(location.search);
const testMode = params.has("image");
const $ = (id) => document.getElementById(id);
const state = { config: null, session: null, backend: null, threads: 1, loadMs: null, firstMapMs: null, busy: false, last: null };

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
}

function showError(message) {
  const el = $("message");
  el.textContent = message;
  el.hidden = false;
  $("result").textContent = JSON.stringify({ error: message });
  document.body.dataset.state = "error";
}

function clearError() {
  $("message").hidden = true;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    if (/^https?:/.test(src)) script.crossOrigin = "anonymous";
    script.onload = resolve;
    script.onerror = () => reject(new Error(`cannot load onnxruntime-web from ${src}` +
      (/^https?:/.test(src) && !src.startsWith(location.origin) ? " (no network? build the site with gradmap web --ort-dist DIR to serve a local copy)" : "")));
    document.head.appendChild(script);
  });
}

async function fetchBytes(url, what, onProgress) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${what} (${url}): HTTP ${response.status}`);
  const total = Number(response.headers.get("content-length")) || 0;
  if (!response.body || !total) return new Uint8Array(await response.arrayBuffer());
  const reader = response.body.getReader();
  const bytes = new Uint8Array(total);
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes.set(value, received);
    received += value.length;
    onProgress(received / total);
  }
  return bytes;
}

// WebGPU when the browser has an adapter and the model is a portable export (a "cpu" export is
// lowered for onnxruntime's CPU provider, and WebGPU computes some of its forms wrongly or not at
// all); WebAssembly otherwise. ?backend=wasm|webgpu forces one, ?threads=N sets wasm threads.
async function chooseBackend(config) {
  const forced = params.get("backend");
  if (forced === "wasm" || forced === "webgpu") return { backend: forced, why: "chosen by ?backend" };
  if (config.target !== "portable") return { backend: "wasm", why: `the model is a '${config.target}' export` };
  if (!("gpu" in navigator)) return { backend: "wasm", why: "this browser has no WebGPU" };
  try {
    if (await navigator.gpu.requestAdapter()) return { backend: "webgpu", why: "portable model, WebGPU adapter found" };
  } catch (e) { /* fall through */ }
  return { backend: "wasm", why: "no WebGPU adapter" };
}

async function createSession(config, modelBytes) {
  const ortConfig = config.ort;
  const choice = await chooseBackend(config);
  const threads = params.has("threads") ? Math.max(1, parseInt(params.get("threads"), 10) || 1)
    : self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const script = choice.backend === "webgpu" ? ortConfig.webgpu_script : ortConfig.wasm_script;
  if (!script) throw new Error(`this site has no onnxruntime-web files for ${choice.backend}`);
  const base = new URL(ortConfig.base, location.href).href; // onnxruntime imports its .mjs from here
  await loadScript(base + script);
  const ort = self.ort;
  ort.env.wasm.wasmPaths = base;
  ort.env.wasm.numThreads = threads;
  const options = { executionProviders: [choice.backend], graphOptimizationLevel: "all" };
  try {
    const session = await ort.InferenceSession.create(modelBytes, options);
    return { session, backend: choice.backend, why: choice.why, threads };
  } catch (e) {
    if (choice.backend !== "webgpu") throw e;
    const session = await ort.InferenceSession.create(modelBytes, { ...options, executionProviders: ["wasm"] });
    return { session, backend: "wasm", why: `WebGPU failed (${e.message}); fell back to WebAssembly`, threads };
  }
}

// ---------------------------------------------------------------- running the model
function feeds(config, images, n, targets) {
  const [h, w] = config.input_size;
  return {
    [config.inputs.image]: new self.ort.Tensor("float32", images, [n, 3, h, w]),
    [config.inputs.target]: new self.ort.Tensor("int64", BigInt64Array.from(targets, (t) => BigInt(t)), [n]),
  };
}

async function run(images, n, targets, outputs) {
  const config = state.config;
  const names = [config.outputs.logits, config.outputs.target_index, ...outputs.map((o) => config.outputs[o])];
  const result = await state.session.run(feeds(config, images, n, targets), names);
  return {
    logits: result[config.outputs.logits].data,
    targetIndex: Array.from(result[config.outputs.target_index].data, Number),
    ...Object.fromEntries(outputs.map((o) => [o, result[config.outputs[o]]])),
  };
}

/** The method's attribution of one input: {logits, targetIndex, values [C, h, w], channels}. */
async function attribute(method, tensor, options, progress) {
  const config = state.config;
  const [h, w] = config.input_size;
  const size = h * w;
  if (method === "vanilla" || method === "gradient-x-input") {
    const out = await run(tensor, 1, [-1], ["gradient"]);
    let values = out.gradient.data;
    if (method === "gradient-x-input") values = Float32Array.from(values, (g, i) => g * tensor[i]);
    return { logits: out.logits, targetIndex: out.targetIndex[0], values, channels: 3 };
  }
  if (method === "guided-backprop" || method === "deconvnet") {
    const output = method === "guided-backprop" ? "gradient_guided" : "gradient_deconvnet";
    const out = await run(tensor, 1, [-1], [output]);
    return { logits: out.logits, targetIndex: out.targetIndex[0], values: out[output].data, channels: 3 };
  }
  if (method === "smoothgrad") {
    const first = await run(tensor, 1, [-1], []);
    const target = first.targetIndex[0];
    const samples = options.samples, noise = options.noise;
    let low = Infinity, high = -Infinity;
    for (const v of tensor) { low = Math.min(low, v); high = Math.max(high, v); }
    const sigma = noise * (high - low);
    const normal = G.normalStream(options.seed);
    const sum = new Float64Array(tensor.length);
    const batch = config.fixed_batch || Math.min(samples, 8);
    for (let done = 0; done < samples; done += batch) {
      const n = config.fixed_batch || Math.min(batch, samples - done);
      const noisy = new Float32Array(n * tensor.length);
      for (let i = 0; i < noisy.length; i++) noisy[i] = tensor[i % tensor.length] + Math.fround(normal() * sigma);
      const out = await run(noisy, n, new Array(n).fill(target), ["gradient"]);
      const g = out.gradient.data;
      const used = Math.min(n, samples - done);
      for (let s = 0; s < used; s++) for (let i = 0; i < tensor.length; i++) sum[i] += g[s * tensor.length + i];
      progress(`SmoothGrad: ${Math.min(done + used, samples)} of ${samples} noisy copies`);
    }
    return { logits: first.logits, targetIndex: target, values: Float32Array.from(sum, (v) => v / samples), channels: 3 };
  }
  if (method === "grad-cam" || method === "grad-cam++" || method === "guided-grad-cam") {
    const outputs = ["cam_activation", "cam_gradient", ...(method === "guided-grad-cam" ? ["gradient_guided"] : [])];
    const out = await run(tensor, 1, [-1], outputs);
    const [, channels, ch, cw] = out.cam_activation.dims;
    const activation = out.cam_activation.data, gradient = out.cam_gradient.data;
    if (method === "guided-grad-cam") {
      const cam = G.upsampleNearest(G.gradCam(activation, gradient, channels, ch * cw), ch, cw, h, w);
      const guided = out.gradient_guided.data;
      return { logits: out.logits, targetIndex: out.targetIndex[0], values: Float32Array.from(guided, (g, i) => g * cam[i % size]), channels: 3 };
    }
    const cam = (method === "grad-cam" ? G.gradCam : G.gradCamPlusPlus)(activation, gradient, channels, ch * cw);
    return { logits: out.logits, targetIndex: out.targetIndex[0], values: G.zoomBilinear(cam, ch, cw, h, w, true), channels: 1 };
  }
  throw new Error(`unknown method ${method}`);
}

// ---------------------------------------------------------------- pictures in
async function decode(blob, name) {
  if (!blob.size) throw new Error(`${name}: empty file`);
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", premultiplyAlpha: "none", colorSpaceConversion: "none" });
  } catch (e) {
    throw new Error(`${name}: not a picture this browser can decode (${blob.type || "unknown type"}, ${blob.size} bytes): the file is corrupt or not an image`);
  }
  const { width, height } = bitmap;
  if (width * height > state.config.max_pixels) {
    throw new Error(`${name}: ${width}x${height} is over the limit of ${state.config.max_pixels} pixels`);
  }
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  return { rgb: G.rgbaToRGB(rgba, width, height), width, height };
}

// ---------------------------------------------------------------- explaining one picture
function drawRGBA(canvas, rgba, width, height) {
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
}

function rgbToRGBA(rgb) {
  const out = new Uint8ClampedArray((rgb.length / 3) * 4);
  for (let i = 0, n = rgb.length / 3; i < n; i++) {
    out[i * 4] = rgb[i * 3]; out[i * 4 + 1] = rgb[i * 3 + 1]; out[i * 4 + 2] = rgb[i * 3 + 2]; out[i * 4 + 3] = 255;
  }
  return out;
}

async function explain(blob, name) {
  if (state.busy) return;
  state.busy = true;
  document.body.dataset.state = "running";
  clearError();
  $("result").textContent = "";
  const config = state.config;
  const method = $("method").value;
  const samples = Math.max(1, parseInt($("samples").value, 10) || config.smoothgrad.samples);
  try {
    const picture = await decode(blob, name);
    setStatus(`explaining ${name} with ${method}…`, "busy");
    await new Promise((r) => setTimeout(r, 0)); // let the status show before the work starts
    const start = performance.now();
    const { tensor, geometry } = G.preprocess(picture.rgb, picture.width, picture.height, config.preprocessing);
    const [h, w] = config.input_size;
    const noise = params.has("noise") ? Number(params.get("noise")) : config.smoothgrad.noise;
    const a = await attribute(method, tensor, { samples, noise, seed: 0 }, (t) => setStatus(t, "busy"));
    G.checkFinite(a.logits, "logits");
    const reduced = G.reduceMax(a.values, a.channels, h * w);
    const normalized = G.normalizeMinMax(reduced);
    const equalized = G.equalizeHistogram(reduced);
    const raw = G.mapToOriginal(normalized, h, w, geometry);
    const shown = G.mapToOriginal(equalized, h, w, geometry);
    const overlay = G.mapToOriginal(G.overlayValues(normalized, config.overlay), h, w, geometry);
    const ms = performance.now() - start;
    if (state.firstMapMs === null) state.firstMapMs = performance.now();
    const table = config.colormap.table;
    const { width, height } = picture;
    drawRGBA($("picture"), rgbToRGBA(picture.rgb), width, height);
    drawRGBA($("heatmap"), G.heatmapRGBA(shown.values, shown.covered, table), width, height);
    drawRGBA($("overlay"), G.overlayRGBA(picture.rgb, overlay.values, overlay.covered, table, config.overlay.alpha, true), width, height);
    const probabilities = G.softmax(a.logits);
    const predictions = G.topK(probabilities, Math.min(5, probabilities.length)).map((i) => ({
      index: i, label: config.labels[i], probability: probabilities[i] }));
    showPredictions(predictions, a.targetIndex);
    const backendName = state.backend === "webgpu" ? "WebGPU" : `WebAssembly, ${state.threads} thread${state.threads > 1 ? "s" : ""}`;
    setStatus(`${method} map of ${config.labels[a.targetIndex]} in ${ms.toFixed(0)} ms (${backendName})`, "done");
    state.last = name;
    $("download").disabled = false;
    const result = {
      source: name, method, predictions, target: { index: a.targetIndex, label: config.labels[a.targetIndex] },
      backend: state.backend, threads: state.threads, ms, load_ms: state.loadMs, first_map_ms: state.firstMapMs,
      size: [height, width],
    };
    if (method === "smoothgrad") Object.assign(result, { samples, noise });
    if (testMode) result.map = { shape: [height, width], dtype: "float32", data: G.float32ToBase64(raw.values) };
    $("result").textContent = JSON.stringify(result);
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus("ready", "");
    showError(e.message || String(e));
  } finally {
    state.busy = false;
  }
  // the method was switched while this map was computed: explain the picture again with the new one
  if ($("method").value !== method && state.lastBlob && document.body.dataset.state === "done") {
    await explain(state.lastBlob, name);
  }
}

function showPredictions(predictions, target) {
  const list = $("predictions");
  list.textContent = "";
  for (const p of predictions) {
    const row = document.createElement("li");
    if (p.index === target) row.className = "explained";
    const label = document.createElement("span");
    label.textContent = p.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(p.probability * 100).toFixed(1)}%`;
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = `${(p.probability * 100).toFixed(1)} %`;
    row.append(label, bar, value);
    list.append(row);
  }
}

async function explainURL(url) {
  let blob;
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    blob = await response.blob();
  } catch (e) {
    showError(`${url}: cannot fetch it (${e.message})`);
    return;
  }
  state.lastBlob = blob;
  await explain(blob, decodeURIComponent(url.split("/").pop()));
}

// ---------------------------------------------------------------- wiring
function setUp(config) {
  $("title").textContent = `gradmap: ${config.source_model}`;
  const select = $("method");
  for (const m of config.methods) {
    const option = document.createElement("option");
    option.value = option.textContent = m;
    select.append(option);
  }
  const wanted = params.get("method") || "vanilla";
  select.value = config.methods.includes(wanted) ? wanted : "vanilla";
  $("samples").value = params.get("samples") || config.smoothgrad.samples;
  const syncSamples = () => { $("samples-label").hidden = select.value !== "smoothgrad"; };
  select.addEventListener("change", () => { syncSamples(); if (state.lastBlob) explain(state.lastBlob, state.last); });
  syncSamples();
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) { state.lastBlob = file; explain(file, file.name); }
    e.target.value = "";
  });
  document.body.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("drag"); });
  document.body.addEventListener("dragleave", () => document.body.classList.remove("drag"));
  document.body.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("drag");
    const file = e.dataTransfer.files[0];
    if (file) { state.lastBlob = file; explain(file, file.name); }
  });
  const examples = $("examples");
  for (const example of config.examples) {
    const button = document.createElement("button");
    const img = document.createElement("img");
    img.src = example;
    img.alt = button.title = example.split("/").pop();
    button.append(img);
    button.addEventListener("click", async () => {
      try {
        const response = await fetch(example);
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        state.lastBlob = await response.blob();
      } catch (e) {
        showError(`${example}: cannot fetch it (${e.message})`);
        return;
      }
      explain(state.lastBlob, example.split("/").pop());
    });
    examples.append(button);
  }
  $("download").addEventListener("click", () => {
    $("overlay").toBlob((blob) => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${state.last || "picture"}.overlay.png`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    }, "image/png");
  });
}

async function main() {
  document.body.dataset.state = "loading";
  try {
    const response = await fetch("model.json");
    if (!response.ok) throw new Error(`cannot fetch model.json: HTTP ${response.status}`);
    const config = await response.json();
    state.config = config;
    setUp(config);
    const start = performance.now();
    const bytes = await fetchBytes(config.model, "the model", (f) => setStatus(`loading the model: ${(f * 100).toFixed(0)} %`, "busy"));
    setStatus("starting onnxruntime-web…", "busy");
    const { session, backend, why, threads } = await createSession(config, bytes);
    Object.assign(state, { session, backend, threads, loadMs: performance.now() - start });
    $("backend").textContent = `${backend === "webgpu" ? "WebGPU" : `WebAssembly (${threads} thread${threads > 1 ? "s" : ""})`}: ${why}; onnxruntime-web ${config.ort.version}, model loaded in ${(state.loadMs / 1000).toFixed(1)} s`;
    setStatus("ready: choose or drop a picture", "");
    document.body.dataset.state = "ready";
  } catch (e) {
    setStatus("failed", "error");
    showError(e.message || String(e));
    return;
  }
  if (testMode) await explainURL(params.get("image"));
}

main();
