// The service's API as this page uses it: same origin (CORS stays closed), the key in a header (never in a
// URL), the advice language as Accept-Language, and problem+json errors turned into typed failures.

import type { Language } from "./i18n";

export interface Reason {
  code: string;
  message: string;
}

export interface Assessment {
  id: string;
  decision: "recapture" | "accept" | "diagnosis";
  reasons: Reason[];
  advice: string | null;
  cervix: { found: boolean; score: number; box: [number, number, number, number] | null };
  quality: { sharpness: number; exposure: string; glare_fraction: number; exam_stage: string } | null;
  lesion: { area_fraction: number; overlay_jpeg: string | null } | null;
  diagnosis: { label: string; probability: number; referral: boolean } | null;
}

export interface Exam {
  id: string;
  decision: "recapture" | "diagnosis";
  reasons: Reason[];
  advice: string | null;
  photos: { index: number; stage: string | null; assessment: Assessment | null }[];
  retake: { index: number; reasons: Reason[]; problem: string | null; advice: string }[];
  review_index: number | null;
  diagnosis: { probability: number; referral: boolean } | null;
}

/** The service answered with a problem (RFC 9457): `status` and its stable `code`. */
export class ProblemError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    detail: string,
    readonly retryAfterSeconds: number | null,
  ) {
    super(detail);
  }
}

/** The request never got an answer (server down, network gone). */
export class UnreachableError extends Error {}

export interface Client {
  language: Language;
  apiKey: string;
}

async function post<T>(client: Client, path: string, body: BodyInit, contentType?: string, timeoutMs?: number): Promise<T> {
  const headers: Record<string, string> = { "Accept-Language": client.language, Accept: "application/json" };
  if (contentType) headers["Content-Type"] = contentType;
  if (client.apiKey) headers["Authorization"] = `Bearer ${client.apiKey}`;
  let response: Response;
  try {
    const signal = timeoutMs ? AbortSignal.timeout(timeoutMs) : undefined;
    response = await fetch(path, { method: "POST", body, headers, cache: "no-store", credentials: "omit", signal });
  } catch (error) {
    throw new UnreachableError(String(error));
  }
  if (response.ok) return (await response.json()) as T;
  let code = "http_" + response.status;
  let detail = response.statusText;
  try {
    const problem = await response.json();
    code = problem.code ?? code;
    detail = problem.detail ?? detail;
  } catch {
    // not problem+json (a proxy's error page): keep the status
  }
  const retryAfter = Number(response.headers.get("Retry-After"));
  throw new ProblemError(response.status, code, detail, Number.isFinite(retryAfter) ? retryAfter : null);
}

/** The fast gate for a preview frame; `stage` is the exam stage the photo should show. */
export function quality(client: Client, frame: Blob, stage: string, timeoutMs?: number): Promise<Assessment> {
  const path = `/v1/quality?stage=${encodeURIComponent(stage)}`;
  return post(client, path, frame, frame.type || "image/jpeg", timeoutMs);
}

/** The full chain for a still, with the lesion overlay to show. */
export function assess(client: Client, still: Blob): Promise<Assessment> {
  return post(client, "/v1/assess?include=overlay", still, still.type || "image/jpeg");
}

/** One patient's photos with the stage each shows. */
export function exam(client: Client, photos: { blob: Blob; stage: string }[]): Promise<Exam> {
  const form = new FormData();
  photos.forEach((photo, i) => form.append("image", photo.blob, `photo-${i}.jpg`));
  form.append("stages", photos.map((photo) => photo.stage).join(","));
  return post(client, "/v1/exams?include=overlay", form);
}
