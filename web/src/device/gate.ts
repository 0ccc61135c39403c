// The capture gate on the device: the same detector and quality models the service runs (ONNX Runtime Web,
// WebAssembly), preprocessed as their manifests say, judged by the service's rules with the manifests'
// thresholds (service/pipeline/stages.py detect_cervix / check_quality, rules.py, measures.py). Used when
// the service cannot be reached; its answer has the shape of /v1/quality's.

import * as ort from "onnxruntime-web/wasm";

import type { Assessment, Client, Reason } from "../api";
import { cropBox, crop, fit, normalize, type InputSpec, type Placement, type Rgb } from "./preprocess";

interface Manifest {
  name: string;
  version: string;
  sha256: string;
  input: InputSpec;
  thresholds: Record<string, number>;
  labels: Record<string, string[]>;
  extra: Record<string, unknown>;
}

interface GateInfo {
  models: { name: string; version: string; sha256: string; bytes: number; manifest_url: string; model_url: string }[];
  rules: {
    focus_threshold: string;
    max_cervix_distance: number | null;
    min_cervix_area_fraction: number;
    min_cervix_crop_px: number;
    cut_off_max_extent: number;
    edge_tolerance: number;
    tissue_sample_pixels: number;
  };
  reasons: string[];
  messages: Record<string, Record<string, string>>;
  advice: Record<string, Record<string, string>>;
}

interface Model {
  manifest: Manifest;
  session: ort.InferenceSession;
}

export interface DeviceAnswer extends Assessment {
  timings_ms: { detect: number; quality: number; total: number };
}

export class IntegrityError extends Error {}

