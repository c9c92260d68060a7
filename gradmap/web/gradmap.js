// gradmap's runtime in the browser: the same preprocessing and postprocessing as gradmap/runtime,
// step by step, in plain JavaScript (no canvas scaling, no libraries). Every function here is pure
// and works on typed arrays, so that tests can call it from the page and compare with Python.
//
//   preprocess:   Pillow's Image.resize (libImaging/Resample.c, 8-bit fixed point, horizontal pass
//                 then vertical pass; nearest as ImagingScaleAffine), or tf.image.resize's half-pixel
//                 bilinear without antialiasing (float32, not rounded) -> torchvision CenterCrop (zero
//                 or pad_fill padding, Python's round) -> ToTensor (x / 255, or the 0-255 scale) ->
//                 RGB or BGR -> Normalize ((x - mean) / std), float32
//   postprocess:  max_c |g_c| -> min-max to [0, 1] (float64, flat map -> zeros) ->
//                 skimage.exposure.equalize_hist (numpy's float32 histogram, float64 interp) ->
//                 scipy.ndimage.zoom(order=1) onto the crop window in the original picture
//   Grad-CAM:     mean_hw dS/dA -> ReLU(sum_c w_c A_c) -> ndimage.zoom(order=1, grid_mode=True, mode="nearest")

const f32 = Math.fround;

