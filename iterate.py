"""Iterative RLHF: rounds of labelling, reward modelling and PPO, each round's raters
ranking the answers of the policy the previous round made, so the reward model has seen
the policy's new habits, hacks included, before PPO optimises against it again
(InstructGPT and Llama 2 collect their comparisons this way, on the current models).

    python iterate.py                        # 3 rounds from out/sft, into out/iterate
    python iterate.py --seed=2 --out_dir=out/iterate_s2
    python iterate.py --likelihood=true --kl_coef=0.2   # the pipeline's reward model and β

The default is the case where one round is known to hack: the plain-head reward model
(reward.py --likelihood=false) and β = 0.05, against which PPO learns answers such as
"Sure! 4 is smaller." (RESULTS.md). Round r, from P_0 = the SFT model:

  1. data/label.py: the simulated raters rank K answers of P_{r-1} to the training
     prompts, a set of its own (prefs_round{r}) in a copy of the world
  2. reward.py: a reward model from the SFT model, on prepare.py's rankings and every
     round's so far
  3. ppo.py: PPO from P_{r-1} against that reward model, the KL penalty to the SFT
     model (--ref_from), giving P_r
  4. measured on the held-out prompts: P_r's greedy answers (gold, correctness,
     preamble and sign-off rates, the round's reward), its KL to SFT on sampled
     answers; and the round's reward model on P_r's own answers as the raters rank
     them (the next round's set): how well it still tells better from worse there.
     Round 0 is the SFT model under the first reward model.

Each stage runs as its own process, printed before it runs; a stage whose output is
there already is not run again, and one stopped half-way continues from its checkpoint
(--resume=true), so a stopped run continues where it was (out_dir/iterate.json holds the
settings; a folder made with others is refused). Writes out_dir/rounds.json and prints
the table.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

import checkpoint
import distributed
import eval as evaluation
from cli import UserError, parse_config, ranges, user_errors
from data import world
from records import load_rankings, read_jsonl, world_tokenizer
from reward import evaluate as reward_accuracy
from reward_model import load_reward_model

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    data_dir: str = "data/world"    # the world, copied to out_dir/world for the rounds' sets
    init_from: str = "out/sft"      # the SFT model: P_0, every reward model's trunk, the reference
    out_dir: str = "out/iterate"    # the rounds' checkpoints, their sets and rounds.json
    rounds: int = 3                 # label → reward model → PPO, this many times
    n_prompts: int = 2000           # prompts whose answers the raters rank each round
    K: int = 4                      # answers per prompt
    likelihood: bool = False        # the reward model's likelihood term (False: the plain head)
    reward_steps: int = 200         # reward.py --max_steps
    kl_coef: float = 0.05           # PPO's β
    ppo_iterations: int = 120       # ppo.py --iterations
    eval_prompts: int = 320         # held-out prompts measured (eval.jsonl, in order)
    seed: int = 1337                # every stage's seed (each round's labels: seed + round)
    device: str = "auto"            # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="rounds n_prompts K reward_steps ppo_iterations "
                                         "eval_prompts", non_negative="kl_coef")


def stage(script, *flags, done=False):
    """Run one stage as `python script flags`, printed first, unless it is done already;
    a failure stops the run with the stage's exit status."""
    if done:
        print(f"\n(done already: python {script} {' '.join(flags)})")
        return
    print(f"\n$ python {script} {' '.join(flags)}", flush=True)
    code = subprocess.call([sys.executable, os.path.join(HERE, script), *flags])
    if code:
        print(f"error: `python {script}` failed (exit {code})", file=sys.stderr)
        sys.exit(code if code > 0 else 1)


def progress(folder, test):
    """(finished, resume flags) of a stage's folder: finished when its checkpoint passes
    test(ckpt); a checkpoint that does not is a stopped run, which continues from it."""
    path = os.path.join(folder, "ckpt.pt")
    try:
        ckpt = checkpoint.load(path) if os.path.exists(path) else None
    except UserError:  # damaged: the stage runs again from the start
        ckpt = None
    if ckpt is None:
        return False, []
    return test(ckpt), ["--resume=true"]


