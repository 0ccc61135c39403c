// The decisions the capture loop makes from the gate's answers, apart from the page: when N consecutive
// preview frames pass, take the still; and the loop's own figures (frames per second, round trips).

import type { Assessment } from "./api";

export class AutoCapture {
  private passed = 0;

  /** `frames` consecutive passing frames trigger a still; 0 means never (the shutter only). */
  constructor(public frames: number) {}

  /** How many consecutive frames have passed so far. */
  get count(): number {
    return this.passed;
  }

  /** Counts a preview answer; true when this frame completes the run and a still should be taken. */
  observe(answer: Assessment): boolean {
    this.passed = answer.decision === "accept" ? this.passed + 1 : 0;
    return this.frames > 0 && this.passed >= this.frames;
  }

  reset(): void {
    this.passed = 0;
  }
}

/** What the loop measured: answers per second over the last few seconds and round-trip times. */
export class LoopStats {
  framesAnswered = 0;
  inFlight = 0;
  maxInFlight = 0;
  readonly roundTripsMs: number[] = [];
  private readonly answeredAt: number[] = [];

  started(): void {
    this.inFlight += 1;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
  }

  /** `counted`: an answered preview frame (stills and failures are not frames per second). */
  finished(roundTripMs: number, counted: boolean): void {
    this.inFlight -= 1;
    if (!counted) return;
    this.framesAnswered += 1;
    this.roundTripsMs.push(roundTripMs);
    if (this.roundTripsMs.length > 500) this.roundTripsMs.shift();
    const now = performance.now();
    this.answeredAt.push(now);
    while (this.answeredAt.length && now - this.answeredAt[0] > 5000) this.answeredAt.shift();
  }

  /** Answers per second over the last 5 s. */
  get framesPerSecond(): number {
    const span = this.answeredAt.length > 1 ? this.answeredAt[this.answeredAt.length - 1] - this.answeredAt[0] : 0;
    return span > 0 ? ((this.answeredAt.length - 1) * 1000) / span : 0;
  }
}
