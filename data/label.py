"""A labelling round: the simulated raters rank the SFT model's own answers.

prepare.py's rankings compare written-out styles of an answer (ideal, preamble,
verbose, wrong...). A reward model trained on those alone has never seen the mistakes
the SFT model actually makes, and those are what PPO's rollouts are made of. So, as in
InstructGPT (Ouyang et al. 2022, section 3.5: labelers rank several outputs of the
model for one prompt), this script samples K answers per training prompt from the SFT
model and has the same raters rank them: the raters' known Bradley-Terry model of the
gold score plus their biases. reward.py trains on both sets.

    python data/label.py                       # reads out/sft, writes data/world/prefs_sft_*.jsonl
    python data/label.py --n_prompts=6000 --K=6
    python data/label.py --policy=out/ppo --name=prefs_round2   # the next round's rankings

Records have the same fields as prefs_*.jsonl; every response's style is "sft_sample".
The raters' biases are those prepare.py wrote to meta.json, so both sets share one
labeler population.
"""

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import checkpoint  # noqa: E402
import distributed  # noqa: E402
from batch import sample_responses  # noqa: E402
from cli import UserError, parse_config, ranges, user_errors  # noqa: E402
from data import world  # noqa: E402
from data.tokenizer import decode_response  # noqa: E402
from records import load_raters, read_jsonl, world_tokenizer  # noqa: E402


@dataclass
class Config:
    data_dir: str = "data/world"   # folder written by data/prepare.py; the rankings are added here
    policy: str = "out/sft"        # the model whose answers are ranked
    name: str = "prefs_sft"        # the set written: data_dir/NAME_train.jsonl and NAME_val.jsonl
    n_prompts: int = 2000          # training prompts to label (10% more for validation)
    K: int = 4                     # answers sampled per prompt (duplicates are dropped)
    temperature: float = 1.0       # sampling temperature
    max_new_tokens: int = 48       # answer length limit
    seed: int = 1337               # sampling and the raters' draws
    device: str = "auto"           # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="n_prompts max_new_tokens", non_negative="temperature")


def label(records, answers, K, raters, rng):
    """One ranking per prompt from its sampled answers (text, ended); prompts whose
    answers are all the same are skipped (a ranking of one teaches nothing)."""
    out = []
    for i, rec in enumerate(records):
        task = world.Task.from_dict(rec["task"])
        distinct = list(dict.fromkeys(answers[i * K:(i + 1) * K]))
        if len(distinct) < 2:
            continue
        responses = [dict(text=text, ended=ended, style="sft_sample",
                          gold=round(world.gold(task, text, ended), 4),
                          utility=round(world.rater_utility(task, text, ended, raters), 4))
                     for text, ended in distinct]
        ranking = world.rater_ranking(rng, [r["utility"] for r in responses])
        out.append(dict(task=rec["task"], family=rec["family"], prompt=rec["prompt"],
                        responses=responses, ranking=ranking))
    return out


# data/prepare.py's sets (NAME_train.jsonl, NAME_val.jsonl): a round must not write over them
WORLD_SETS = ("sft", "prefs", "prompts")


def check_set_name(name):
    """--name: a set's name becomes part of a file name in data_dir, and is not one of the
    world's own sets."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"--name={name!r}: a set's name is letters, digits and _ only")
    if name in WORLD_SETS:
        raise UserError(f"--name={name}: {name}_train.jsonl is one of the world's own files "
                        f"(data/prepare.py's); choose another name")


def main(cfg):
    check_set_name(cfg.name)
    if cfg.K < 2 or cfg.n_prompts < 1:
        raise UserError(f"need --K >= 2 and --n_prompts >= 1, "
                        f"got --K={cfg.K} --n_prompts={cfg.n_prompts}")
    run = distributed.setup(cfg.seed, cfg.device)
    raters = load_raters(cfg.data_dir)
    enc = world_tokenizer(cfg.data_dir)
    policy, _ = checkpoint.load_model(os.path.join(cfg.policy, "ckpt.pt"), "python sft.py", enc,
                                      device=run.device)
    records = read_jsonl(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                         {"task": dict, "prompt": str, "family": str})
    n = min(len(records), cfg.n_prompts + cfg.n_prompts // 10)
    records = records[-n:]  # the last prompts of the RL set, labelled once
    with run.autocast:  # bf16 on CUDA: answers to rank, no figure read from their logits
        samples = sample_responses(policy, enc, [r["prompt"] for r in records
                                                 for _ in range(cfg.K)],
                                   cfg.max_new_tokens, cfg.temperature, cfg.seed, run.device)
    answers = [decode_response(enc, response) for _, response in samples]
    rankings = label(records, answers, cfg.K, raters, random.Random(cfg.seed))
    if len(rankings) < 2:  # nothing to write: no training and validation set
        raise UserError(f"{len(rankings)} of {n} prompts had two different answers among "
                        f"their K={cfg.K}"
                        + (" (--temperature=0 gives one answer K times)" if cfg.temperature == 0
                           else "") + "; at least 2 are needed: raise --K, --temperature or "
                                      "--n_prompts")
    n_val = max(1, len(rankings) // 11)
    for name, part in ((f"{cfg.name}_train", rankings[:-n_val]),
                       (f"{cfg.name}_val", rankings[-n_val:])):
        checkpoint.atomic_write(os.path.join(cfg.data_dir, f"{name}.jsonl"),
                                lambda f: f.write("".join(json.dumps(r) + "\n"
                                                          for r in part).encode()))
    correct = sum(world.grade(world.Task.from_dict(r["task"]), *a)["correct"]
                  for r, a in zip([r for r in records for _ in range(cfg.K)],
                                  answers)) / len(answers)
    print(f"wrote {cfg.data_dir}/{cfg.name}_train.jsonl and {cfg.name}_val.jsonl: "
          f"{len(rankings)} rankings of the answers of {cfg.policy} to {n} prompts "
          f"(K={cfg.K}, {correct:.0%} of the sampled answers correct)")
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
