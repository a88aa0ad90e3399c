"""The learning-rate schedule, and the guard that skips non-finite updates.

Each stage's loop does its own backward, clipping and optimizer step; these are the
two pieces of bookkeeping around them that every stage shares.
"""

import math
import os

from cli import UserError
from distributed import print0


def lr_at(step, max_lr, warmup, total, min_lr_ratio=0.1):
    """Linear warmup to max_lr, then cosine decay to min_lr_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class NonFiniteGuard:
    """Says whether an update may be applied: not when the loss or the gradient norm is
    non-finite (the loop then drops the gradients and leaves the weights and optimizer
    state as they were; under DDP every rank sees the same all-reduced figures, so all
    of them skip together). After `limit` skipped updates in a row the run stops with a
    clear error, before anything else is written, so the last checkpoint on disk is the
    last good one."""

    def __init__(self, limit=10, ckpt_path=""):
        self.limit, self.ckpt_path, self.skipped, self.in_a_row = limit, ckpt_path, 0, 0

    def ok(self, grad_norm, step, loss=0.0):
        """True if the update may be applied; counts and reports the ones that may not."""
        if math.isfinite(grad_norm) and math.isfinite(loss):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        print0(f"warning: step {step}: non-finite loss or gradient, update skipped "
               f"({self.skipped} so far)")
        if self.in_a_row >= self.limit:
            kept = (f"{self.ckpt_path} holds the last good weights; "
                    if os.path.exists(self.ckpt_path) else "")
            raise UserError(f"{self.limit} non-finite updates in a row, at step {step}: "
                            f"stopping; {kept}try a lower --learning_rate or --grad_clip")
        return False

    def logged(self):
        """What goes into the step's log: the count of skipped updates, once there are any."""
        return {"skipped": self.skipped} if self.skipped else {}
