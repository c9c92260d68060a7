// The page's implementations of gradmap's attribution methods. The method table (gradmap/contract.py,
// METHOD_TABLE) names, per method, one function exported here (its `web` field); the page calls it as
//
//   await fn(ctx, method, tensor, settings, progress)
//     ctx       { run(images, n, targets, names) -> { logits, targetIndex: number[], outputs: {name: tensor} },
//                 outputs (model.json's output names), gradientOutputs, inputSize: [h, w], fixedBatch }
//     method    the method's row of the table, from model.json (name, kind, outputs, settings...)
//     tensor    the preprocessed picture, float32 [3, h, w]
//     settings  the method's settings, checked against the table ({name: value})
//     progress  (text) => void, for long computations
//
// and it returns { logits, targetIndex, values } with values float32 [C, h, w] (C = 3 for pixel
// attributions, 1 for a class activation map on the input grid), as gradmap.runtime's implementation
// of the same row (its `implementation` field) computes them. Adding a method the page computes means
// a table row and a function here; nothing in app.js names a method.
import * as G from "./gradmap.js";

/** The one gradient output among the outputs a method reads (gradient, gradient_guided...). */
function gradientOutput(ctx, method) {
  const found = method.outputs.filter((name) => ctx.gradientOutputs.includes(name));
  if (found.length !== 1) throw new Error(`${method.name} reads ${found.length} gradient outputs, not one`);
  return found[0];
}

/** The gradient output the method reads, as the model computed it (runtime.methods.model_gradient_method). */
export async function modelGradient(ctx, method, tensor) {
  const out = await ctx.run(tensor, 1, [-1], method.outputs);
  return { logits: out.logits, targetIndex: out.targetIndex[0], values: out.outputs[gradientOutput(ctx, method)].data };
}

/** The gradient times the input (runtime.methods.gradient_x_input_method). */
export async function gradientTimesInput(ctx, method, tensor) {
  const a = await modelGradient(ctx, method, tensor);
  return { ...a, values: Float32Array.from(a.values, (g, i) => g * tensor[i]) };
}

/**
 * The gradient over `samples` noisy copies (runtime.methods.smoothgrad): noise sigma = `noise` times the
 * input's value range, seeded by `seed`; `variant` plain (mean), squared (mean of squares) or vargrad
 * (variance). The noise comes from the page's own generator, so maps equal gradmap run's in
 * distribution, not draw for draw.
 */
export async function smoothGrad(ctx, method, tensor, settings, progress) {
  const output = gradientOutput(ctx, method);
  const first = await ctx.run(tensor, 1, [-1], [ctx.outputs.target_index]);
  const target = first.targetIndex[0];
  const { samples, noise, variant, seed } = settings;
  let low = Infinity, high = -Infinity;
  for (const v of tensor) { low = Math.min(low, v); high = Math.max(high, v); }
  const sigma = noise * (high - low);
  const normal = G.normalStream(seed);
  const sum = new Float64Array(tensor.length), squares = new Float64Array(tensor.length);
  const batch = ctx.fixedBatch || Math.min(samples, 8);
  for (let done = 0; done < samples; done += batch) {
    const n = ctx.fixedBatch || Math.min(batch, samples - done);
    const noisy = new Float32Array(n * tensor.length);
    for (let i = 0; i < noisy.length; i++) noisy[i] = tensor[i % tensor.length] + Math.fround(normal() * sigma);
    const out = await ctx.run(noisy, n, new Array(n).fill(target), [output]);
    const g = out.outputs[output].data;
    const used = Math.min(n, samples - done);
    for (let s = 0; s < used; s++) {
      for (let i = 0; i < tensor.length; i++) {
        const v = g[s * tensor.length + i];
        sum[i] += v;
        squares[i] += v * v;
      }
    }
    progress(`${method.name}: ${Math.min(done + used, samples)} of ${samples} noisy copies`);
  }
  const statistic = {
    plain: (i) => sum[i] / samples,
    squared: (i) => squares[i] / samples,
    vargrad: (i) => squares[i] / samples - (sum[i] / samples) ** 2,
  }[variant];
  if (!statistic) throw new Error(`${method.name}: variant ${variant} is not computed by this page`);
  return { logits: first.logits, targetIndex: target, values: Float32Array.from(sum, (v, i) => statistic(i)) };
}

