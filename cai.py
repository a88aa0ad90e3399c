"""Constitutional AI in miniature: the model critiques and revises its own answers against a
written constitution, and judges pairs of answers by it; those AI labels, with no rater
involved, train the preference stages (Bai et al. 2022, "Constitutional AI: Harmlessness
from AI Feedback": critique-and-revision, then an AI preference model).

    python cai.py                      # out/sft → out/cai, and the AI-labelled sets
    python dpo.py --prefs=prefs_cai_judge --out_dir=out/dpo_cai       # DPO on the AI labels
    python dpo.py --prefs=prefs_cai_raters --out_dir=out/dpo_raters   # the same pairs, raters
    python reward.py --prefs=prefs_cai_judge --out_dir=out/reward_cai  # a reward model on them,
    python ppo.py --reward_from=out/reward_cai --out_dir=out/ppo_cai   # and PPO against it
    python cai.py --constitution=my.txt --name=prefs_mine

The constitution (data/constitution.txt) names flaws of an answer users do not value: an
opening pleasantry, a restated question, a hedge, a sign-off. The simulated raters like
some of them (a preamble most, docs/world.md), the gold scorer none; so AI labels that
follow the constitution can agree with the gold scorer more than the raters' own do.

  1. demonstrations of the two operations on training questions (data/constitution.py:
     a draft, a principle, the critique and the revision; two drafts and which one the
     constitution prefers), with as many of the world's SFT demonstrations mixed in
  2. the critic: the SFT model fine-tuned on them (sft.py's loop, --critic_steps), so it
     is the SFT model that has learnt to critique and to judge
  3. revision labels: the SFT model drafts an answer to each RL prompt (temperature 1);
     the critic critiques and revises it by each principle of the constitution in turn
     (greedy); the last revision ≻ the draft when they differ
  4. judge labels: two SFT drafts per prompt; the critic prefers A or B by the
     log-probability of answering "A" or "B", averaged over both orders (so the position
     of an answer cannot decide)
  5. measured: each AI label against the gold scorer's direction (on pairs whose gold
     differs) and against the raters' probability of the same preference; the raters'
     own labels of the same judge pairs are written too, for the same method trained
     on rater labels

Writes data_dir/NAME_{train,val}.jsonl (revision pairs), NAME_judge_* (judge pairs),
NAME_raters_* (the judge pairs as the raters rank them), out_dir/critic/ and
out_dir/agreement.json. reward.py and dpo.py read the sets with --prefs.
"""

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

import checkpoint
import distributed
import sft
from batch import collate, sample_responses, sequence_logprobs
from cli import UserError, parse_config, ranges, user_errors
from data import constitution as C
from data import world
from data.label import check_set_name
from data.tokenizer import decode_response, encode_prompt, encode_response
from records import load_raters, read_jsonl, world_tokenizer


@dataclass
class Config:
    data_dir: str = "data/world"    # the world; the AI-labelled sets are written here
    init_from: str = "out/sft"      # the SFT model: the drafts, and the critic's start
    out_dir: str = "out/cai"        # the critic and agreement.json
    constitution: str = C.DEFAULT   # one "name: text" a line (data/constitution.py)
    name: str = "prefs_cai"         # the sets written: NAME, NAME_judge, NAME_raters
    n_critiques: int = 6000         # critique-and-revision demonstrations
    n_judgements: int = 3000        # judgement demonstrations
    n_sft: int = 3000               # the world's SFT demonstrations mixed in
    critic_steps: int = 300         # fine-tuning steps of the critic (batches of 64)
    n_prompts: int = 3600           # RL prompts labelled (a judge pair each; revisions if flawed)
    temperature: float = 1.0        # the drafts' sampling temperature
    max_new_tokens: int = 48        # a draft's and a critique reply's length limit
    seed: int = 1337
    device: str = "auto"            # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="n_critiques n_judgements critic_steps n_prompts "
                                         "max_new_tokens", non_negative="n_sft temperature")


# --- the AI labels: revision chains and judgements -------------------------------------------


def critique_chain(critic, enc, tasks, drafts, constitution, cfg, device):
    """Each draft critiqued and revised by every principle in turn, greedily: the final
    revisions, and how many replies could not be read (no "Revision:") or did not fit the
    context (those steps keep the text as it was). A critique that finds the principle
    followed leaves the text alone, whatever revision follows it; a reply cut off by
    --max_new_tokens (no end token) is not read, its revision perhaps cut too."""
    texts, unread = list(drafts), 0
    block = critic.config.block_size
    for _, principle in constitution:
        requests = [C.critique_request(principle, t.prompt, x) for t, x in zip(tasks, texts)]
        fits = [i for i, r in enumerate(requests)
                if len(encode_prompt(enc, r)) + cfg.max_new_tokens <= block]
        unread += len(requests) - len(fits)
        replies = sample_responses(critic, enc, [requests[i] for i in fits], cfg.max_new_tokens,
                                   0.0, cfg.seed, device)
        for i, (_, reply) in zip(fits, replies):
            text, ended = decode_response(enc, reply)
            if text.startswith(C.FOLLOWS):  # no flaw found: nothing to revise
                continue
            revised = C.parse_revision(text) if ended else None
            if revised is None:
                unread += 1
            else:
                texts[i] = revised
    return texts, unread