def signs_off(text):
    return any(text.endswith(s) for s in set(world.SIGN_OFFS.values()))


@torch.no_grad()
def measure(cfg, enc, tasks, policy_dir, rm_dir, next_set, sft, run):
    """The round's figures: P_r on the held-out prompts, and its reward model on P_r's
    answers as the raters ranked them (next_set)."""
    policy, _ = checkpoint.load_model(os.path.join(policy_dir, "ckpt.pt"), "python ppo.py", enc,
                                      device=run.device)
    rm, _ = load_reward_model(os.path.join(rm_dir, "ckpt.pt"), "python reward.py", enc,
                              run.device)
    ecfg = evaluation.Config(seed=cfg.seed)
    greedy = evaluation.evaluate(policy, enc, tasks, ecfg, run.device, 0.0, cfg.seed, rm)
    sampled = evaluation.evaluate(policy, enc, tasks, ecfg, run.device, 1.0, cfg.seed, ref=sft)
    s = evaluation.summarize(greedy)
    rankings = load_rankings(next_set, enc, policy.config.block_size)
    acc = reward_accuracy(rm, rankings, enc.encode_single_token("<|endoftext|>"), run.device)
    return dict(gold=s["gold"], correct=s["correct"], preamble=s["preamble"],
                sign_off=sum(signs_off(r["text"]) for r in greedy) / len(greedy),
                words=s["words"], proxy=s["proxy"],
                kl=sum(r["kl"] for r in sampled) / len(sampled),
                rm_accuracy_on_policy=acc["accuracy"],
                rm_expected_on_policy=acc.get("expected_accuracy"),
                raters_bayes_on_policy=acc.get("bayes_optimal"))


# what a round's stages are made with; --rounds, --eval_prompts and --device may change
# between a stopped run and its continuation, these may not
SETTINGS = "data_dir init_from n_prompts K likelihood reward_steps kl_coef ppo_iterations seed"


