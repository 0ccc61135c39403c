// The worker's settings, kept in this browser's storage (never in a URL): language, auto-capture, the API
// key, the exam's acetic-acid wait and the mode.

import { browserLanguage, LANGUAGES, type Language } from "./i18n";

export type Mode = "single" | "exam";

export interface Settings {
  language: Language;
  /** Consecutive passing preview frames that trigger a still; 0 turns auto-capture off. */
  autoCaptureFrames: number;
  apiKey: string;
  /** The protocol's wait between applying acetic acid and the photo (one minute). */
  aceticWaitSeconds: number;
  mode: Mode;
  /** WebAssembly threads of the device gate; 0 = one per core, at most 2 (a phone's big cores). */
  deviceThreads: number;
}

const STORAGE_KEY = "cervigate.settings";

export function defaults(): Settings {
  return {
    language: browserLanguage(navigator.languages ?? [navigator.language]),
    autoCaptureFrames: 3,
    apiKey: "",
    aceticWaitSeconds: 60,
    mode: "single",
    deviceThreads: 0,
  };
}

function clampInt(value: unknown, low: number, high: number, fallback: number): number {
  const n = Number(value);
  return Number.isFinite(n) ? Math.min(high, Math.max(low, Math.round(n))) : fallback;
}

/** Stored settings, each checked: a hand-edited or older entry cannot break the page. */
export function load(storage: Storage = localStorage): Settings {
  const base = defaults();
  let stored: Record<string, unknown> = {};
  try {
    stored = JSON.parse(storage.getItem(STORAGE_KEY) ?? "{}") ?? {};
  } catch {
    stored = {};
  }
  const language = LANGUAGES.find((l) => l === stored.language) ?? base.language;
  return {
    language,
    autoCaptureFrames: clampInt(stored.autoCaptureFrames, 0, 30, base.autoCaptureFrames),
    apiKey: typeof stored.apiKey === "string" ? stored.apiKey.trim() : "",
    aceticWaitSeconds: clampInt(stored.aceticWaitSeconds, 0, 600, base.aceticWaitSeconds),
    mode: stored.mode === "exam" ? "exam" : "single",
    deviceThreads: clampInt(stored.deviceThreads, 0, 8, base.deviceThreads),
  };
}

export function save(settings: Settings, storage: Storage = localStorage): void {
  storage.setItem(STORAGE_KEY, JSON.stringify(settings));
}
