// The service's manifest-driven preprocessing (service/inference/preprocess.py), in the browser: resize as
// Pillow does (its antialiased bilinear/bicubic/box filters, two 8-bit passes), letterbox or stretch,
// then (x * scale - mean) / std per channel into a 1xCxHxW float32 tensor. Driven by the manifest's input
// spec, never by constants, so the device gate sees what the model was trained and measured on.

export interface InputSpec {
  name: string;
  width: number;
  height: number;
  channels: string[];
  resize: "letterbox" | "stretch";
  interpolation: "bilinear" | "bicubic" | "box";
  pad_value: number;
  scale: number;
  mean: number[];
  std: number[];
}

/** An RGB image: width x height x 3 bytes, row-major. */
export interface Rgb {
  width: number;
  height: number;
  data: Uint8Array;
}

export interface Placement {
  scaleX: number;
  scaleY: number;
  padX: number;
  padY: number;
}

export function fromImageData(image: ImageData): Rgb {
  const rgba = image.data;
  const data = new Uint8Array(image.width * image.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    data[j] = rgba[i];
    data[j + 1] = rgba[i + 1];
    data[j + 2] = rgba[i + 2];
  }
  return { width: image.width, height: image.height, data };
}

export function crop(image: Rgb, [left, top, right, bottom]: [number, number, number, number]): Rgb {
  const width = right - left;
  const height = bottom - top;
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const from = ((top + y) * image.width + left) * 3;
    data.set(image.data.subarray(from, from + width * 3), y * width * 3);
  }
  return { width, height, data };
}