def claim(cfg):
    """out_dir for this run: a new folder, or one an earlier iterate.py run with the same
    SETTINGS made (whose finished stages are reused); anything else refused in one line.
    Returns what writes the settings there, once the run's inputs are checked."""
    path, want = os.path.join(cfg.out_dir, "iterate.json"), {
        k: getattr(cfg, k) for k in SETTINGS.split()}
    if os.path.exists(path):
        with open(path) as f:
            had = json.load(f)
        differ = [f"--{k}={had.get(k)}" for k in want if had.get(k) != want[k]]
        if differ:
            raise UserError(f"{cfg.out_dir} holds an iterate.py run made with "
                            f"{', '.join(differ)}: use those, another --out_dir, or remove it")
    elif os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        raise UserError(f"{cfg.out_dir} is not empty and no iterate.py run is in it "
                        f"({path} missing): choose another --out_dir")
    return lambda: checkpoint.atomic_write(path, lambda f: f.write(
        json.dumps(want, indent=1).encode()))


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device)
    device = [] if cfg.device == "auto" else [f"--device={cfg.device}"]
    d, w = cfg.out_dir, os.path.join(cfg.out_dir, "world")
    if cfg.K < 2:
        raise UserError(f"--K={cfg.K}: the raters rank at least 2 answers a prompt")
    # the SFT model (missing: "run `python sft.py` first") checked against the world before
    # anything is written
    enc = world_tokenizer(w if os.path.isdir(w) else cfg.data_dir)
    sft, _ = checkpoint.load_model(os.path.join(cfg.init_from, "ckpt.pt"), "python sft.py", enc,
                                   device=run.device)
    record = claim(cfg)
    if not os.path.isdir(w):  # the rounds' sets go into a copy, not into the world itself
        checkpoint.require(os.path.join(cfg.data_dir, "meta.json"), "python data/prepare.py")
        shutil.copytree(cfg.data_dir, w + ".tmp", dirs_exist_ok=True)
        os.replace(w + ".tmp", w)
    record()
    tasks = [world.Task.from_dict(r["task"]) for r in read_jsonl(
        os.path.join(w, "eval.jsonl"), {"task": dict})][:cfg.eval_prompts]
    label = lambda r, policy: stage(  # noqa: E731
        "data/label.py", f"--data_dir={w}", f"--policy={policy}", f"--name=prefs_round{r}",
        f"--n_prompts={cfg.n_prompts}", f"--K={cfg.K}", f"--seed={cfg.seed + r}", *device,
        done=os.path.exists(os.path.join(w, f"prefs_round{r}_val.jsonl")))

    rounds, policy = [], cfg.init_from
    label(1, policy)
    for r in range(1, cfg.rounds + 1):
        rm_dir, ppo_dir = os.path.join(d, f"reward_r{r}"), os.path.join(d, f"ppo_r{r}")
        sets = ",".join(["prefs"] + [f"prefs_round{k}" for k in range(1, r + 1)])
        done, resume = progress(rm_dir, lambda ck: bool(ck.get("members")) and "model" not in ck)
        stage("reward.py", f"--data_dir={w}", f"--init_from={cfg.init_from}",
              f"--out_dir={rm_dir}", f"--prefs={sets}", f"--likelihood={cfg.likelihood}",
              f"--max_steps={cfg.reward_steps}", f"--seed={cfg.seed}", *device, *resume,
              done=done)
        if r == 1:  # round 0: the SFT model itself, under the first reward model
            fig = measure(cfg, enc, tasks, cfg.init_from, rm_dir,
                          os.path.join(w, "prefs_round1_val.jsonl"), sft, run)
            rounds.append(dict(round=0, **fig))
        done, resume = progress(ppo_dir, lambda ck: ck.get("step") == cfg.ppo_iterations)
        stage("ppo.py", f"--data_dir={w}", f"--init_from={policy}",
              f"--ref_from={cfg.init_from}", f"--reward_from={rm_dir}", f"--out_dir={ppo_dir}",
              f"--kl_coef={cfg.kl_coef}", f"--iterations={cfg.ppo_iterations}",
              f"--seed={cfg.seed + r}", *device, *resume, done=done)
        policy = ppo_dir
        label(r + 1, policy)  # P_r's answers ranked: the next round's set, and the measure
        fig = measure(cfg, enc, tasks, policy, rm_dir,
                      os.path.join(w, f"prefs_round{r + 1}_val.jsonl"), sft, run)
        rounds.append(dict(round=r, **fig))
        print(f"round {r}: gold {fig['gold']:.3f}, correct {fig['correct']:.1%}, preamble "
              f"{fig['preamble']:.0%}, sign-off {fig['sign_off']:.0%}, proxy {fig['proxy']:+.2f}, "
              f"KL {fig['kl']:.2f}; reward model on the policy's answers "
              f"{fig['rm_accuracy_on_policy']:.1%}", flush=True)
    checkpoint.atomic_write(os.path.join(d, "rounds.json"), lambda f: f.write(
        json.dumps(dict(config=asdict(cfg), rounds=rounds), indent=1).encode()))
    print("\n| round | gold | correct | preamble | sign-off | words | proxy | KL to SFT | "
          "RM on the policy's pairs |\n|---|---|---|---|---|---|---|---|---|")
    for x in rounds:
        print(f"| {x['round']} | {x['gold']:.3f} | {x['correct']:.1%} | {x['preamble']:.0%} | "
              f"{x['sign_off']:.0%} | {x['words']:.1f} | {x['proxy']:+.2f} | {x['kl']:.2f} | "
              f"{x['rm_accuracy_on_policy']:.1%} |")
    print(f"\nwritten: {d}/rounds.json")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