@torch.no_grad()
def judge(critic, enc, tasks, pairs, device, batch_size=64):
    """For each (a, b): the critic's preference for a, log p("A" | a, b) − log p("B" | a, b)
    plus the same with the order swapped; > 0 means a. None where a request does not fit."""
    pad = enc.encode_single_token("<|endoftext|>")
    reply = {x: encode_response(enc, x) for x in ("A", "B")}
    rows, keep = [], set()
    for i, (t, (a, b)) in enumerate(zip(tasks, pairs)):
        orders = [(encode_prompt(enc, C.judge_request(t.prompt, x, y)), sign)
                  for x, y, sign in ((a, b, 1.0), (b, a, -1.0))]
        if any(len(p) + 2 > critic.config.block_size for p, _ in orders):
            continue  # a request beyond the context: no verdict
        keep.add(i)
        rows += [row for p, sign in orders
                 for row in ((p + reply["A"], len(p), i, sign), (p + reply["B"], len(p), i, -sign))]
    margin = [0.0] * len(pairs)
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        lp = sequence_logprobs(critic, collate([r[0] for r in chunk], [r[1] for r in chunk],
                                               pad, device))[0].tolist()
        for (_, _, i, sign), x in zip(chunk, lp):
            margin[i] += sign * x
    return [margin[i] if i in keep else None for i in range(len(pairs))]


def ranking(task, chosen, rejected, raters, style):
    """A ranking of two answers, (text, ended) each, chosen first, in prefs_*.jsonl's
    fields."""
    responses = [dict(text=x, ended=ended, style=style,
                      gold=round(world.gold(task, x, ended), 4),
                      utility=round(world.rater_utility(task, x, ended, raters), 4))
                 for x, ended in (chosen, rejected)]
    return dict(task=task.to_dict(), family=task.family, prompt=task.prompt,
                responses=responses, ranking=[0, 1])


def agreement(rankings):
    """How a set of labels (each ranking's first answer preferred) agrees with the gold
    scorer's direction, on the pairs whose gold differs, and with the raters: the mean
    probability a rater states the same preference, and the raters' own expected
    agreement with gold on the same pairs."""
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    pairs = [(r["responses"][0], r["responses"][1]) for r in rankings]
    gold_pairs = [(c, w) for c, w in pairs if c["gold"] != w["gold"]]
    p = [sigmoid(c["utility"] - w["utility"]) for c, w in pairs]
    # a rater's chance of preferring the gold-better answer of each such pair
    rater_gold = [sigmoid((c["utility"] - w["utility"]) * (1 if c["gold"] > w["gold"] else -1))
                  for c, w in gold_pairs]
    n, g = max(1, len(pairs)), max(1, len(gold_pairs))
    return dict(pairs=len(pairs), gold_differs=len(gold_pairs),
                with_gold=sum(c["gold"] > w["gold"] for c, w in gold_pairs) / g,
                with_raters=sum(p) / n, with_raters_majority=sum(x > 0.5 for x in p) / n,
                raters_with_gold=sum(rater_gold) / g)


