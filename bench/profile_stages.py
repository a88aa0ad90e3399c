"""Benchmark: where a stage's time goes. Runs a stage's main() in this process, exactly as
`python <stage>.py <flags>` would, and adds up the wall time spent in each part of its work:

  startup      Python, torch and the stage's imports, before main() starts
  generation   GPT.generate: sampling answers token by token (its forwards included)
  forward      model forwards with gradients on: the training step's forward
  no-grad fwd  forwards with gradients off, outside generation and evaluation: the frozen
               reference, the reward model, log-probs of rollouts, the value model's pass
  backward     Tensor.backward
  optimizer    gradient clipping, Optimizer.step and zero_grad, and making the optimizer
               (a process's first one imports torch._dynamo: about 2 s on a CPU)
  data         reading data files and assembling batches
  evaluation   validation losses and accuracies, KL estimates (their forwards included)
  checkpoints  saving and loading checkpoints
  other        everything else: Python between the pieces, losses, advantages, logging

A part's time counts once, for the outermost part it falls in (a forward inside
validation is evaluation; a forward inside generation is generation). Each part is timed
by wrapping its functions; on a CPU every kernel runs before its call returns, so wall
time is the part's own. On a GPU, kernels run asynchronously: the times move to wherever
the host next waits, so read a GPU's table as a rough guide only.

    python bench/profile_stages.py sft.py                     # sft.py's default run, profiled
    python bench/profile_stages.py ppo.py --iterations=20     # any flags of the stage
    python bench/profile_stages.py --json=prof.jsonl pipeline # every stage of pipeline.py
    python bench/profile_stages.py pipeline --quick=true      # the same on the tiny world

`pipeline` runs the stages of `python pipeline.py` (same flags, same order, each its own
process, under this profiler) and prints one table, a row a stage. --json=F appends one
JSON line per stage to F: {"stage", "total_s", "parts": {part: seconds},
"calls": {part: count}}.
"""

import functools
import importlib
import json
import os
import subprocess
import sys
import time

T_START = time.time()  # before torch: the startup part starts here

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

PARTS = ("startup", "generation", "forward", "no-grad fwd", "backward", "optimizer", "data",
         "evaluation", "checkpoints", "other")
# functions by name, wherever a project module holds them (its own or imported)
DATA = {"micro_batches", "make_batches", "make_batch", "load_examples", "own_examples",
        "load_sets", "own_sets", "load_rankings", "own_rankings", "load_preference_sets",
        "token_stream", "load_prompts", "ptx_stream", "ptx_windows", "token_windows",
        "read_jsonl", "collate", "collate_pairs", "left_pad", "assemble", "rl_prompts",
        "comparison_tokens"}
EVALUATION = {"val_loss", "validate", "kl_to_reference"}
CHECKPOINTS = {"save", "load", "atomic_write"}
# module-level functions of one module only
EVALUATION_OF = {"reward": {"evaluate"}}


class Profile:
    """The running totals; one part at a time is open (the outermost)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)
        self.open = None
        self.undo = []  # (owner, name, original) to put back

    def timed(self, fn, part):
        """fn, timed as `part` unless a part is open already. `part` may be a function of
        no arguments that names the part at call time."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.open is not None:
                return fn(*args, **kwargs)
            self.open = part() if callable(part) else part
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[self.open] += time.perf_counter() - t
                self.calls[self.open] += 1
                self.open = None
        return wrapper

    def patch(self, owner, name, part):
        original = getattr(owner, name)
        self.undo.append((owner, name, original))
        setattr(owner, name, self.timed(original, part))

    def patch_everywhere(self, modules, fn, part):
        """Every project module's name for fn (`from x import fn` makes another)."""
        for m in modules:
            for name, value in list(vars(m).items()):
                if value is fn:
                    self.patch(m, name, part)

    def restore(self):
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


def project_modules():
    """The modules imported from the project's own files: the stages and shared modules at
    the top of the repository and data/ (not a virtual environment that lives in it)."""
    return [m for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and Path(m.__file__).parent in (ROOT, ROOT / "data")]


