"""The whole pipeline in one command: every stage in order, each as its own process.

    python pipeline.py                 # the default run on the embedded world
    python pipeline.py --quick=true    # a tiny world and tiny models: checks that every stage runs
    python pipeline.py --device=cuda   # every stage on the GPU

Each stage is the command a user would type (printed before it runs), so a stage that
fails can be rerun or resumed by hand. The first failure stops the pipeline with that
stage's exit status. At the end: the time of each stage and the total.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from cli import UserError, parse_config, user_errors


@dataclass
class Config:
    data_dir: str = "data/world"  # where data/prepare.py writes the world
    out: str = "out"              # where the stages write their checkpoints and eval the report
    device: str = "auto"          # auto, cpu, cuda, cuda:N or mps (every stage but data/prepare.py)
    quick: bool = False           # tiny world and models, a few steps each: checks everything runs


# A tiny world and one-layer models with a few steps each: numbers mean nothing, but
# every stage runs, writes its checkpoint and its log, and the report is complete.
QUICK = {
    "data/prepare.py": ["--n_docs=400", "--vocab_size=320", "--n_sft=64", "--n_prefs=16",
                        "--n_rl=16", "--n_eval=2"],
    "pretrain.py": ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=160",
                    "--batch_size=8", "--max_steps=12", "--eval_interval=6", "--eval_batches=1",
                    "--log_interval=4", "--ckpt_interval=6", "--warmup_steps=2"],
    "sft.py": ["--batch_size=16", "--max_steps=6", "--eval_interval=3", "--log_interval=1",
               "--warmup_steps=2"],
    "data/label.py": ["--n_prompts=10", "--K=3", "--max_new_tokens=8"],
    "reward.py": ["--batch_size=4", "--max_steps=4", "--eval_interval=2", "--log_interval=1",
                  "--warmup_steps=1", "--norm_prompts=8", "--max_new_tokens=8"],
    "ppo.py": ["--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--max_new_tokens=8",
               "--iterations=3", "--sample_interval=2"],
    "dpo.py": ["--batch_size=4", "--max_steps=3", "--eval_interval=3", "--log_interval=1",
               "--warmup_steps=1", "--kl_prompts=4", "--max_new_tokens=8"],
    "eval.py": ["--max_new_tokens=8"],
}


def commands(cfg):
    """The stages in order, each as (script, flags)."""
    d, o = f"--data_dir={cfg.data_dir}", cfg.out
    device = [] if cfg.device == "auto" else [f"--device={cfg.device}"]
    stages = [
        ("data/prepare.py", [f"--out_dir={cfg.data_dir}"]),
        ("pretrain.py", [d, f"--out_dir={o}/pretrain", *device]),
        ("sft.py", [d, f"--init_from={o}/pretrain", f"--out_dir={o}/sft", *device]),
        ("data/label.py", [d, f"--policy={o}/sft", *device]),
        ("reward.py", [d, f"--init_from={o}/sft", f"--out_dir={o}/reward", *device]),
        ("ppo.py", [d, f"--init_from={o}/sft", f"--reward_from={o}/reward", f"--out_dir={o}/ppo",
                    *device]),
        ("dpo.py", [d, f"--init_from={o}/sft", f"--out_dir={o}/dpo", *device]),
        ("eval.py", [d, f"--out={o}", *device]),
    ]
    return [(script, flags + (QUICK[script] if cfg.quick else [])) for script, flags in stages]


# the signals a training stage stops on, saving first (distributed.StopSignal; not imported
# from there: the pipeline itself does not load torch)
STOPS = (signal.SIGTERM, signal.SIGINT)


def run_stage(argv: list[str]) -> int:
    """Run one stage in a process of its own and wait for it; its exit status (negative: the
    signal that ended it). A SIGTERM sent to the pipeline alone (`kill`, a job scheduler) is
    passed on to the stage, which would otherwise go on running, its run folder locked,
    after the pipeline has gone. Ctrl-C reaches the stage from the terminal: the pipeline
    waits while the stage saves its checkpoint and stops, instead of killing it."""
    stage = subprocess.Popen(argv)
    handlers = {signal.SIGTERM: lambda signum, frame: stage.send_signal(signum),
                signal.SIGINT: lambda signum, frame: None}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return stage.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def minutes(seconds):
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def main(cfg):
    # what would stop a later stage, checked before the first one writes anything
    for flag, path in (("--out", cfg.out), ("--data_dir", cfg.data_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag}={path} is a file, not a folder")
    if cfg.device != "auto":
        import distributed  # torch, only to check the device
        distributed.setup(0, cfg.device)
    here = os.path.dirname(os.path.abspath(__file__))
    times, t0 = [], time.time()
    for script, flags in commands(cfg):
        print(f"\n$ python {script} {' '.join(flags)}", flush=True)
        t = time.time()
        code = run_stage([sys.executable, os.path.join(here, script), *flags])
        times.append((script, time.time() - t))
        if code == 2:  # a user error: the stage has said what is wrong, in one line
            sys.exit(2)
        # stopped by a signal: killed by it (a negative status), or, for SIGTERM and Ctrl-C,
        # a training stage that saved its checkpoint first and exited with 128 + the signal
        signum = -code if code < 0 else code - 128 if code - 128 in STOPS else 0
        if signum:
            print(f"error: `python {script}` was stopped by {signal.Signals(signum).name}; the "
                  f"stages before it are done", file=sys.stderr)
            sys.exit(128 + signum)
        if code != 0:
            print(f"error: `python {script}` failed (exit {code}); the stages before it are done",
                  file=sys.stderr)
            sys.exit(code)
    print("\n" + "\n".join(f"{script:<16} {minutes(s)}" for script, s in times))
    print(f"total: {minutes(time.time() - t0)} for the whole pipeline; report: {cfg.out}/report.md")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
