// Runs an ONNX model with onnxruntime-web's WebAssembly backend under Node.js.
//
//   node run_wasm.cjs MANIFEST.json
//
// MANIFEST: {"model": path, "inputs": [{"name", "dtype", "dims", "file"}], "outputs": [names],
//            "out_dir": dir, "threads": n,
//            "repeat": runs}. Input files hold raw little-endian data. Writes
// out_dir/output_<i>.bin (raw little-endian) and out_dir/result.json with each output's dtype and
// dims, the onnxruntime-web version, the backend and the graph optimization level. On failure,
// result.json holds {"error": stage + message} and the exit code is 1.
"use strict";
const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-web");

const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
  uint8: Uint8Array, int8: Int8Array, bool: Uint8Array,
};

function version() {
  // the package's "exports" hide package.json from require.resolve: read it beside its entry point
  let dir = path.dirname(require.resolve("onnxruntime-web"));
  while (!fs.existsSync(path.join(dir, "package.json"))) dir = path.dirname(dir);
  return JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).version;
}

async function main() {
  const manifest = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const result = { engine: "onnxruntime-web", version: version(), backend: "wasm", node: process.version,
                   graphOptimizationLevel: "all" };
  let stage = "load";
  try {
    ort.env.wasm.numThreads = manifest.threads || 1;
    ort.env.logLevel = "error";
    const session = await ort.InferenceSession.create(manifest.model, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    stage = "run";
    const feeds = {};
    for (const input of manifest.inputs) {
      const bytes = fs.readFileSync(input.file);
      const Array_ = ARRAYS[input.dtype];
      const data = new Array_(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
      feeds[input.name] = new ort.Tensor(input.dtype, data, input.dims);
    }
    let outputs = null;
    result.run_ms = [];
    for (let r = 0; r < (manifest.repeat || 1); r++) {
      const start = performance.now();
      const values = await session.run(feeds, manifest.outputs);
      result.run_ms.push(performance.now() - start);
      outputs = outputs || values;
    }
    result.outputs = manifest.outputs.map((name, i) => {
      const tensor = outputs[name];
      const data = tensor.data;
      fs.writeFileSync(path.join(manifest.out_dir, `output_${i}.bin`),
                       Buffer.from(data.buffer, data.byteOffset, data.byteLength));
      return { name, dtype: tensor.type, dims: tensor.dims };
    });
  } catch (e) {
    result.error = `${stage}: ${e && e.message ? e.message : e}`;
  }
  fs.writeFileSync(path.join(manifest.out_dir, "result.json"), JSON.stringify(result));
  process.exit(result.error ? 1 : 0);
}

main();