/** Python's round(): halves go to the even neighbour. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

// ---------------------------------------------------------------- resampling (Pillow)
function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

export const FILTERS = {
  box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: { support: 1, f: (x) => { x = Math.abs(x); return x < 1 ? 1 - x : 0; } },
  hamming: {
    support: 1,
    f: (x) => {
      x = Math.abs(x);
      if (x === 0) return 1;
      if (x >= 1) return 0;
      x *= Math.PI;
      return (Math.sin(x) / x) * (0.54 + 0.46 * Math.cos(x));
    },
  },
  bicubic: {
    support: 2,
    f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
  lanczos: { support: 3, f: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
};

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;

// precompute_coeffs + normalize_coeffs_8bpc of Resample.c: per output pixel, the first input pixel,
// the count, and integer weights scaled by 2^22.
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.f((x + xmin - center + 0.5) * ss);
      kk[xx * ksize + x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) if (ww !== 0) kk[xx * ksize + x] /= ww;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  const ints = new Int32Array(kk.length);
  for (let i = 0; i < kk.length; i++) ints[i] = Math.trunc(kk[i] < 0 ? -0.5 + kk[i] * ONE : 0.5 + kk[i] * ONE);
  return { ksize, bounds, kk: ints };
}

function clip8(ss) {
  const v = Math.floor(ss / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// rgb: Uint8Array [h, w, 3]. One pass along x (horizontal) or y.
function resamplePass(rgb, width, height, outSize, filter, horizontal) {
  const inSize = horizontal ? width : height;
  const { ksize, bounds, kk } = coefficients(inSize, outSize, filter);
  const outW = horizontal ? outSize : width;
  const outH = horizontal ? height : outSize;
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const o = horizontal ? x : y;
      const min = bounds[o * 2], count = bounds[o * 2 + 1], k = o * ksize;
      let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
      for (let i = 0; i < count; i++) {
        const p = horizontal ? (y * width + min + i) * 3 : ((min + i) * width + x) * 3;
        const w = kk[k + i];
        s0 += rgb[p] * w;
        s1 += rgb[p + 1] * w;
        s2 += rgb[p + 2] * w;
      }
      const q = (y * outW + x) * 3;
      out[q] = clip8(s0);
      out[q + 1] = clip8(s1);
      out[q + 2] = clip8(s2);
    }
  }
  return out;
}

// Pillow's NEAREST resize: ImagingScaleAffine, positions accumulated in float64 as there.
function resizeNearest(rgb, width, height, outW, outH) {
  const coord = (v) => (v < 0 ? -1 : Math.trunc(v));
  const xs = new Int32Array(outW), ys = new Int32Array(outH);
  let xo = 0 + (width / outW) * 0.5;
  for (let x = 0; x < outW; x++) { xs[x] = coord(xo); xo += width / outW; }
  let yo = 0 + (height / outH) * 0.5;
  for (let y = 0; y < outH; y++) { ys[y] = coord(yo); yo += height / outH; }
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const p = (ys[y] * width + xs[x]) * 3, q = (y * outW + x) * 3;
      out[q] = rgb[p]; out[q + 1] = rgb[p + 1]; out[q + 2] = rgb[p + 2];
    }
  }
  return out;
}

/** Pillow's ``Image.resize((outW, outH), filter)`` of an RGB picture (Uint8Array [h, w, 3]). */
export function resizeRGB(rgb, width, height, outW, outH, interpolation = "bilinear") {
  if (outW === width && outH === height) return rgb;
  if (interpolation === "nearest") return resizeNearest(rgb, width, height, outW, outH);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unknown interpolation ${interpolation}`);
  let pixels = rgb, w = width;
  if (outW !== width) { pixels = resamplePass(pixels, w, height, outW, filter, true); w = outW; }
  if (outH !== height) pixels = resamplePass(pixels, w, height, outH, filter, false);
  return pixels;
}

/** RGBA bytes (as a canvas gives them) to RGB, transparency composited on white as PIL's alpha_composite. */
export function rgbaToRGB(rgba, width, height) {
  const out = new Uint8Array(width * height * 3);
  for (let i = 0, n = width * height; i < n; i++) {
    const a = rgba[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const v = rgba[i * 4 + c];
      if (a === 255) { out[i * 3 + c] = v; continue; }
      // AlphaComposite.c with an opaque white destination, 7 extra bits, rounded divisions by 255
      const tmp = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
      out[i * 3 + c] = (((tmp >>> 8) + tmp) >>> 8) >>> 7;
    }
  }
  return out;
}

/** torchvision's Resize(int): the shorter side becomes ``resize``, the longer one is truncated. */
export function resizedSize(height, width, resize) {
  const short = Math.min(width, height), long = Math.max(width, height);
  const newShort = resize, newLong = Math.trunc((resize * long) / short);
  return width <= height ? [newLong, newShort] : [newShort, newLong];
}

/** timm's ResizeKeepRatio(box): both sides divided by the smaller (``longest``: larger) ratio, rounded. */
export function keepRatioSize(height, width, box, longest = false) {
  const rh = height / box[0], rw = width / box[1];
  const ratio = longest ? Math.max(rh, rw) : Math.min(rh, rw);
  return [roundHalfEven(height / ratio), roundHalfEven(width / ratio)];
}

/** (top, left) of the center crop window; negative where the crop pads the picture. */
export function centerCropOffsets(height, width, cropH, cropW, rounding = "round") {
  const offset = (size, crop) => {
    if (rounding === "floor") return Math.floor((size - crop) / 2);
    return crop > size ? -Math.floor((crop - size) / 2) : roundHalfEven((size - crop) / 2);
  };
  return [offset(height, cropH), offset(width, cropW)];
}

/** The size after the model's resize step (contract.Preprocessing's resize and resize_mode). */
export function resizeTarget(height, width, pre) {
  const mode = pre.resize_mode || "shorter";
  if (pre.resize == null) return [height, width];
  if (mode === "exact") return [pre.resize[0], pre.resize[1]];
  if (mode === "keep_ratio" || mode === "keep_ratio_longest") return keepRatioSize(height, width, pre.resize, mode === "keep_ratio_longest");
  if (mode !== "shorter") throw new Error(`unknown resize_mode ${mode}`);
  return resizedSize(height, width, pre.resize);
}

// ---------------------------------------------------------------- the model format this page reads
/** The newest gradmap model format (gradmap.contract.FORMAT_VERSION) whose preprocessing this page implements
 * (version 3 adds forward-only models, whose methods model.json lists like any other's). */
export const FORMAT_VERSION = 3;

/** Every preprocessing field this page implements, and the values of those that are choices
 * (gradmap.contract.Preprocessing and its RESIZE_MODES, INTERPOLATIONS, ... tables). */
export const PREPROCESSING = {
  fields: ["crop", "resize", "interpolation", "mean", "std", "resize_mode", "crop_rounding", "pad_fill",
    "value_range", "channel_order", "antialias"],
  required: ["crop", "mean", "std"],
  choices: {
    interpolation: Object.keys(FILTERS).concat(["nearest"]),
    resize_mode: ["shorter", "exact", "keep_ratio", "keep_ratio_longest"],
    crop_rounding: ["round", "floor"],
    value_range: ["0-1", "0-255"],
    channel_order: ["rgb", "bgr"],
  },
};

/**
 * Refuse a model this page cannot preprocess exactly as gradmap's runtime does: a newer model format,
 * or a preprocessing field or value it does not implement. Throws an Error naming the field and why.
 */
export function checkModelFormat(formatVersion, pre) {
  if (formatVersion != null && !(Number.isInteger(formatVersion) && formatVersion >= 1)) {
    throw new Error(`model.json: format_version must be a positive integer, got ${JSON.stringify(formatVersion)}`);
  }
  if (formatVersion > FORMAT_VERSION) {
    throw new Error(`the model uses gradmap format version ${formatVersion}; this page reads up to ${FORMAT_VERSION}: ` +
      "build the site again with the gradmap that exported the model (gradmap web)");
  }
  checkPreprocessing(pre);
}

/** Throw an Error naming the first preprocessing field this page does not know or whose value it cannot apply. */
export function checkPreprocessing(pre) {
  const where = "the model's preprocessing";
  if (pre === null || typeof pre !== "object" || Array.isArray(pre)) throw new Error(`${where} is missing or not an object`);
  const unknown = Object.keys(pre).filter((k) => !PREPROCESSING.fields.includes(k));
  if (unknown.length) {
    throw new Error(`${where} has field(s) this page does not implement: ${unknown.join(", ")} ` +
      "(written by a newer gradmap: build the site again with it)");
  }
  for (const key of PREPROCESSING.required) if (!(key in pre)) throw new Error(`${where} lacks its '${key}' field`);
  for (const [key, values] of Object.entries(PREPROCESSING.choices)) {
    if (key in pre && !values.includes(pre[key])) {
      throw new Error(`${where}: ${key} ${JSON.stringify(pre[key])} is not one of ${values.join(", ")}`);
    }
  }
  const triple = (key) => {
    const v = pre[key];
    if (!Array.isArray(v) || v.length !== 3 || !v.every(Number.isFinite)) {
      throw new Error(`${where}: ${key} must be three numbers, got ${JSON.stringify(v)}`);
    }
  };
  triple("mean");
  triple("std");
  if (!pre.std.every((v) => v > 0)) throw new Error(`${where}: std must be positive, got ${JSON.stringify(pre.std)}`);
  if ("pad_fill" in pre) triple("pad_fill");
  if (!Array.isArray(pre.crop) || pre.crop.length !== 2 || !pre.crop.every((v) => Number.isInteger(v) && v > 0)) {
    throw new Error(`${where}: crop must be two positive sizes, got ${JSON.stringify(pre.crop)}`);
  }
  if ("antialias" in pre && typeof pre.antialias !== "boolean") {
    throw new Error(`${where}: antialias must be true or false, got ${JSON.stringify(pre.antialias)}`);
  }
  if (pre.antialias === false && (pre.interpolation || "bilinear") !== "bilinear") {
    throw new Error(`${where}: antialias false is tf.image.resize's bilinear resize; interpolation ` +
      `${JSON.stringify(pre.interpolation)} has no such mode`);
  }
}

