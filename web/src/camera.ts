// The rear camera at the highest resolution it offers, preview frames downscaled for the gate, and
// full-resolution stills (ImageCapture.takePhoto where the browser has it, else a full-size frame grab).

export const PREVIEW_LONG_SIDE = 640; // about 640×480: enough for the gate, small enough for a clinic's Wi-Fi
const PREVIEW_QUALITY = 0.85;
const STILL_QUALITY = 0.92;

export type StillSource = "takePhoto" | "canvas";

export interface Still {
  blob: Blob;
  source: StillSource;
  width: number;
  height: number;
}

interface ImageCaptureLike {
  takePhoto(): Promise<Blob>;
}
type FrameCallbackVideo = HTMLVideoElement & { requestVideoFrameCallback?: (callback: () => void) => number };
declare const ImageCapture: { new (track: MediaStreamTrack): ImageCaptureLike } | undefined;

export class Camera {
  private readonly previewCanvas = document.createElement("canvas");
  private framesShown = 0;
  private framesSent = -1;
  private waiters: (() => void)[] = [];
  private readonly countsFrames: boolean;

  private constructor(
    readonly video: HTMLVideoElement,
    private readonly track: MediaStreamTrack,
  ) {
    const counted = video as FrameCallbackVideo;
    this.countsFrames = typeof counted.requestVideoFrameCallback === "function";
    if (!this.countsFrames) return;
    const onFrame = () => {
      this.framesShown += 1;
      this.waiters.splice(0).forEach((resolve) => resolve());
      counted.requestVideoFrameCallback!(onFrame);
    };
    counted.requestVideoFrameCallback!(onFrame);
  }

  static async open(video: HTMLVideoElement): Promise<Camera> {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: false,
      video: { facingMode: { ideal: "environment" }, width: { ideal: 4096 }, height: { ideal: 3072 } },
    });
    const [track] = stream.getVideoTracks();
    await raiseToMaxResolution(track);
    video.srcObject = stream;
    await video.play();
    return new Camera(video, track);
  }

  get width(): number {
    return this.video.videoWidth;
  }

  get height(): number {
    return this.video.videoHeight;
  }

  /** Waits for a camera frame the gate has not seen yet, so a slow camera never sends one frame twice. */
  async freshFrame(): Promise<void> {
    if (!this.countsFrames) return;
    if (this.framesShown === this.framesSent) await new Promise<void>((resolve) => this.waiters.push(resolve));
    this.framesSent = this.framesShown;
  }

  /** The current frame, long side PREVIEW_LONG_SIDE, as a JPEG for the service. */
  async previewFrame(): Promise<{ blob: Blob; width: number; height: number }> {
    const { width, height } = this.previewSize();
    const blob = await grab(this.video, this.previewCanvas, width, height, PREVIEW_QUALITY);
    return { blob, width, height };
  }

  /** The same frame as pixels, for the device gate (no JPEG round trip). */
  previewPixels(): ImageData {
    const { width, height } = this.previewSize();
    return draw(this.video, this.previewCanvas, width, height).getImageData(0, 0, width, height);
  }

  private previewSize(): { width: number; height: number } {
    const scale = Math.min(1, PREVIEW_LONG_SIDE / Math.max(this.width, this.height));
    return { width: Math.round(this.width * scale), height: Math.round(this.height * scale) };
  }

  async still(): Promise<Still> {
    if (typeof ImageCapture !== "undefined") {
      try {
        const blob = await new ImageCapture(this.track).takePhoto();
        const bitmap = await createImageBitmap(blob);
        const still = { blob, source: "takePhoto" as const, width: bitmap.width, height: bitmap.height };
        bitmap.close();
        return still;
      } catch {
        // some cameras refuse takePhoto (or return nothing): the frame itself is the still
      }
    }
    const canvas = document.createElement("canvas");
    const blob = await grab(this.video, canvas, this.width, this.height, STILL_QUALITY);
    return { blob, source: "canvas", width: this.width, height: this.height };
  }

  stop(): void {
    this.track.stop();
  }
}

async function raiseToMaxResolution(track: MediaStreamTrack): Promise<void> {
  const capabilities = track.getCapabilities?.();
  const width = capabilities?.width?.max;
  const height = capabilities?.height?.max;
  if (!width || !height) return;
  try {
    await track.applyConstraints({ width: { ideal: width }, height: { ideal: height } });
  } catch {
    // the camera keeps the resolution getUserMedia gave
  }
}

function draw(video: HTMLVideoElement, canvas: HTMLCanvasElement, width: number, height: number): CanvasRenderingContext2D {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { alpha: false, willReadFrequently: true })!;
  context.imageSmoothingQuality = "high";
  context.drawImage(video, 0, 0, width, height);
  return context;
}

function grab(
  video: HTMLVideoElement,
  canvas: HTMLCanvasElement,
  width: number,
  height: number,
  quality: number,
): Promise<Blob> {
  draw(video, canvas, width, height);
  return new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("no frame"))), "image/jpeg", quality),
  );
}
