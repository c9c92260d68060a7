// The page: loads model.json and the model, explains pictures, draws the maps, and answers the
// test hook (?image=URL&method=NAME[&SETTING=VALUE...]) with a JSON document in <pre id="result">.
// Methods, their settings and their implementations (methods.js) come from the method table in
// model.json (gradmap/contract.py): nothing here names a method.
import * as G from "./gradmap.js";
import * as M from "./methods.js";

const params = new URLSearchParams(location.search);
const testMode = params.has("image");
const $ = (id) => document.getElementById(id);
const state = { config: null, session: null, backend: null, threads: 1, loadMs: null, firstMapMs: null, busy: false, last: null,
  table: {}, settingValues: {} };

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

/** Run the model on `n` images; `names` are the outputs wanted besides the logits (see methods.js). */
async function run(images, n, targets, names) {
  const config = state.config;
  const wanted = [...new Set([config.outputs.logits, ...names])];
  const outputs = await state.session.run(feeds(config, images, n, targets), wanted);
  const targetIndex = outputs[config.outputs.target_index];
  return {
    logits: outputs[config.outputs.logits].data,
    targetIndex: targetIndex ? Array.from(targetIndex.data, Number) : [],
    outputs,
  };
}

/** The method's attribution of one input: {logits, targetIndex, values [C, h, w], channels}. */
async function attribute(method, tensor, settings, progress) {
  const config = state.config;
  const [h, w] = config.input_size;
  const ctx = { run, outputs: config.outputs, gradientOutputs: config.gradient_outputs, inputSize: config.input_size,
    fixedBatch: config.fixed_batch };
  const implementation = M[method.web];
  if (typeof implementation !== "function") throw new Error(`${method.name}: this page has no implementation ${method.web}`);
  const a = await implementation(ctx, method, tensor, settings, progress);
  return { ...a, channels: a.values.length / (h * w) };
}

/** The selected method's settings, from its controls, checked against the method table. */
function settingsOf(method) {
  return Object.fromEntries(method.settings.map((s) => [s.name, G.checkSetting(s, state.settingValues[s.name], method.name)]));
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
  const method = state.table[$("method").value];
  try {
    const settings = settingsOf(method);
    const picture = await decode(blob, name);
    setStatus(`explaining ${name} with ${method.name}…`, "busy");
    await new Promise((r) => setTimeout(r, 0)); // let the status show before the work starts
    const start = performance.now();
    const { tensor, geometry } = G.preprocess(picture.rgb, picture.width, picture.height, config.preprocessing);
    const [h, w] = config.input_size;
    const a = await attribute(method, tensor, settings, (t) => setStatus(t, "busy"));
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
    setStatus(`${method.name} map of ${config.labels[a.targetIndex]} in ${ms.toFixed(0)} ms (${backendName})`, "done");
    state.last = name;
    $("download").disabled = false;
    const result = {
      source: name, method: method.name, predictions, target: { index: a.targetIndex, label: config.labels[a.targetIndex] },
      backend: state.backend, threads: state.threads, ms, load_ms: state.loadMs, first_map_ms: state.firstMapMs,
      size: [height, width], ...settings,
    };
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
  if ($("method").value !== method.name && state.lastBlob && document.body.dataset.state === "done") {
    await explain(state.lastBlob, name);
  }
}

/** One control per setting of the method: a number field (the table's range) or a list of choices. */
function showSettings(method) {
  const box = $("settings");
  box.textContent = "";
  for (const s of method.settings) {
    const label = document.createElement("label");
    label.title = s.help;
    let control;
    if (s.type === "choice") {
      control = document.createElement("select");
      for (const choice of s.choices) {
        const option = document.createElement("option");
        option.value = option.textContent = choice;
        control.append(option);
      }
    } else {
      control = document.createElement("input");
      control.type = "number";
      control.step = s.type === "int" ? "1" : "any";
      if (s.minimum !== null) control.min = String(s.minimum);
      if (s.maximum !== null) control.max = String(s.maximum);
    }
    control.id = `setting-${s.name}`;
    control.value = state.settingValues[s.name];
    control.addEventListener("change", () => { state.settingValues[s.name] = control.value; });
    label.append(`${s.name} `, control);
    box.append(label);
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
  state.table = Object.fromEntries(config.method_table.map((m) => [m.name, m]));
  for (const m of config.methods) {
    const option = document.createElement("option");
    option.value = option.textContent = m;
    option.title = state.table[m].summary;
    select.append(option);
  }
  const fallback = config.methods.includes(config.default_method) ? config.default_method : config.methods[0];
  const wanted = params.get("method") || fallback;
  select.value = config.methods.includes(wanted) ? wanted : fallback;
  // every setting starts at the table's default (model.json's, for this page), or at ?NAME=VALUE
  for (const m of config.method_table) {
    for (const s of m.settings) {
      if (!(s.name in state.settingValues)) state.settingValues[s.name] = params.has(s.name) ? params.get(s.name) : String(s.default);
    }
  }
  showSettings(state.table[select.value]);
  select.addEventListener("change", () => { showSettings(state.table[select.value]); if (state.lastBlob) explain(state.lastBlob, state.last); });
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
    G.checkModelFormat(config.format_version, config.preprocessing);
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