def instrument(prof, stage):
    """Wrap the functions of every part, in the modules imported so far."""
    import torch

    import checkpoint
    import model
    modules = project_modules()
    prof.patch(model.GPT, "generate", "generation")
    forward = lambda: "forward" if torch.is_grad_enabled() else "no-grad fwd"  # noqa: E731
    for m in modules:  # every nn.Module of the project that defines its own forward
        for value in list(vars(m).values()):
            if (isinstance(value, type) and issubclass(value, torch.nn.Module)
                    and value.__module__ == m.__name__ and "forward" in vars(value)):
                prof.patch(value, "forward", forward)
    prof.patch(torch.Tensor, "backward", "backward")
    prof.patch(torch.nn.utils, "clip_grad_norm_", "optimizer")
    prof.patch(torch.optim.Optimizer, "zero_grad", "optimizer")
    for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        for name in ("__init__", "step"):
            if name in vars(cls):
                prof.patch(cls, name, "optimizer")
    targets = {}  # function object -> part
    for m in modules:
        for name, value in vars(m).items():
            if not callable(value) or isinstance(value, type):
                continue
            if name in DATA:
                targets[value] = "data"
            elif name in EVALUATION or name in EVALUATION_OF.get(m.__name__, ()):
                targets[value] = "evaluation"
    for name in CHECKPOINTS:
        targets[getattr(checkpoint, name)] = "checkpoints"
    for fn, part in targets.items():
        prof.patch_everywhere(modules, fn, part)


def run_stage(script, flags, t_start=T_START):
    """One stage's main() under the profiler; returns its record. Startup is the time
    from t_start (this file's first line) to main()."""
    from cli import parse_config, user_errors

    name = script.removesuffix(".py").replace("/", ".")
    with user_errors():
        module = importlib.import_module(name)
        cfg = parse_config(module.Config, flags)
    prof = Profile()
    started = time.time()
    prof.seconds["startup"] = started - t_start
    instrument(prof, name)
    try:
        with user_errors():
            module.main(cfg)
    finally:
        prof.restore()
    total = time.time() - t_start
    prof.seconds["other"] = total - sum(v for k, v in prof.seconds.items() if k != "other")
    return dict(stage=script, total_s=round(total, 3),
                parts={k: round(v, 3) for k, v in prof.seconds.items()},
                calls={k: v for k, v in prof.calls.items() if v})


def table(records):
    """A row a stage: seconds in each part, its share of the stage's time in brackets."""
    head = "| stage | total s | " + " | ".join(PARTS) + " |"
    lines = [head, "|" + "---|" * (len(PARTS) + 2)]
    for r in records:
        cells = [f"{r['parts'][p]:.1f} ({r['parts'][p] / r['total_s']:.0%})"
                 if r['parts'][p] >= 0.05 else "" for p in PARTS]
        lines.append(f"| {r['stage']} | {r['total_s']:.1f} | " + " | ".join(cells) + " |")
    if len(records) > 1:
        total = sum(r["total_s"] for r in records)
        sums = [sum(r["parts"][p] for r in records) for p in PARTS]
        lines.append(f"| all | {total:.1f} | " + " | ".join(
            f"{s:.1f} ({s / total:.0%})" for s in sums) + " |")
    return "\n".join(lines)


def write_json(path, records):
    if path:
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def run_pipeline(flags, json_path):
    """Every stage of pipeline.py, each its own process under this profiler."""
    import pipeline
    from cli import UserError, parse_config, user_errors

    with user_errors():
        cfg = parse_config(pipeline.Config, flags)
    records, here = [], os.path.abspath(__file__)
    for script, stage_flags in pipeline.commands(cfg):
        print(f"\n$ python bench/profile_stages.py {script} {' '.join(stage_flags)}", flush=True)
        proc = subprocess.Popen([sys.executable, here, "--json=-", script, *stage_flags],
                                stdout=subprocess.PIPE, text=True)
        last = None  # the stage's output as it comes, but for its last line: the record
        for line in proc.stdout:
            if last is not None:
                print(last, end="", flush=True)
            last = line
        if proc.wait() != 0:
            with user_errors():
                raise UserError(f"`python {script}` failed (exit {proc.returncode}) "
                                f"under the profiler")
        records.append(json.loads(last))
    write_json(json_path, records)
    print("\n" + table(records))


def main(argv):
    json_path = ""
    while argv and argv[0].startswith("--json="):
        json_path = argv.pop(0).split("=", 1)[1]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    script, flags = argv[0], argv[1:]
    if script == "pipeline":
        return run_pipeline(flags, json_path)
    if not (ROOT / script).is_file() or not script.endswith(".py"):
        print(f"error: {script}: not a stage script of this repository (e.g. sft.py, "
              f"data/label.py, or pipeline)", file=sys.stderr)
        sys.exit(2)
    record = run_stage(script, flags)
    if json_path == "-":  # for run_pipeline: the record on the last line
        print(json.dumps(record))
        return
    write_json(json_path, [record])
    print("\n" + table([record]))


if __name__ == "__main__":
    main(sys.argv[1:])