// ---------------------------------------------------------------- preprocessing
// Source rows (or columns) and weights of TensorFlow's half-pixel bilinear resize in float32, as
// gradmap.runtime.preprocess._half_pixel_taps: (x + 0.5) * scale - 0.5, lower tap clamped at 0,
// upper tap ceil clamped at the last pixel.
function halfPixelTaps(inSize, outSize) {
  const scale = f32(inSize / outSize);
  const lower = new Int32Array(outSize), upper = new Int32Array(outSize), weight = new Float32Array(outSize);
  for (let i = 0; i < outSize; i++) {
    const source = f32(f32(f32(i + 0.5) * scale) - 0.5);
    const floor = Math.floor(source);
    lower[i] = Math.max(floor, 0);
    upper[i] = Math.min(Math.ceil(source), inSize - 1);
    weight[i] = f32(source - floor);
  }
  return { lower, upper, weight };
}

/**
 * ``tf.image.resize`` with its defaults (bilinear, half-pixel centers, no antialiasing) of an RGB
 * picture (Uint8Array [h, w, 3]) to Float32Array [outH, outW, 3], not rounded; the same float32
 * operations in the same order as gradmap.runtime.preprocess.resize_bilinear_no_antialias.
 */
export function resizeBilinearNoAntialias(rgb, width, height, outW, outH) {
  const ys = halfPixelTaps(height, outH), xs = halfPixelTaps(width, outW);
  const out = new Float32Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    const r0 = ys.lower[y] * width, r1 = ys.upper[y] * width, dy = ys.weight[y];
    for (let x = 0; x < outW; x++) {
      const c0 = xs.lower[x], c1 = xs.upper[x], dx = xs.weight[x];
      for (let c = 0; c < 3; c++) {
        const tl = rgb[(r0 + c0) * 3 + c], tr = rgb[(r0 + c1) * 3 + c];
        const bl = rgb[(r1 + c0) * 3 + c], br = rgb[(r1 + c1) * 3 + c];
        const top = f32(tl + f32(f32(tr - tl) * dx));
        const bottom = f32(bl + f32(f32(br - bl) * dx));
        out[(y * outW + x) * 3 + c] = f32(top + f32(f32(bottom - top) * dy));
      }
    }
  }
  return out;
}

