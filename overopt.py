"""The reward-hacking lab: push the SFT model harder and harder against the reward model
and watch what the reward model says (the proxy reward) part ways with what is true (the
gold score) as the policy moves away from SFT.

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") measure distance from
the initial policy as d = √KL and find, for best-of-n and for RL alike, that the proxy
keeps rising with d while the gold score rises, peaks and falls. Here every point is
measured, not modelled: the embedded world's gold scorer grades every answer exactly.

Two ways to move away from SFT, both against the reward model in out/reward:
  - PPO (ppo.py) with fixed KL coefficients --betas; β = 0 leaves nothing holding it back
  - best-of-n from SFT for each n in --best_of; its KL is taken as log n − (n−1)/n, an
    upper bound (Beirami et al. 2024)
Every resulting policy answers the held-out prompts at temperature 1; the same answers
give the gold score, the proxy reward and the KL sample. The PPO logs add each run's path
on its training rollouts (gold/score beside objective/score at every iteration).

    python overopt.py                          # one seed
    python overopt.py --seeds=1337,1,2         # three seeds, one after another
    python overopt.py --betas=0,0.1 --best_of=1,16 --iterations=40   # a quick look

Needs out/sft and out/reward (`python pipeline.py` makes them). Writes
out/overopt/results.json, report.md and overopt.png (when matplotlib is installed; the
tables otherwise). Each PPO run has its own folder, out/overopt/seed<S>_beta<B>/: a
finished run is reused and an interrupted one resumed, so rerunning the command after a
kill continues where it stopped. `python eval.py` then copies the section into
out/report.md.
"""

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import checkpoint
import distributed
import eval as evaluation
import ppo
from cli import UserError, number_list, parse_config, ranges, user_errors
from data import world
from distributed import print0
from records import read_jsonl, world_tokenizer
from reward_model import load_reward_model


@dataclass
class Config:
    seeds: str = "1337"  # comma-separated seeds: each one PPO run per β and one best-of-n
    betas: str = "0,0.02,0.05,0.1,0.3"  # fixed KL coefficients for PPO
    best_of: str = "1,2,4,8,16,32,64"   # n for best-of-n from SFT
    iterations: int = 120               # PPO iterations per run (longer than ppo.py's default)
    ppo_flags: str = ""                 # more flags for every ppo.py run, space-separated
    data_dir: str = "data/world"        # folder written by data/prepare.py
    sft_from: str = "out/sft"           # the starting policy and KL reference
    reward_from: str = "out/reward"     # the proxy reward
    out_dir: str = "out/overopt"        # runs, results.json, report.md, overopt.png
    max_new_tokens: int = 32            # answer length limit in the evaluation (ppo.py's default)
    batch_size: int = 64                # prompts per generation batch in the evaluation
    device: str = "auto"                # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="iterations max_new_tokens batch_size")


def run_flags(cfg, seed, beta, out, resume):
    """The ppo.py flags of one run that overopt.py sets itself (--ppo_flags adds others)."""
    return [f"--kl_coef={beta}", "--adaptive_kl=false", f"--seed={seed}",
            f"--iterations={cfg.iterations}", f"--data_dir={cfg.data_dir}",
            f"--init_from={cfg.sft_from}", f"--reward_from={cfg.reward_from}", f"--out_dir={out}",
            f"--device={cfg.device}", "--sample_interval=0", f"--resume={resume}"]