// Pillow's filters (src/libImaging/Resample.c) and their supports.
const FILTERS = {
  box: { support: 0.5, weight: (x: number) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: { support: 1, weight: (x: number) => Math.max(0, 1 - Math.abs(x)) },
  bicubic: {
    support: 2,
    weight: (x: number) => {
      const a = -0.5;
      const t = Math.abs(x);
      if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1;
      if (t < 2) return (((t - 5) * t + 8) * t - 4) * a;
      return 0;
    },
  },
} as const;

interface Coefficients {
  starts: Int32Array;
  sizes: Int32Array;
  weights: Float64Array; // `window` fixed-point weights per output pixel
  window: number;
}

/** Pillow's precompute_coeffs: each output pixel's input window and its normalised filter weights. */
function coefficients(inSize: number, outSize: number, filter: keyof typeof FILTERS): Coefficients {
  const { support: baseSupport, weight } = FILTERS[filter];
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = baseSupport * filterScale;
  const window = Math.ceil(support) * 2 + 1;
  const starts = new Int32Array(outSize);
  const sizes = new Int32Array(outSize);
  const weights = new Float64Array(outSize * window);
  for (let x = 0; x < outSize; x++) {
    const center = (x + 0.5) * scale;
    const start = Math.max(Math.trunc(center - support + 0.5), 0);
    const end = Math.min(Math.trunc(center + support + 0.5), inSize);
    let total = 0;
    for (let i = 0; i < end - start; i++) {
      const w = weight((i + start - center + 0.5) / filterScale);
      weights[x * window + i] = w;
      total += w;
    }
    for (let i = 0; i < end - start; i++) {
      // Normalised, then to Pillow's fixed point (normalize_coeffs_8bpc): the sums below are then exact.
      const k = total !== 0 ? weights[x * window + i] / total : weights[x * window + i];
      weights[x * window + i] = k < 0 ? Math.trunc(-0.5 + k * FIXED_ONE) : Math.trunc(0.5 + k * FIXED_ONE);
    }
    starts[x] = start;
    sizes[x] = end - start;
  }
  return { starts, sizes, weights, window };
}

// Pillow's 8-bit resampling works in fixed point with this many fractional bits (Resample.c PRECISION_BITS).
const PRECISION_BITS = 32 - 8 - 2;
const FIXED_ONE = 2 ** PRECISION_BITS;
const FIXED_HALF = 2 ** (PRECISION_BITS - 1);

/** A fixed-point sum (with FIXED_HALF already added) back to a byte, as Pillow's clip8 does. */
function clip8(sum: number): number {
  const value = Math.floor(sum / FIXED_ONE);
  return value <= 0 ? 0 : value >= 255 ? 255 : value;
}

/** Resize like Pillow's Image.resize for 8-bit RGB: horizontal pass, then vertical, each rounded to 8 bits. */
export function resize(image: Rgb, width: number, height: number, filter: InputSpec["interpolation"]): Rgb {
  let current = image;
  if (width !== current.width) current = resamplePass(current, width, "x", filter);
  if (height !== current.height) current = resamplePass(current, height, "y", filter);
  return current;
}

/** One of Pillow's two 8-bit passes: resample along `axis` to `size` pixels, the other axis unchanged. */
function resamplePass(image: Rgb, size: number, axis: "x" | "y", filter: InputSpec["interpolation"]): Rgb {
  const width = axis === "x" ? size : image.width;
  const height = axis === "y" ? size : image.height;
  const c = coefficients(axis === "x" ? image.width : image.height, size, filter);
  const step = axis === "x" ? 3 : image.width * 3; // bytes between neighbours along the axis
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const k = axis === "x" ? x : y; // the output pixel's index along the axis
      const base = axis === "x" ? y * image.width * 3 : x * 3;
      let r = FIXED_HALF;
      let g = FIXED_HALF;
      let b = FIXED_HALF;
      for (let i = 0; i < c.sizes[k]; i++) {
        const w = c.weights[k * c.window + i];
        const p = base + (c.starts[k] + i) * step;
        r += image.data[p] * w;
        g += image.data[p + 1] * w;
        b += image.data[p + 2] * w;
      }
      const o = (y * width + x) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return { width, height, data: out };
}

/** The spec's resize rule: the image at model size and where it landed (preprocess.fit). */
export function fit(image: Rgb, spec: InputSpec): { fitted: Rgb; placement: Placement } {
  if (spec.resize === "stretch") {
    const fitted = resize(image, spec.width, spec.height, spec.interpolation);
    return { fitted, placement: { scaleX: spec.width / image.width, scaleY: spec.height / image.height, padX: 0, padY: 0 } };
  }
  const scale = Math.min(spec.width / image.width, spec.height / image.height);
  const newW = Math.max(1, pythonRound(image.width * scale));
  const newH = Math.max(1, pythonRound(image.height * scale));
  const padX = Math.floor((spec.width - newW) / 2);
  const padY = Math.floor((spec.height - newH) / 2);
  const resized = resize(image, newW, newH, spec.interpolation);
  const data = new Uint8Array(spec.width * spec.height * 3).fill(spec.pad_value);
  for (let y = 0; y < newH; y++) {
    data.set(resized.data.subarray(y * newW * 3, (y + 1) * newW * 3), ((padY + y) * spec.width + padX) * 3);
  }
  return {
    fitted: { width: spec.width, height: spec.height, data },
    placement: { scaleX: newW / image.width, scaleY: newH / image.height, padX, padY },
  };
}

/** HxWx3 uint8 at model size -> 1x3xHxW float32, (x * scale - mean) / std (preprocess.normalize). */
export function normalize(fitted: Rgb, spec: InputSpec): Float32Array {
  if (spec.channels.length !== 3) throw new Error(`the device gate feeds RGB; the model wants ${spec.channels}`);
  const plane = fitted.width * fitted.height;
  const tensor = new Float32Array(plane * 3);
  for (let c = 0; c < 3; c++) {
    const mean = spec.mean[c];
    const std = spec.std[c];
    for (let i = 0; i < plane; i++) tensor[c * plane + i] = (fitted.data[i * 3 + c] * spec.scale - mean) / std;
  }
  return tensor;
}

/** The square-ish region around a detected box the crop models see (preprocess.crop_box). */
export function cropBox(
  [x0, y0, x1, y1]: [number, number, number, number],
  width: number,
  height: number,
  margin: number,
): [number, number, number, number] {
  const growX = (x1 - x0) * margin;
  const growY = (y1 - y0) * margin;
  const [a, b, c, d] = [x0 - growX, y0 - growY, x1 + growX, y1 + growY];
  const side = Math.max(c - a, d - b);
  const cx = (a + c) / 2;
  const cy = (b + d) / 2;
  const left = Math.max(0, pythonRound(cx - side / 2));
  const top = Math.max(0, pythonRound(cy - side / 2));
  const right = Math.min(width, pythonRound(cx + side / 2));
  const bottom = Math.min(height, pythonRound(cy + side / 2));
  return [left, top, Math.max(right, left + 1), Math.max(bottom, top + 1)];
}

/** Python's round(): halves to even, so boxes and sizes land on the same pixels as the service's. */
export function pythonRound(value: number): number {
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (fraction > 0.5) return floor + 1;
  if (fraction < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}