/**
 * The model input of an RGB picture, as gradmap.runtime.preprocess computes it.
 * Returns {tensor: Float32Array [3, h, w], geometry: {originalSize, resizedSize, cropTop, cropLeft, cropSize}}.
 */
export function preprocess(rgb, width, height, pre) {
  checkPreprocessing(pre);
  const [cropH, cropW] = pre.crop;
  const newSize = resizeTarget(height, width, pre);
  const same = newSize[0] === height && newSize[1] === width;
  const pixels = pre.antialias === false
    ? (same ? rgb : resizeBilinearNoAntialias(rgb, width, height, newSize[1], newSize[0]))
    : resizeRGB(rgb, width, height, newSize[1], newSize[0], pre.interpolation || "bilinear");
  const [top, left] = centerCropOffsets(newSize[0], newSize[1], cropH, cropW, pre.crop_rounding || "round");
  const fill = pre.pad_fill || [0, 0, 0];
  const tensor = new Float32Array(3 * cropH * cropW);
  const mean = pre.mean.map(f32), std = pre.std.map(f32);
  const unit = (pre.value_range || "0-1") === "0-1";
  // tensor channel c holds picture channel source[c]: BGR reverses them, mean/std are in tensor order
  const source = (pre.channel_order || "rgb") === "bgr" ? [2, 1, 0] : [0, 1, 2];
  // Same float32 operations, in the same order, as normalize_pixels: x / 255 on the 0-1 scale, then (x - m) / s.
  const normalize = (v, c) => f32(f32((unit ? f32(v / 255) : v) - mean[c]) / std[c]);
  for (let y = 0; y < cropH; y++) {
    const sy = y + top;
    for (let x = 0; x < cropW; x++) {
      const sx = x + left;
      const inside = sy >= 0 && sy < newSize[0] && sx >= 0 && sx < newSize[1];
      for (let c = 0; c < 3; c++) {
        const s = source[c];
        tensor[(c * cropH + y) * cropW + x] = normalize(inside ? pixels[(sy * newSize[1] + sx) * 3 + s] : fill[s], c);
      }
    }
  }
  return {
    tensor,
    geometry: { originalSize: [height, width], resizedSize: newSize, cropTop: top, cropLeft: left, cropSize: [cropH, cropW] },
  };
}

// ---------------------------------------------------------------- postprocessing (numpy / skimage / scipy)
export function checkFinite(values, what = "gradient") {
  let bad = 0;
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i])) bad++;
  if (bad) throw new Error(`${what} has ${bad} NaN or infinite values out of ${values.length}`);
}

/** max over channels of |attribution|: [C, h, w] -> Float32Array [h, w]. */
export function reduceMax(values, channels, size) {
  checkFinite(values);
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    let m = 0;
    for (let c = 0; c < channels; c++) m = Math.max(m, Math.abs(values[c * size + i]));
    out[i] = m;
  }
  return out;
}

function minMax(m) {
  let low = Infinity, high = -Infinity;
  for (let i = 0; i < m.length; i++) { if (m[i] < low) low = m[i]; if (m[i] > high) high = m[i]; }
  return [low, high];
}