/** A class activation map of `cam` (G.gradCam, G.gradCamPlusPlus), upsampled bilinearly to the input. */
async function classActivationMap(ctx, method, tensor, cam) {
  const [h, w] = ctx.inputSize;
  const out = await ctx.run(tensor, 1, [-1], method.outputs);
  const activation = out.outputs[ctx.outputs.cam_activation], gradient = out.outputs[ctx.outputs.cam_gradient];
  const [, channels, ch, cw] = activation.dims;
  const values = G.zoomBilinear(cam(activation.data, gradient.data, channels, ch * cw), ch, cw, h, w, true);
  return { logits: out.logits, targetIndex: out.targetIndex[0], values };
}

/** Grad-CAM (runtime.cam.grad_cam_method). */
export async function gradCam(ctx, method, tensor) {
  return classActivationMap(ctx, method, tensor, G.gradCam);
}

/** Grad-CAM++ (runtime.cam.grad_cam_plus_plus_method). */
export async function gradCamPlusPlus(ctx, method, tensor) {
  return classActivationMap(ctx, method, tensor, G.gradCamPlusPlus);
}

/** HiResCAM (runtime.cam.hires_cam_method). */
export async function hiResCam(ctx, method, tensor) {
  return classActivationMap(ctx, method, tensor, G.hiResCam);
}

/** XGradCAM (runtime.cam.xgrad_cam_method). */
export async function xGradCam(ctx, method, tensor) {
  return classActivationMap(ctx, method, tensor, G.xGradCam);
}

/** LayerCAM (runtime.cam.layer_cam_method). */
export async function layerCam(ctx, method, tensor) {
  return classActivationMap(ctx, method, tensor, G.layerCam);
}

/**
 * EigenCAM (runtime.cam.eigen_cam_method) with gradmap's default orientation; the SVD routine's own sign
 * (`svd`, pytorch-grad-cam's) is LAPACK's choice, which this page cannot reproduce.
 */
export async function eigenCam(ctx, method, tensor, settings) {
  if (settings.orientation !== "activation") {
    throw new Error(`${method.name}: orientation ${settings.orientation} is not computed by this page (gradmap run does)`);
  }
  const [h, w] = ctx.inputSize;
  const out = await ctx.run(tensor, 1, [-1], method.outputs);
  const activation = out.outputs[ctx.outputs.cam_activation];
  const [, channels, ch, cw] = activation.dims;
  const values = G.zoomBilinear(G.eigenCam(activation.data, channels, ch * cw), ch, cw, h, w, true);
  return { logits: out.logits, targetIndex: out.targetIndex[0], values };
}

/** Guided backpropagation times the Grad-CAM map upsampled by nearest neighbour (runtime.cam.guided_grad_cam_method). */
export async function guidedGradCam(ctx, method, tensor) {
  const [h, w] = ctx.inputSize;
  const size = h * w;
  const out = await ctx.run(tensor, 1, [-1], method.outputs);
  const activation = out.outputs[ctx.outputs.cam_activation], gradient = out.outputs[ctx.outputs.cam_gradient];
  const [, channels, ch, cw] = activation.dims;
  const cam = G.upsampleNearest(G.gradCam(activation.data, gradient.data, channels, ch * cw), ch, cw, h, w);
  const guided = out.outputs[ctx.outputs.gradient_guided].data;
  return { logits: out.logits, targetIndex: out.targetIndex[0], values: Float32Array.from(guided, (g, i) => g * cam[i % size]) };
}