def ppo_run(cfg, seed, beta):
    """Run ppo.py for one (seed, β) unless it already finished; returns its folder."""
    out = os.path.join(cfg.out_dir, f"seed{seed}_beta{beta:g}")
    ckpt = os.path.join(out, "ckpt.pt")
    flags = [*run_flags(cfg, seed, beta, out, os.path.exists(ckpt)), *cfg.ppo_flags.split()]
    if os.path.exists(ckpt):  # reused or continued only if made with the same settings
        ck = checkpoint.load(ckpt)
        want = dataclasses.asdict(parse_config(ppo.Config, flags))
        differ = sorted(k for k in want if k != "resume" and ck.get("config", {}).get(k) != want[k])
        if differ:
            raise UserError(f"{out} holds a PPO run with other settings ({', '.join(differ)}): "
                            f"choose another --out_dir or remove it")
        if ck.get("step") == cfg.iterations:
            print0(f"PPO β={beta:g} seed {seed}: finished earlier, reusing {out}")
            return out
    cmd = [sys.executable, "ppo.py", *flags]
    print0(f"PPO β={beta:g} seed {seed}: {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(os.path.join(cfg.out_dir, f"seed{seed}_beta{beta:g}.out"), "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc == 2:  # ppo.py refused a flag or a file: its one line says which; no log kept
        lines = open(f.name).read().splitlines()
        os.remove(f.name)
        with contextlib.suppress(OSError):  # out_dir too, when nothing else is in it yet
            os.rmdir(cfg.out_dir)
        said = next((x for x in reversed(lines) if x.startswith("error: ")), f"exit {rc}")
        raise UserError(f"ppo.py (run {os.path.basename(out)}) stopped: {said[7:]}")
    if rc != 0:
        raise UserError(f"`python {' '.join(cmd[1:])}` failed (exit {rc}): see {f.name}")
    print0(f"  done in {time.time() - t0:.0f}s")
    return out


def point(rows, **extra):
    """One point of the curve: means over the held-out answers."""
    s = evaluation.summarize(rows)
    return dict(kl=s["kl"], sqrt_kl=math.sqrt(max(s["kl"], 0.0)), proxy=s["proxy"], gold=s["gold"],
                correct=s["correct"], preamble=s["preamble"], restate=s["restate"],
                words=s["words"], **extra)


def trajectory(log_path):
    """A PPO run's training path: (KL, proxy, gold) of its rollouts at every iteration."""
    return [dict(step=r["step"], kl=r["objective/kl"], proxy=r["objective/score"],
                 gold=r["gold/score"])
            for r in evaluation.read_log(log_path) if "gold/score" in r]


def table(points):
    lines = ["| seed | method | KL | √KL | proxy | gold | correct | preamble | restate | words |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['seed']} | {p['method']} | {p['kl']:.2f} | {p['sqrt_kl']:.2f} | "
                     f"{p['proxy']:+.2f} | {p['gold']:.2f} | {p['correct']:.0%} | "
                     f"{p['preamble']:.0%} | {p['restate']:.0%} | {p['words']:.1f} |")
    return "\n".join(lines)


def findings(points):
    """What the points say, per seed and method, in numbers: where the gold score peaks,
    and how proxy and gold moved from the nearest point to the farthest."""
    out = []
    for seed in sorted({p["seed"] for p in points}):
        for kind in ("PPO", "best-of-n"):
            ps = sorted([p for p in points if p["seed"] == seed and p["method"].startswith(kind)],
                        key=lambda p: p["kl"])
            if len(ps) < 2:
                continue
            peak = max(ps, key=lambda p: p["gold"])
            near, far = ps[0], ps[-1]
            out.append(f"- seed {seed}, {kind}: from {near['method']} (√KL {near['sqrt_kl']:.2f}) "
                       f"to {far['method']} (√KL {far['sqrt_kl']:.2f}) the proxy goes "
                       f"{near['proxy']:+.2f} → {far['proxy']:+.2f} and the gold score "
                       f"{near['gold']:.2f} → {far['gold']:.2f}; gold peaks at {peak['method']} "
                       f"({peak['gold']:.2f}, √KL {peak['sqrt_kl']:.2f}).")
    return "\n".join(out)


def plot(points, paths, png):
    """Gold and proxy against √KL; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("gold", "proxy")):
        for (seed, beta), path in paths.items():  # training paths, thin
            ax.plot([math.sqrt(max(p["kl"], 0)) for p in path], [p[key] for p in path],
                    color="tab:blue", lw=0.5, alpha=0.3)
        for seed in sorted({p["seed"] for p in points}):
            for kind, color in (("PPO", "tab:blue"), ("best-of-n", "tab:orange")):
                ps = sorted([p for p in points if p["seed"] == seed
                             and p["method"].startswith(kind)], key=lambda p: p["kl"])
                ax.plot([p["sqrt_kl"] for p in ps], [p[key] for p in ps], marker="o", color=color,
                        label=kind if seed == min(p["seed"] for p in points) else None)
                for p in ps:
                    ax.annotate(p["method"].split(" ", 1)[1], (p["sqrt_kl"], p[key]), fontsize=6)
        ax.set_xlabel("√KL(π ‖ π_sft)  (nats^½)")
        ax.set_ylabel("gold score (true)" if key == "gold" else "proxy reward (reward model)")
        ax.set_title(f"{key} vs distance from SFT (thin: PPO training rollouts)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    checkpoint.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def main(cfg):
    run = distributed.setup(0, cfg.device)
    seeds = number_list(cfg.seeds, "--seeds")
    betas = number_list(cfg.betas, "--betas", float, minimum=0.0)
    ns = number_list(cfg.best_of, "--best_of", minimum=1)
    if not seeds or not (betas or ns):
        raise UserError("--seeds and at least one of --betas and --best_of must name something "
                        "to run")
    try:  # ppo.py's flags, checked before the first run starts
        parse_config(ppo.Config, cfg.ppo_flags.split())
    except UserError as e:
        raise UserError(f"--ppo_flags={cfg.ppo_flags!r}: {e}") from None
    own = {f.split("=")[0] for f in run_flags(cfg, 0, 0.0, cfg.out_dir, False)}
    for name in (f.split("=")[0] for f in cfg.ppo_flags.split()):
        if name in own:  # each run's command sets it: overopt.py's own flags decide it
            raise UserError(f"--ppo_flags={cfg.ppo_flags!r}: overopt.py sets {name} for each run "
                            f"(python overopt.py --help lists what you can set)")
    enc = world_tokenizer(cfg.data_dir)
    ref, _ = checkpoint.load_model(os.path.join(cfg.sft_from, "ckpt.pt"), "python sft.py", enc,
                                   device=run.device)
    reward_model, _ = load_reward_model(os.path.join(cfg.reward_from, "ckpt.pt"),
                                        "python reward.py", enc, device=run.device)
    ref.eval()
    records = read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"), {"task": dict, "prompt": str})
    tasks = [world.Task.from_dict(r["task"]) for r in records]
    ecfg = evaluation.Config(data_dir=cfg.data_dir, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size)
    os.makedirs(cfg.out_dir, exist_ok=True)
    print0(f"over-optimisation: seeds {seeds}, PPO β {betas}, best-of-n n {ns}, "
           f"{len(tasks)} held-out prompts")

    points, paths, t_start = [], {}, time.time()
    for seed in seeds:
        t0 = time.time()
        for beta in betas:
            out = ppo_run(cfg, seed, beta)
            policy, _ = checkpoint.load_model(os.path.join(out, "ckpt.pt"), "python ppo.py", enc,
                                              device=run.device)
            rows = evaluation.evaluate(policy.eval(), enc, tasks, ecfg, run.device, 1.0, seed,
                                       reward_model, ref)
            points.append(point(rows, seed=seed, method=f"PPO β={beta:g}"))
            paths[(seed, beta)] = trajectory(os.path.join(out, "log.jsonl"))
            print0(f"  PPO β={beta:g}: KL {points[-1]['kl']:.2f}, "
                   f"proxy {points[-1]['proxy']:+.2f}, gold {points[-1]['gold']:.2f}")
        if ns:
            ecfg.seed = seed
            for n, rows in evaluation.best_of_n(ref, reward_model, enc, tasks, ns, ecfg,
                                                run.device).items():
                for row in rows:
                    row["kl"] = evaluation.best_of_n_kl(n)
                points.append(point(rows, seed=seed, method=f"best-of-n n={n}"))
                print0(f"  best-of-{n}: KL {points[-1]['kl']:.2f}, "
                       f"proxy {points[-1]['proxy']:+.2f}, gold {points[-1]['gold']:.2f}")
        print0(f"seed {seed}: {time.time() - t0:.0f}s")
        results = dict(config=dataclasses.asdict(cfg), points=points,
                       paths={f"seed{s}_beta{b:g}": p for (s, b), p in paths.items()})
        checkpoint.atomic_write(os.path.join(cfg.out_dir, "results.json"),
                             lambda f: f.write(json.dumps(results, indent=1).encode()))

    png = os.path.join(cfg.out_dir, "overopt.png")
    figure = ("![gold and proxy against √KL](overopt.png)" if plot(points, paths, png) else
              "(matplotlib is not installed, so no figure: `pip install matplotlib` and rerun; "
              "the runs are reused)")
    report = "\n".join([
        "# Over-optimisation\n",
        f"`python overopt.py --seeds={cfg.seeds} --betas={cfg.betas} --best_of={cfg.best_of} "
        f"--iterations={cfg.iterations}` ({(time.time() - t_start) / 60:.1f} min). "
        f"Every policy answers the {len(tasks)} held-out prompts at temperature 1; "
        f"proxy: the reward model's score of those answers; gold: the gold scorer's; "
        f"KL: the mean of Σ log π/π_sft over the same answers (best-of-n: log n − (n−1)/n).\n",
        figure + "\n", findings(points) + "\n", table(points) + "\n"])
    checkpoint.atomic_write(os.path.join(cfg.out_dir, "report.md"),
                            lambda f: f.write(report.encode()))
    print0("\n" + table(points) + "\n\n" + findings(points))
    print0(f"report: {cfg.out_dir}/report.md")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