/** (m - min) / (max - min) in float64, clipped to [0, 1], as float32; a flat map gives zeros. */
export function normalizeMinMax(m) {
  const [low, high] = minMax(m);
  const out = new Float32Array(m.length);
  if (!(high > low)) return out;
  for (let i = 0; i < m.length; i++) out[i] = Math.min(1, Math.max(0, (m[i] - low) / (high - low)));
  return out;
}

/** skimage.exposure.equalize_hist(m, nbins) of a float32 map (numpy's histogram in float32). */
export function equalizeHistogram(m, nbins = 256) {
  const [first, last] = minMax(m);
  const out = new Float32Array(m.length);
  if (!(last > first)) return out;
  // np.linspace(first, last, nbins + 1, dtype=float32): float32 steps, last edge exact
  const delta = f32(last - first), step = f32(delta / nbins);
  const edges = new Float32Array(nbins + 1);
  for (let i = 0; i <= nbins; i++) edges[i] = f32(f32(i * step) + first);
  edges[nbins] = last;
  const counts = new Float64Array(nbins);
  for (let i = 0; i < m.length; i++) {
    const v = m[i];
    let index = Math.trunc(f32(f32(f32(v - first) / delta) * nbins));
    if (index === nbins) index -= 1;
    if (v < edges[index]) index -= 1;
    if (v >= edges[index + 1] && index !== nbins - 1) index += 1;
    counts[index] += 1;
  }
  const cdf = new Float64Array(nbins), centers = new Float64Array(nbins);
  let total = 0;
  for (let i = 0; i < nbins; i++) { total += counts[i]; cdf[i] = total; }
  for (let i = 0; i < nbins; i++) {
    cdf[i] = f32(cdf[i] / total);
    centers[i] = f32(f32(edges[i] + edges[i + 1]) / 2);
  }
  for (let i = 0; i < m.length; i++) out[i] = Math.min(1, Math.max(0, interp(m[i], centers, cdf)));
  return out;
}

// np.interp on increasing xp
function interp(x, xp, fp) {
  const n = xp.length;
  if (x < xp[0]) return fp[0];
  if (x >= xp[n - 1]) return fp[n - 1];
  let lo = 0, hi = n - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (xp[mid] <= x) lo = mid; else hi = mid; }
  if (xp[lo] === x) return fp[lo];
  const slope = (fp[lo + 1] - fp[lo]) / (xp[lo + 1] - xp[lo]);
  return slope * (x - xp[lo]) + fp[lo];
}

// Linear interpolation along one axis with ndimage.zoom's coordinate maps.
function zoomAxis(src, rows, cols, outSize, axis, gridMode) {
  const inSize = axis === 0 ? rows : cols;
  const outRows = axis === 0 ? outSize : rows, outCols = axis === 0 ? cols : outSize;
  const out = new Float64Array(outRows * outCols);
  const factor = gridMode ? inSize / outSize : outSize > 1 ? (inSize - 1) / (outSize - 1) : 1;
  for (let o = 0; o < outSize; o++) {
    let p = gridMode ? (o + 0.5) * factor - 0.5 : o * factor;
    p = Math.min(Math.max(p, 0), inSize - 1); // mode "nearest" (grid mode); exact ends otherwise
    const i0 = Math.floor(p), i1 = Math.min(i0 + 1, inSize - 1), t = p - i0;
    if (axis === 0) {
      for (let c = 0; c < cols; c++) out[o * cols + c] = src[i0 * cols + c] * (1 - t) + src[i1 * cols + c] * t;
    } else {
      for (let r = 0; r < rows; r++) out[r * outCols + o] = src[r * cols + i0] * (1 - t) + src[r * cols + i1] * t;
    }
  }
  return out;
}

/** scipy.ndimage.zoom(m, order=1) of an [h, w] map to [outH, outW] (grid_mode as scipy's). */
export function zoomBilinear(m, h, w, outH, outW, gridMode = false) {
  const rowsDone = zoomAxis(m, h, w, outH, 0, gridMode);
  return Float32Array.from(zoomAxis(rowsDone, outH, w, outW, 1, gridMode));
}

/**
 * gradmap.runtime.postprocess.map_to_original(m, geometry, "crop"): the map zoomed (bilinear) onto
 * the crop window in original-picture pixels. Returns {values: Float32Array [H, W], covered: Uint8Array}.
 */