def write_set(data_dir, name, rankings):
    """NAME_train.jsonl and NAME_val.jsonl (a tenth, at least one) in data_dir."""
    n_val = max(1, len(rankings) // 10)
    for split, part in (("train", rankings[:-n_val]), ("val", rankings[-n_val:])):
        checkpoint.atomic_write(os.path.join(data_dir, f"{name}_{split}.jsonl"),
                                lambda f: f.write("".join(json.dumps(r) + "\n"
                                                          for r in part).encode()))


# --- the stage ---------------------------------------------------------------------------------


def main(cfg):
    constitution = C.load_constitution(cfg.constitution)
    check_set_name(cfg.name)
    run = distributed.setup(cfg.seed, cfg.device)
    raters = load_raters(cfg.data_dir)
    enc = world_tokenizer(cfg.data_dir)
    # the SFT model (the drafts), checked before anything is written
    policy, _ = checkpoint.load_model(os.path.join(cfg.init_from, "ckpt.pt"), "python sft.py",
                                      enc, device=run.device)
    rng = random.Random(cfg.seed)
    records = read_jsonl(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                         {"task": dict, "prompt": str, "family": str})
    tasks = [world.Task.from_dict(r["task"]) for r in records]

    # 1. demonstrations, with the world's SFT demonstrations mixed in
    demos = C.demonstrations(rng, tasks, constitution, cfg.n_critiques, cfg.n_judgements)
    answers = read_jsonl(os.path.join(cfg.data_dir, "sft_train.jsonl"),
                         {"prompt": str, "response": str})
    demos += [dict(prompt=r["prompt"], response=r["response"], kind="answer")
              for r in rng.sample(answers, min(cfg.n_sft, len(answers)))]
    rng.shuffle(demos)
    demos_path = os.path.join(cfg.out_dir, "demos.jsonl")
    text = "".join(json.dumps(d) + "\n" for d in demos).encode()
    same = os.path.exists(demos_path) and Path(demos_path).read_bytes() == text
    if not same:
        checkpoint.atomic_write(demos_path, lambda f: f.write(text))

    # 2. the critic: the SFT model fine-tuned on them (kept when these demonstrations and
    # flags trained it already)
    critic_dir = os.path.join(cfg.out_dir, "critic")
    critic_cfg = sft.Config(data_dir=cfg.data_dir, init_from=cfg.init_from, out_dir=critic_dir,
                            data=demos_path, max_steps=cfg.critic_steps, learning_rate=3e-4,
                            eval_interval=max(1, cfg.critic_steps // 3),
                            log_interval=max(1, cfg.critic_steps // 6), seed=cfg.seed,
                            device=cfg.device)
    path = os.path.join(critic_dir, "ckpt.pt")
    done = False
    if same and os.path.exists(path):  # a critic of these flags, whole or stopped part way
        ck = checkpoint.load(path)
        ours = {**ck.get("config", {}), "resume": False} == asdict(critic_cfg)
        done, critic_cfg.resume = ours and ck.get("step") == cfg.critic_steps, ours
    if done:
        print(f"the critic of these demonstrations is there already: {path}")
    else:
        # stopped by a signal, it saves its checkpoint and says how to go on: cai.py's way
        sft.main(critic_cfg, resume_hint="running cai.py again with the same flags continues "
                                         "the critic")
    critic, _ = checkpoint.load_model(os.path.join(critic_dir, "ckpt.pt"), "python cai.py", enc,
                                      device=run.device)

    # 3. revision labels: the SFT model's drafts, critiqued and revised by the critic
    chosen = records[:cfg.n_prompts]
    ptasks = [world.Task.from_dict(r["task"]) for r in chosen]
    drafts = [decode_response(enc, r) for _, r in sample_responses(
        policy, enc, [t.prompt for t in ptasks], cfg.max_new_tokens, cfg.temperature,
        cfg.seed, run.device)]
    revised, unread = critique_chain(critic, enc, ptasks, [d for d, _ in drafts], constitution,
                                     cfg, run.device)
    revision_set = [ranking(t, (r, True), d, raters, "cai_revision") for t, d, r in
                    zip(ptasks, drafts, revised) if r != d[0] and r]

    # 4. judge labels on pairs of drafts, and the raters' labels of the same pairs
    seconds = [decode_response(enc, r) for _, r in sample_responses(
        policy, enc, [t.prompt for t in ptasks], cfg.max_new_tokens, cfg.temperature,
        cfg.seed + 1, run.device)]
    pairs = list(zip(drafts, seconds))
    margins = judge(critic, enc, ptasks, [(a[0], b[0]) for a, b in pairs], run.device)
    judge_set, rater_set = [], []
    for t, (a, b), m in zip(ptasks, pairs, margins):
        if a[0] == b[0] or m is None or m == 0:
            continue
        judge_set.append(ranking(t, *((a, b) if m > 0 else (b, a)), raters, "sft_sample"))
        first = world.rater_ranking(rng, [world.rater_utility(t, *x, raters) for x in (a, b)])[0]
        rater_set.append(ranking(t, *((a, b) if first == 0 else (b, a)), raters, "sft_sample"))

    # 5. measured, and written
    figures = dict(revision=agreement(revision_set), judge=agreement(judge_set),
                   raters=agreement(rater_set), unread_critiques=unread,
                   drafts=len(drafts), config=asdict(cfg))
    written = []
    for name, part in ((cfg.name, revision_set), (f"{cfg.name}_judge", judge_set),
                       (f"{cfg.name}_raters", rater_set)):
        if len(part) >= 2:
            write_set(cfg.data_dir, name, part)
            written.append(f"{cfg.data_dir}/{name}_*")
        else:
            print(f"warning: {name} not written: {len(part)} pair(s); more --n_prompts, or a "
                  f"critic that has learnt the operations (more --critic_steps)")
    if not written:
        raise UserError(f"no set of labels had 2 pairs or more ({len(drafts)} drafts): raise "
                        f"--n_prompts or --critic_steps")
    checkpoint.atomic_write(os.path.join(cfg.out_dir, "agreement.json"),
                            lambda f: f.write(json.dumps(figures, indent=1).encode()))
    print(f"\n{len(drafts)} drafts; {unread} critique replies unread or too long")
    print("| labels | pairs | gold differs | agree with gold | with the raters (mean p) | "
          "raters' own agreement with gold |\n|---|---|---|---|---|---|")
    for key, label in (("revision", "AI: revision ≻ draft"), ("judge", "AI: the judge"),
                       ("raters", "the raters")):
        a = figures[key]
        print(f"| {label} | {a['pairs']} | {a['gold_differs']} | {a['with_gold']:.1%} | "
              f"{a['with_raters']:.1%} | {a['raters_with_gold']:.1%} |")
    print(f"\nwritten: {', '.join(written)}; {cfg.out_dir}/agreement.json")
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
