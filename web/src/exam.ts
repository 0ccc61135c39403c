// The exam's steps as the protocol has them: a photo after normal saline, then acetic acid is applied and,
// one minute later (the acetowhitening needs it), a photo after acetic acid. The exam endpoint judges them
// together (POST /v1/exams with the stage of each).

import type { Key } from "./i18n";

export interface Step {
  stage: "saline" | "acetic";
  title: Key;
  /** Seconds to wait before this step's photo, counted from the previous photo. */
  waitSeconds: number;
}

export class ExamFlow {
  readonly steps: Step[];
  private readonly taken: (Blob | null)[];
  private index = 0;
  private waitPending = false;
  complete = false;

  constructor(aceticWaitSeconds: number) {
    this.steps = [
      { stage: "saline", title: "stepSaline", waitSeconds: 0 },
      { stage: "acetic", title: "stepAcetic", waitSeconds: aceticWaitSeconds },
    ];
    this.taken = this.steps.map(() => null);
  }

  get current(): Step {
    return this.steps[this.index];
  }

  /** The countdown before the current step, once: `tick(s)` each second, then `tick(0)`. */
  async waitForStep(tick: (secondsLeft: number) => void): Promise<void> {
    if (!this.waitPending) return;
    for (let left = this.current.waitSeconds; left > 0; left--) {
      tick(left);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    this.waitPending = false;
    tick(0);
  }

  /** Keeps the current step's photo; true when every step has one. */
  record(photo: Blob): boolean {
    this.taken[this.index] = photo;
    const next = this.taken.findIndex((p) => p === null);
    if (next === -1) {
      this.complete = true;
      return true;
    }
    this.waitPending = next > this.index && this.steps[next].waitSeconds > 0;
    this.index = next;
    return false;
  }

  photos(): { blob: Blob; stage: string }[] {
    return this.taken.map((blob, i) => ({ blob: blob!, stage: this.steps[i].stage }));
  }

  /** Take photo `index` again (the exam said so); the others are kept. */
  retake(index: number): void {
    this.taken[index] = null;
    this.index = index;
    this.complete = false;
    this.waitPending = false;
  }

  retakeLast(): void {
    this.retake(this.steps.length - 1);
  }
}