export function mapToOriginal(m, h, w, g) {
  const [height, width] = g.originalSize;
  const sy = g.originalSize[0] / g.resizedSize[0], sx = g.originalSize[1] / g.resizedSize[1];
  const top = roundHalfEven(g.cropTop * sy), left = roundHalfEven(g.cropLeft * sx);
  const bottom = roundHalfEven((g.cropTop + g.cropSize[0]) * sy), right = roundHalfEven((g.cropLeft + g.cropSize[1]) * sx);
  const boxH = Math.max(bottom - top, 1), boxW = Math.max(right - left, 1);
  // ndimage.zoom's output shape is round(h * boxH / h); _fit then crops or repeats the edge
  const zh = roundHalfEven(h * (boxH / h)), zw = roundHalfEven(w * (boxW / w));
  const zoomed = zoomBilinear(m, h, w, zh, zw, false);
  const values = new Float32Array(height * width), covered = new Uint8Array(height * width);
  const y0 = Math.max(top, 0), x0 = Math.max(left, 0);
  const y1 = Math.min(top + boxH, height), x1 = Math.min(left + boxW, width);
  for (let y = y0; y < y1; y++) {
    const zy = Math.min(y - top, zh - 1);
    for (let x = x0; x < x1; x++) {
      values[y * width + x] = zoomed[zy * zw + Math.min(x - left, zw - 1)];
      covered[y * width + x] = 1;
    }
  }
  return { values, covered, height, width };
}

/** np.percentile(m, q) with numpy's default linear method. */
export function percentile(m, q) {
  const sorted = Float64Array.from(m).sort();
  const pos = (q / 100) * (sorted.length - 1);
  const lo = Math.floor(pos), hi = Math.min(lo + 1, sorted.length - 1), t = pos - lo;
  const a = sorted[lo], b = sorted[hi];
  return t >= 0.5 ? b - (b - a) * (1 - t) : a + (b - a) * t;
}

/**
 * What the overlay shows (gradmap.runtime.postprocess.scale_to_percentile): the min-max map divided
 * by its ``overlay.percentile`` percentile and clipped to [0, 1], so that the few strongest pixels
 * do not make the rest vanish; a map whose percentile is 0 is divided by its maximum instead.
 */
export function overlayValues(normalized, overlay) {
  let p = percentile(normalized, overlay.percentile);
  if (!(p > 0)) p = minMax(normalized)[1];
  if (!(p > 0)) return new Float32Array(normalized.length);
  return Float32Array.from(normalized, (v) => Math.min(1, Math.max(0, v / p)));
}

// ---------------------------------------------------------------- class activation maps (gradmap/runtime/cam.py)
/** Grad-CAM [h, w]: ReLU(sum_c mean_hw(dS/dA_c) A_c). */
export function gradCam(activation, gradient, channels, size) {
  const cam = new Float64Array(size);
  for (let c = 0; c < channels; c++) {
    let s = 0;
    for (let i = 0; i < size; i++) s += gradient[c * size + i];
    const weight = s / size;
    for (let i = 0; i < size; i++) cam[i] += weight * activation[c * size + i];
  }
  return Float32Array.from(cam, (v) => Math.max(v, 0));
}

/** Grad-CAM++ [h, w] with pytorch-grad-cam's closed form (as cam.grad_cam_plus_plus). */
export function gradCamPlusPlus(activation, gradient, channels, size) {
  const cam = new Float64Array(size);
  for (let c = 0; c < channels; c++) {
    let sumA = 0;
    for (let i = 0; i < size; i++) sumA += activation[c * size + i];
    let weight = 0;
    for (let i = 0; i < size; i++) {
      const g = gradient[c * size + i];
      if (g === 0) continue;
      const alpha = (g * g) / (2 * g * g + sumA * g * g * g + 1e-6);
      weight += Math.max(g, 0) * alpha;
    }
    for (let i = 0; i < size; i++) cam[i] += weight * activation[c * size + i];
  }
  return Float32Array.from(cam, (v) => Math.max(v, 0));
}

/** HiResCAM [h, w]: sum over channels of gradient x activation, ReLU (as cam.hires_cam). */
export function hiResCam(activation, gradient, channels, size) {
  const cam = new Float64Array(size);
  for (let c = 0; c < channels; c++) {
    for (let i = 0; i < size; i++) cam[i] += gradient[c * size + i] * activation[c * size + i];
  }
  return Float32Array.from(cam, (v) => Math.max(v, 0));
}