async function sha256Hex(bytes: ArrayBuffer): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchOk(client: Client, url: string): Promise<Response> {
  const headers: Record<string, string> = {};
  if (client.apiKey) headers["Authorization"] = `Bearer ${client.apiKey}`;
  const response = await fetch(url, { headers, credentials: "omit" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

export class DeviceGate {
  private constructor(
    readonly info: GateInfo,
    private readonly detector: Model,
    private readonly quality: Model,
    readonly downloadBytes: number,
    readonly threads: number,
  ) {}

  /** Downloads (or takes from the service worker's cache) both models, checks their sha256 against their
   * manifests, and opens them with `threads` WebAssembly threads (more than 1 needs cross-origin isolation). */
  static async load(client: Client, threads = 1): Promise<DeviceGate> {
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    const usable = self.crossOriginIsolated ? threads : 1;
    ort.env.wasm.numThreads = usable;
    const info = (await (await fetchOk(client, "/v1/gate")).json()) as GateInfo;
    const models: Model[] = [];
    for (const name of ["detector", "quality"]) {
      const entry = info.models.find((m) => m.name === name);
      if (!entry) throw new IntegrityError(`the service offers no ${name} for the device gate`);
      const manifest = (await (await fetchOk(client, entry.manifest_url)).json()) as Manifest;
      const bytes = await (await fetchOk(client, entry.model_url)).arrayBuffer();
      const digest = await sha256Hex(bytes);
      if (digest !== manifest.sha256 || digest !== entry.sha256) {
        throw new IntegrityError(`${name}: downloaded sha256 ${digest}, manifest says ${manifest.sha256}`);
      }
      const session = await ort.InferenceSession.create(new Uint8Array(bytes), {
        executionProviders: ["wasm"],
        graphOptimizationLevel: "all",
      });
      models.push({ manifest, session });
    }
    const total = info.models.reduce((sum, m) => sum + m.bytes, 0);
    return new DeviceGate(info, models[0], models[1], total, usable);
  }

  get versions(): Record<string, string> {
    return { detector: this.detector.manifest.version, quality: this.quality.manifest.version };
  }

  /** The preview gate on one upright RGB frame: what /v1/quality would answer, in `language`. */
  async assess(image: Rgb, stage: string, language: string): Promise<DeviceAnswer> {
    const started = performance.now();
    const detection = await this.detect(image);
    const detected = performance.now();
    const answer = (reasons: string[], box: DeviceAnswer["cervix"]["box"], quality: DeviceAnswer["quality"]) => {
      const ordered = this.info.reasons.filter((code) => reasons.includes(code));
      const messages = this.info.messages[language] ?? this.info.messages.en;
      const advice = this.info.advice[language] ?? this.info.advice.en;
      const finished = performance.now();
      return {
        id: crypto.randomUUID(),
        decision: ordered.length ? "recapture" : "accept",
        reasons: ordered.map((code): Reason => ({ code, message: messages[code] })),
        advice: ordered.length ? advice[ordered[0]] : null,
        cervix: { found: box !== null, score: detection.score, box },
        quality,
        lesion: null,
        diagnosis: null,
        timings_ms: { detect: detected - started, quality: finished - detected, total: finished - started },
      } satisfies DeviceAnswer;
    };
    if (!detection.box) return answer([this.unseenCervixReason(image)], null, null);
    const reasons = this.framingReasons(detection.box, image);
    const margin = Number(this.quality.manifest.extra.crop_margin);
    const region = cropBox(detection.box, image.width, image.height, margin);
    const quality = await this.checkQuality(crop(image, region));
    reasons.push(...this.qualityReasons(quality, stage === "acetic"));
    const { p_acetic: _, ...shown } = quality;
    return answer(reasons, detection.box, shown);
  }

  // --- stages (service/pipeline/stages.py) ------------------------------------------------------------

  private async run(model: Model, image: Rgb): Promise<{ outputs: ort.InferenceSession.OnnxValueMapType; placement: Placement }> {
    const spec = model.manifest.input;
    const { fitted, placement } = fit(image, spec);
    const tensor = new ort.Tensor("float32", normalize(fitted, spec), [1, 3, spec.height, spec.width]);
    return { outputs: await model.session.run({ [spec.name]: tensor }), placement };
  }

  private async detect(image: Rgb): Promise<{ score: number; box: [number, number, number, number] | null }> {
    const { outputs, placement } = await this.run(this.detector, image);
    const score = sigmoid((outputs.cervix_logit.data as Float32Array)[0]);
    // Typicality, as the service: unlike every cervix photo the detector learned from is no cervix photo.
    const maxDistance = this.info.rules.max_cervix_distance;
    const distance = outputs.cervix_distance ? (outputs.cervix_distance.data as Float32Array)[0] : null;
    const atypical = maxDistance !== null && (distance === null || distance > maxDistance);
    if (score < this.detector.manifest.thresholds.cervix_present || atypical) return { score, box: null };
    const spec = this.detector.manifest.input;
    const [cx, cy, w, h] = Array.from(outputs.box.data as Float32Array);
    const inInput = [(cx - w / 2) * spec.width, (cy - h / 2) * spec.height, (cx + w / 2) * spec.width, (cy + h / 2) * spec.height];
    const x0 = (inInput[0] - placement.padX) / placement.scaleX;
    const y0 = (inInput[1] - placement.padY) / placement.scaleY;
    const x1 = (inInput[2] - placement.padX) / placement.scaleX;
    const y1 = (inInput[3] - placement.padY) / placement.scaleY;
    const box: [number, number, number, number] = [Math.max(0, x0), Math.max(0, y0), Math.min(image.width, x1), Math.min(image.height, y1)];
    if (box[2] - box[0] < 1 || box[3] - box[1] < 1) return { score, box: null };
    return { score, box };
  }

  private async checkQuality(cropped: Rgb) {
    const manifest = this.quality.manifest;
    const { outputs } = await this.run(this.quality, cropped);
    const sharpness = sigmoid((outputs.sharp_logit.data as Float32Array)[0]);
    const stages = manifest.labels.stage_logits;
    const blurs = manifest.labels.blur_kind_logits;
    const stageP = softmax(Array.from(outputs.stage_logits.data as Float32Array));
    const blur = blurs[argmax(Array.from(outputs.blur_kind_logits.data as Float32Array))];
    const tissue = this.measureTissue(cropped);
    const acetic = stages.indexOf("acetic");
    const pAcetic = stageP[acetic];
    // As rules.shown_stage: acetic acid unless the not_acetic rule flags the photo, so that an accepted
    // photo never shows another stage.
    const others = stageP.map((p, i) => (i === acetic ? -1 : p));
    const examStage = pAcetic >= manifest.thresholds.not_acetic ? "acetic" : stages[argmax(others)];
    return {
      sharpness,
      not_sharp: 1 - sharpness >= manifest.thresholds[this.info.rules.focus_threshold],
      blur_kind: blur,
      exposure: tissue.exposure,
      glare_fraction: tissue.glare,
      exam_stage: examStage,
      p_acetic: pAcetic,
    };
  }

  // --- rules (service/pipeline/rules.py) and measures (measures.py) ------------------------------------

  private unseenCervixReason(image: Rgb): string {
    const { exposure } = this.measureTissue(image);
    return exposure === "dark" ? "too_dark" : exposure === "over" ? "overexposed" : "no_cervix";
  }

  private framingReasons([x0, y0, x1, y1]: [number, number, number, number], image: Rgb): string[] {
    const rules = this.info.rules;
    const cutOff = (low: number, high: number, size: number) => {
      const tolerance = rules.edge_tolerance * size;
      const touchesLow = low <= tolerance;
      const touchesHigh = high >= size - tolerance;
      return touchesLow !== touchesHigh && high - low < rules.cut_off_max_extent * size;
    };
    const reasons: string[] = [];
    if (cutOff(x0, x1, image.width) || cutOff(y0, y1, image.height)) reasons.push("cervix_cut_off");
    const smallArea = (x1 - x0) * (y1 - y0) < rules.min_cervix_area_fraction * image.width * image.height;
    if (smallArea || Math.min(x1 - x0, y1 - y0) < rules.min_cervix_crop_px) reasons.push("cervix_too_small");
    return reasons;
  }

  private qualityReasons(quality: Awaited<ReturnType<DeviceGate["checkQuality"]>>, expectAcetic: boolean): string[] {
    const t = this.quality.manifest.thresholds;
    const reasons: string[] = [];
    if (quality.exposure === "dark") reasons.push("too_dark");
    else if (quality.exposure === "over") reasons.push("overexposed");
    if (quality.glare_fraction > t.glare_max) reasons.push("glare");
    if (quality.not_sharp) reasons.push(quality.blur_kind === "motion" ? "motion_blur" : "out_of_focus");
    if (expectAcetic && quality.p_acetic < t.not_acetic) reasons.push("not_acetic");
    return reasons;
  }

  /** Exposure and glare over the central tissue ellipse, sampled on the service's grid. */
  private measureTissue(image: Rgb): { exposure: "ok" | "dark" | "over"; glare: number } {
    const t = this.quality.manifest.thresholds;
    const measure = this.quality.manifest.extra.exposure_measure as { tissue_semi_axes: [number, number]; saturated_level: number };
    const [ax, ay] = measure.tissue_semi_axes;
    const { width: w, height: h, data } = image;
    const stride = Math.max(1, Math.ceil(Math.sqrt((h * w) / this.info.rules.tissue_sample_pixels)));
    let count = 0;
    let lumaSum = 0;
    let white = 0;
    let clipped = 0;
    for (let y = 0; y < h; y += stride) {
      const dy = (y - (h - 1) / 2) / Math.max(ay * h, 0.5);
      for (let x = 0; x < w; x += stride) {
        const dx = (x - (w - 1) / 2) / Math.max(ax * w, 0.5);
        if (dy * dy + dx * dx > 1) continue;
        const p = (y * w + x) * 3;
        const [r, g, b] = [data[p], data[p + 1], data[p + 2]];
        const luma = (r * 77 + g * 150 + b * 29) / (256 * 255);
        count++;
        lumaSum += luma;
        if (luma >= t.white_luma) white++;
        const level = measure.saturated_level;
        if (r >= level && g >= level && b >= level) clipped++;
      }
    }
    if (count === 0) return { exposure: "ok", glare: 0 };
    const mean = lumaSum / count;
    const exposure = mean < t.dark_max ? "dark" : mean > t.over_min || white / count > t.over_white_max ? "over" : "ok";
    return { exposure, glare: clipped / count };
  }
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

function softmax(logits: number[]): number[] {
  const top = Math.max(...logits);
  const exps = logits.map((v) => Math.exp(v - top));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((v) => v / total);
}

function argmax(values: number[]): number {
  return values.reduce((best, v, i) => (v > values[best] ? i : best), 0);
}
