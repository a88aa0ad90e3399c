"""The log: a console line every few steps, and every logged figure in log.jsonl."""

import dataclasses
import json
import os
import time

from cli import UserError
from distributed import print0


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Logger:
    """A console line every `interval` steps (loss, tokens/s, ETA) and every logged
    figure in out_dir/log.jsonl, one JSON object per line; the first line of a run (and
    of each resume) is {"config": ...}. A resumed run (start_step > 0) first drops the
    lines of steps from start_step on: a run killed after its last checkpoint had logged
    steps that the resumed run logs again. Only the master process writes."""

    def __init__(self, out_dir, cfg, total_steps, interval, master, start_step=0, append=False):
        self.total, self.interval, self.master, self.start = (total_steps, interval, master,
                                                              start_step)
        self.path = os.path.join(out_dir, "log.jsonl")
        self.t0, self.last_t, self.tokens = time.time(), time.time(), 0
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if start_step == 0 and not append and os.path.exists(self.path):
                os.remove(self.path)
            elif start_step > 0 and not append and os.path.exists(self.path):
                self.drop_steps_from(start_step)
        self.write({"config": dataclasses.asdict(cfg), "start_step": start_step})

    def drop_steps_from(self, start_step):
        """Rewrite the log without the step lines of start_step on (and without a last line
        cut short by the kill), through a temporary file and a rename."""
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not (isinstance(rec, dict) and rec.get("step", -1) >= start_step):
                    kept.append(line if line.endswith("\n") else line + "\n")
        try:
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        except OSError as e:
            raise UserError(f"could not write {self.path}: {e.strerror or e}") from None

    def write(self, record):
        if self.master:
            try:
                append_jsonl(self.path, record)
            except OSError as e:
                raise UserError(f"could not write {self.path}: {e.strerror or e}") from None

    def step(self, step, tokens, force=False, show=None, **metrics):
        """Call once per optimizer step with the tokens it processed (all ranks); `force`
        logs this step off the interval (a step that carries an evaluation); `show` names
        the metrics printed on the console (default: all; the JSONL file gets all)."""
        self.tokens += tokens
        if step % self.interval and step != self.total - 1 and not force:
            return
        now = time.time()
        dt = now - self.last_t
        tok_s = self.tokens / max(dt, 1e-9)
        eta = (now - self.t0) / (step + 1 - self.start) * (self.total - step - 1)
        self.last_t, self.tokens = now, 0
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()},
               "tok_per_s": round(tok_s, 1), "elapsed_s": round(now - self.t0, 2)}
        self.write(rec)
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if show is None or k in show)
        print0(f"step {step:>5}/{self.total} | {shown} | {tok_s / 1e3:.1f}k tok/s | eta {eta:.0f}s")