/** XGradCAM [h, w]: channel weights sum(g A) / (sum(A) + 1e-7), ReLU (as cam.xgrad_cam). */
export function xGradCam(activation, gradient, channels, size) {
  const cam = new Float64Array(size);
  for (let c = 0; c < channels; c++) {
    let ga = 0, sumA = 0;
    for (let i = 0; i < size; i++) {
      ga += gradient[c * size + i] * activation[c * size + i];
      sumA += activation[c * size + i];
    }
    const weight = ga / (sumA + 1e-7);
    for (let i = 0; i < size; i++) cam[i] += weight * activation[c * size + i];
  }
  return Float32Array.from(cam, (v) => Math.max(v, 0));
}

/** LayerCAM [h, w]: sum over channels of ReLU(gradient) x activation, ReLU (as cam.layer_cam). */
export function layerCam(activation, gradient, channels, size) {
  const cam = new Float64Array(size);
  for (let c = 0; c < channels; c++) {
    for (let i = 0; i < size; i++) cam[i] += Math.max(gradient[c * size + i], 0) * activation[c * size + i];
  }
  return Float32Array.from(cam, (v) => Math.max(v, 0));
}

/**
 * EigenCAM [h, w] with gradmap's default orientation (as cam.eigen_cam(orientation="activation")): the
 * activation vectors [size, C], centred per channel, projected on their first principal direction,
 * pointed where the activations grow (loadings summing >= 0), ReLU. The direction is the top
 * eigenvector of the smaller Gram matrix (X X^T or X^T X), by cyclic Jacobi rotations in float64.
 */
export function eigenCam(activation, channels, size) {
  const x = new Float64Array(size * channels);  // [size, C]
  for (let c = 0; c < channels; c++) {
    let mean = 0;
    for (let i = 0; i < size; i++) {
      const v = activation[c * size + i];
      mean += Number.isNaN(v) ? 0 : v;
    }
    mean /= size;
    for (let i = 0; i < size; i++) {
      const v = activation[c * size + i];
      x[i * channels + c] = (Number.isNaN(v) ? 0 : v) - mean;
    }
  }
  const byPosition = size <= channels;
  const n = byPosition ? size : channels;
  const gram = new Float64Array(n * n);
  for (let p = 0; p < n; p++) {
    for (let q = p; q < n; q++) {
      let s = 0;
      if (byPosition) for (let c = 0; c < channels; c++) s += x[p * channels + c] * x[q * channels + c];
      else for (let i = 0; i < size; i++) s += x[i * channels + p] * x[i * channels + q];
      gram[p * n + q] = s;
      gram[q * n + p] = s;
    }
  }
  const top = topEigenvector(gram, n);
  let direction = top;
  if (byPosition) {  // the right singular vector X^T u / |X^T u|
    direction = new Float64Array(channels);
    for (let i = 0; i < size; i++) for (let c = 0; c < channels; c++) direction[c] += x[i * channels + c] * top[i];
  }
  let norm = 0, sum = 0;
  for (const v of direction) { norm += v * v; sum += v; }
  norm = Math.sqrt(norm);
  const scale = norm > 0 ? (sum < 0 ? -1 : 1) / norm : 0;
  const cam = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    let s = 0;
    for (let c = 0; c < channels; c++) s += x[i * channels + c] * direction[c];
    cam[i] = Math.max(s * scale, 0);
  }
  return cam;
}

