// The cervix box drawn over the preview, in the preview frame's pixels (the canvas has the frame's size and
// is laid over the video with the same object-fit, so the two line up at any screen size).

const BOX_COLOURS = { accept: "#56B4E9", recapture: "#E69F00" } as const; // Okabe–Ito: colour-blind safe

export function drawBox(
  canvas: HTMLCanvasElement,
  frame: { width: number; height: number },
  box: [number, number, number, number] | null,
  accepted: boolean,
): void {
  if (canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas.width = frame.width;
    canvas.height = frame.height;
  }
  const context = canvas.getContext("2d")!;
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!box) return;
  const [x0, y0, x1, y1] = box;
  const line = Math.max(3, Math.round(frame.width / 160));
  context.lineWidth = line;
  // A dark outline under the colour keeps the box visible on pale and on red tissue alike.
  context.strokeStyle = "#000";
  context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  context.lineWidth = line / 2;
  context.setLineDash(accepted ? [] : [line * 3, line * 2]); // dashed when not yet good: not colour alone
  context.strokeStyle = accepted ? BOX_COLOURS.accept : BOX_COLOURS.recapture;
  context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  context.setLineDash([]);
}