/** The eigenvector of the largest eigenvalue of the symmetric n x n matrix `a` (overwritten): cyclic Jacobi. */
function topEigenvector(a, n) {
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  for (let sweep = 0; sweep < 60; sweep++) {
    let off = 0, total = 0;
    for (let i = 0; i < n * n; i++) {
      total += a[i] * a[i];
      if (i % (n + 1) !== 0) off += a[i] * a[i];
    }
    if (!(off > 1e-26 * total)) break;
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = a[p * n + q];
        if (apq === 0) continue;
        const theta = (a[q * n + q] - a[p * n + p]) / (2 * apq);
        const t = (theta >= 0 ? 1 : -1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let k = 0; k < n; k++) {  // columns p, q of A J
          const akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {  // rows p, q of J^T A
          const apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  let best = 0;
  for (let i = 1; i < n; i++) if (a[i * n + i] > a[best * n + best]) best = i;
  return Float64Array.from({ length: n }, (_, k) => v[k * n + best]);
}

/** Nearest upsampling as cam.upsample(order=0): rows floor(i * h / H). */
export function upsampleNearest(m, h, w, outH, outW) {
  const out = new Float32Array(outH * outW);
  for (let y = 0; y < outH; y++) {
    const sy = Math.floor((y * h) / outH);
    for (let x = 0; x < outW; x++) out[y * outW + x] = m[sy * w + Math.floor((x * w) / outW)];
  }
  return out;
}

// ---------------------------------------------------------------- pictures
/** Colour a map in [0, 1] with a 256-entry byte table: entry min(int(x * 256), 255). */
export function colorIndex(v) {
  const i = Math.trunc(f32(v) * 256);
  return i < 0 ? 0 : i > 255 ? 255 : i;
}

/** RGBA bytes of the heatmap: colour where covered, transparent elsewhere (render_heatmap). */
export function heatmapRGBA(values, covered, table) {
  const out = new Uint8ClampedArray(values.length * 4);
  for (let i = 0; i < values.length; i++) {
    const k = colorIndex(values[i]) * 3;
    out[i * 4] = table[k]; out[i * 4 + 1] = table[k + 1]; out[i * 4 + 2] = table[k + 2];
    out[i * 4 + 3] = covered[i] ? 255 : 0;
  }
  return out;
}

function rint(x) { return roundHalfEven(x); }

/**
 * The overlay (gradmap.runtime.render.render_overlay): each covered pixel blends colour over the
 * picture with opacity ``alpha * weight``, where ``weight`` is the map value itself for the
 * "peaks" overlay (values already scaled to [0, 1]) or 1 for the flat recipe overlay.
 */
export function overlayRGBA(rgb, values, covered, table, alpha, weighted) {
  const out = new Uint8ClampedArray(values.length * 4);
  for (let i = 0; i < values.length; i++) {
    const k = colorIndex(values[i]) * 3;
    const a = covered[i] ? alpha * (weighted ? Math.min(1, Math.max(0, values[i])) : 1) : 0;
    for (let c = 0; c < 3; c++) out[i * 4 + c] = rint(a * table[k + c] + (1 - a) * rgb[i * 3 + c]);
    out[i * 4 + 3] = 255;
  }
  return out;
}

// ---------------------------------------------------------------- small helpers
/** Softmax in float64 (shifted by the max). */
export function softmax(logits) {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  const e = Array.from(logits, (v) => Math.exp(v - max));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** Indices of the k largest values, largest first, ties to the lower index. */
export function topK(values, k) {
  return Array.from(values, (v, i) => i).sort((a, b) => values[b] - values[a] || a - b).slice(0, k);
}

/** A seeded standard normal stream (mulberry32 + Box-Muller). */
export function normalStream(seed) {
  let s = seed >>> 0, spare = null;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => {
    if (spare !== null) { const v = spare; spare = null; return v; }
    const u = 1 - uniform(), v = uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
}

/**
 * A method setting's value checked against its row of the method table (gradmap.contract.Setting.check):
 * an int or float within [minimum, maximum], or one of the choices; throws an Error naming the
 * setting and what is wrong.
 */
export function checkSetting(setting, value, method) {
  const where = method ? `${method} setting '${setting.name}'` : `setting '${setting.name}'`;
  if (setting.type === "choice") {
    if (!setting.choices.includes(value)) throw new Error(`${where}: '${value}' is not one of ${setting.choices.join(", ")}`);
    return value;
  }
  const text = String(value).trim();
  const number = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text) ? Number(text) : NaN; // decimal, as Setting.check
  const low = setting.minimum, high = setting.maximum;
  const range = low !== null && high !== null ? ` in [${low}, ${high}]` : low !== null ? ` >= ${low}` : high !== null ? ` <= ${high}` : "";
  const ok = Number.isFinite(number) && (setting.type !== "int" || Number.isInteger(number))
    && (low === null || number >= low) && (high === null || number <= high);
  if (!ok) throw new Error(`${where} must be ${setting.type === "int" ? "an integer" : "a number"}${range}, got '${text}'`);
  return number;
}

/** Little-endian float32 bytes as base64 (the test hook's map encoding). */
export function float32ToBase64(values) {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}
