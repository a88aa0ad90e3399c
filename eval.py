"""Evaluation: every checkpoint answers the same held-out prompts. The gold scorer says how
good each answer really is, the reward model what the proxy thinks of it, and the KL to
the SFT model what the change cost.

For every stage found under out/ (base = pretrain, sft, ppo, grpo, dpo and the DPO family),
decoding greedily (--temperature=0): gold score, correctness, answer format, proxy reward
(out/reward's score, normalised as stored), mean length in words, end-token rate, the
rates of the raters' favourite faults (a preamble, restating the question), and the win
rate against SFT under the gold scorer (ties count half); overall and per task family.
KL(π‖π_sft) is estimated from one answer per prompt sampled at temperature 1: the mean
over answers of Σ_t log π(y_t) − log π_sft(y_t).

Best-of-n: n answers sampled from SFT at temperature 1, the reward model keeps the one it
scores highest. Its KL to SFT is taken as log n − (n−1)/n (Stiennon et al. 2020, appendix
G.3), an upper bound rather than the exact value: the more likely an answer is to come up
twice among the n, the smaller the true KL (Beirami et al. 2024). It is the baseline any
RL method must beat at the same KL, and the bound places it at no less KL than it has.

Also: the same prompts (one per family) through every model side by side, the training
curves of each stage's log.jsonl (a PNG when matplotlib is installed, tables always), and
the over-optimisation experiment when overopt.py has written out/overopt/. Writes
out/report.md, out/<stage>/eval.json and out/best_of.json.

    python eval.py                                   # every stage found under out/
    python eval.py --stages=sft,ppo --best_of=       # two stages, no best-of-n
    python eval.py --best_of=1,4,16,64               # a longer best-of-n sweep
    python eval.py --temperature=1.0                 # sampled instead of greedy answers
    python eval.py --device=cuda
    python eval.py --data=prompts.jsonl --judge_from=out/rm-judge \\
        --models=out/sft-gpt2,out/ppo-gpt2,out/dpo-gpt2      # your models and prompts

Your own models and prompts (--data, an RL prompt file of formats.py): there is no gold
scorer, so a reward model you name (--judge_from; trained with reward.py on preferences
the policies did not train on, ideally) judges the answers instead. Each of --models (stage
folders, GPT-2's included) answers every prompt; the table gives the judge's mean score,
the win rate against --reference under the judge (the first model unless named; ties
half), the sampled KL to it, the length and the end-of-answer rate, and a few answers side
by side. Writes out/report_judged.md. The judge is a proxy, with the proxy's blind spots:
the world's report shows how far a reward model's verdict can sit from the gold one.
"""

import json
import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar


import checkpoint
import distributed
import formats
from batch import reward_scores, sample_responses, sequence_kl
from cli import UserError, number_list, parse_config, ranges, refuse_unused, user_errors
from data import world
from data.tokenizer import decode_response
from distributed import print0
from records import read_jsonl, stage_model, world_tokenizer
from reward_model import load_reward_model

# language-model stages
STAGES = ("pretrain", "sft", "ppo", "grpo", "dpo", "cdpo", "ipo", "simpo", "orpo", "kto")
NAMES = {"pretrain": "base"}  # how a stage is called in the report


@dataclass
class Config:
    data_dir: str = "data/world"     # folder written by data/prepare.py
    out: str = "out"                 # where the stages' checkpoints are; the report goes here
    stages: str = ""                 # comma-separated stages to score (default: every one found)
    reward_from: str = "auto"  # reward model (proxy, best-of-n): auto = <out>/reward if there; none
    reference: str = "sft"           # the stage KL and win rates are measured against
    data: str = ""                   # your own prompts instead of the world's (see above)
    judge_from: str = ""             # with --data: the reward model that judges the answers
    models: str = ""                 # with --data: the stage folders to compare, comma-separated
    best_of: str = "1,4,16"          # n for best-of-n from the reference ("" = none)
    temperature: float = 0.0         # 0 = greedy decoding
    max_new_tokens: int = 48         # answer length limit
    batch_size: int = 64             # prompts per generation batch
    n_show: int = 1                  # prompts shown side by side per task family
    plots: bool = True               # training curves as a PNG (needs matplotlib)
    seed: int = 1337                 # sampling seed
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="max_new_tokens batch_size n_show",
                              non_negative="temperature")


# ---- scoring answers -------------------------------------------------------------------------

def grade_answers(tasks, answers):
    """One row per answer (text, ended): the gold scorer's verdict and what it was given."""
    return [dict(family=t.family, kind=t.kind, prompt=t.prompt, text=text, ended=ended,
                 **world.grade(t, text, ended))
            for t, (text, ended) in zip(tasks, answers)]


def evaluate(model, enc, tasks, cfg, device, temperature, seed, reward_model=None, ref=None):
    """Graded answers of one model; with a reward model each row carries its proxy reward,
    with a reference its log-ratio Σ log π/π_ref (a KL sample when temperature is 1)."""
    pairs = sample_responses(model, enc, [t.prompt for t in tasks], cfg.max_new_tokens, temperature,
                             seed, device, cfg.batch_size)
    rows = grade_answers(tasks, [decode_response(enc, r) for _, r in pairs])
    pad = enc.encode_single_token("<|endoftext|>")
    if reward_model is not None:
        for row, s in zip(rows, reward_scores(reward_model, pairs, pad, device,
                                              cfg.batch_size).tolist()):
            row["proxy"] = s
    if ref is not None:
        for row, k in zip(rows, sequence_kl(model, ref, pairs, pad, device, cfg.batch_size)):
            row["kl"] = k
    return rows


def best_of_n(model, reward_model, enc, tasks, ns, cfg, device):
    """Rows of best-of-n for each n: max(ns) samples per prompt at temperature 1, and for
    each n the reward model's favourite among the first n (so the n's share samples)."""
    N = max(ns)
    pairs = sample_responses(model, enc, [t.prompt for t in tasks for _ in range(N)],
                             cfg.max_new_tokens, 1.0, cfg.seed + 1, device, cfg.batch_size)
    pad = enc.encode_single_token("<|endoftext|>")
    scores = reward_scores(reward_model, pairs, pad, device,
                           cfg.batch_size).cpu().view(len(tasks), N)
    answers = [decode_response(enc, r) for _, r in pairs]
    out = {}
    for n in ns:
        picked = [i * N + j for i, j in enumerate(scores[:, :n].argmax(1).tolist())]
        rows = grade_answers(tasks, [answers[k] for k in picked])
        for row, k in zip(rows, picked):
            row["proxy"] = scores.view(-1)[k].item()
        out[n] = rows
    return out


def best_of_n_kl(n):
    """KL(best-of-n ‖ base) ≤ log n − (n−1)/n (Stiennon et al. 2020 give it as equal;
    Beirami et al. 2024 prove it an upper bound)."""
    return math.log(n) - (n - 1) / n


def win_rate(rows, base_rows):
    """Share of prompts where the gold score beats the base rows' answer; ties count half."""
    wins = [1.0 if a["gold"] > b["gold"] else 0.5 if a["gold"] == b["gold"] else 0.0
            for a, b in zip(rows, base_rows)]
    return sum(wins) / max(1, len(wins))


def summarize(rows, base_rows=None):
    """Means over rows of every graded figure (proxy and kl when the rows have them)."""
    n = max(1, len(rows))
    s = {k: sum(float(r[k]) for r in rows) / n
         for k in ("gold", "correct", "format", "words", "ended", "preamble", "restate", "proxy",
                   "kl")
         if rows and k in rows[0]}
    s["n"] = len(rows)
    if base_rows is not None:
        s["win"] = win_rate(rows, base_rows)
    return s


def by_family(rows, base_rows=None):
    out = {}
    for fam in world.FAMILIES:
        idx = [i for i, r in enumerate(rows) if r["family"] == fam]
        out[fam] = summarize([rows[i] for i in idx],
                             None if base_rows is None else [base_rows[i] for i in idx])
    return out


# ---- the report ---------------------------------------------------------------------------------

def fmt(s, key, spec):
    return format(s[key], spec) if key in s else "–"


def main_table(results):
    """Markdown: one row per model, overall figures."""
    lines = ["| model | gold | correct | format | proxy | KL to ref | words | ended | preamble | "
             "restate | win vs ref |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        s = res["overall"]
        lines.append(f"| {name} | {s['gold']:.2f} | {s['correct']:.0%} | {s['format']:.0%} | "
                     f"{fmt(s, 'proxy', '+.2f')} | {fmt(s, 'kl', '.2f')} | {s['words']:.1f} | "
                     f"{s['ended']:.0%} | {s['preamble']:.0%} | {s['restate']:.0%} | "
                     f"{fmt(s, 'win', '.0%')} |")
    return "\n".join(lines)


def family_table(results):
    """Markdown: correctness and win rate per model and task family."""
    lines = ["| model | " + " | ".join(world.FAMILIES) + " |",
             "|---|" + "---|" * len(world.FAMILIES)]
    for name, res in results.items():
        cells = [f"{s['correct']:.0%} ({fmt(s, 'win', '.0%')})" for s in res["families"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def side_by_side(records, samples, n_show):
    """The same prompts (n_show per family) answered by every model."""
    shown = []
    for fam in world.FAMILIES:
        for i in [i for i, r in enumerate(records)
                  if world.Task.from_dict(r["task"]).family == fam][:n_show]:
            shown.append(f"**{records[i]['prompt']}**\n")
            for name, rows in samples.items():
                r = rows[i]
                proxy = f", proxy {r['proxy']:+.2f}" if "proxy" in r else ""
                shown.append(f"- {name}: `{r['text'][:120]!r}`"
                             f"{'' if r['ended'] else ' (no end token)'} "
                             f"(gold {r['gold']:.2f}{proxy})")
            shown.append("")
    return "\n".join(shown)


# each stage's log: the panels worth plotting, each a title and the metrics drawn in it
CURVES = {
    "pretrain": [("loss", ["loss", "val_loss"])],
    "sft": [("loss", ["loss", "val_loss"])],
    "reward": [("loss", ["loss"]), ("held-out accuracy", ["val_accuracy"])],
    "ppo": [("proxy and gold score of the rollouts", ["objective/score", "gold/score"]),
            ("KL", ["objective/kl"])],
    "grpo": [("score and correctness of the rollouts", ["objective/score", "gold/correct"]),
             ("KL", ["objective/kl"])],
    **{s: [("implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margin"]),
           ("policy log-probs", ["logps/chosen", "logps/rejected"])] for s in STAGES[4:]},
}


def read_log(path):
    """Step records of a stage's log.jsonl (the last value of each step, so a resumed run
    counts once); a log that is missing or unreadable gives nothing."""
    steps = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "step" in rec:
                    steps[rec["step"]] = rec
    except (OSError, ValueError):
        return []
    return [steps[k] for k in sorted(steps)]


def curves_table(name, recs, panels, n_rows=6):
    metrics = [m for _, ms in panels for m in ms if any(m in r for r in recs)]
    idx = sorted({round(i * (len(recs) - 1) / (n_rows - 1)) for i in range(n_rows)})
    lines = [f"{name}:\n", "| step | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for i in idx:
        r = recs[i]
        lines.append(f"| {r['step']} | "
                     + " | ".join(f"{r[m]:.4g}" if m in r else "" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def training_curves(out, cfg):
    """Markdown tables of each stage's curves, and out/curves.png when matplotlib is there."""
    logs = {s: read_log(os.path.join(out, s, "log.jsonl")) for s in CURVES}
    logs = {s: recs for s, recs in logs.items() if recs}
    if not logs:
        return "No training logs found.\n"
    text = "\n".join(curves_table(NAMES.get(s, s), recs, CURVES[s]) for s, recs in logs.items())
    if not cfg.plots:
        return text
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text + ("\n(matplotlib is not installed, so no plot: `pip install matplotlib` "
                       "draws out/curves.png)\n")
    panels = [(s, title, ms) for s, recs in logs.items() for title, ms in CURVES[s]]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols,
                             figsize=(4 * cols, 3 * math.ceil(len(panels) / cols)), squeeze=False)
    for ax, (s, title, ms) in zip(axes.flat, panels):
        for m in ms:
            pts = [(r["step"], r[m]) for r in logs[s] if m in r]
            if pts:
                ax.plot(*zip(*pts), label=m, marker="." if len(pts) < 30 else None)
        ax.set_title(f"{NAMES.get(s, s)}: {title}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    png = os.path.join(out, "curves.png")
    checkpoint.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return f"![training curves](curves.png)\n\n{text}"


# ---- main ----------------------------------------------------------------------------------

# ---- your own models and prompts, judged by a reward model -----------------------------------


def judged(cfg, run):
    """The report on --data's prompts: every model of --models, scored by --judge_from."""
    refuse_unused(cfg, ["stages", "best_of", "reward_from", "plots"],
                  "with --data (the stages compared are --models, judged by --judge_from)")
    folders = [m for m in cfg.models.split(",") if m]
    if not folders or not cfg.judge_from:
        raise UserError("--data needs --models (stage folders, comma-separated) and --judge_from "
                        "(a reward model to judge the answers): there is no gold scorer there")
    if cfg.reference not in folders and cfg.reference not in ("", Config.reference):
        raise UserError(f"--reference={cfg.reference} is not one of --models={cfg.models}")
    reference = cfg.reference if cfg.reference in folders else folders[0]
    models = {f: stage_model(f, "python sft.py", cfg.data_dir,
                             run.device) for f in folders}
    _, enc, chat, _ = models[reference]
    judge, _ = load_reward_model(os.path.join(cfg.judge_from, "ckpt.pt"), "python reward.py", enc,
                                 device=run.device)  # refused unless it has the same tokenizer
    for f, (_, e, c, _) in models.items():
        if (e.name, c) != (enc.name, chat):
            raise UserError(f"{f}: tokenizer {e.name} / chat {c}, but {reference} has {enc.name} "
                            f"/ {chat}: the models compared must share them")
    messages, counts = formats.load_rl_prompts(cfg.data)
    room = models[reference][0].config.block_size - cfg.max_new_tokens
    prompts = [(m, ids) for m in messages
               if len(ids := formats.chat_tokens(enc, chat, m, None, cfg.data)[0]) <= room]
    print0(f"{cfg.data}: {formats.describe(counts)}; {len(messages) - len(prompts)} too long for "
           f"--max_new_tokens skipped; {len(prompts)} prompts")
    if not prompts:
        raise UserError(f"{cfg.data}: no prompt leaves room for "
                        f"--max_new_tokens={cfg.max_new_tokens}")
    end, pad = formats.end_token(enc, chat), enc.encode_single_token("<|endoftext|>")
    ids = [p for _, p in prompts]

    def answers(model, temperature, seed):
        return sample_responses(model, enc, ids, cfg.max_new_tokens, temperature, seed,
                                run.device, cfg.batch_size, stop=end)

    rows = {}
    for f, (model, *_) in models.items():
        pairs = answers(model, cfg.temperature, cfg.seed)
        scores = reward_scores(judge, pairs, pad, run.device, cfg.batch_size).tolist()
        kls = (sequence_kl(model, models[reference][0], answers(model, 1.0, cfg.seed + 2), pad,
                           run.device, cfg.batch_size) if f != reference else [0.0] * len(ids))
        rows[f] = [dict(zip(("text", "ended"), decode_response(enc, r, end)), judge=s, kl=k)
                   for (_, r), s, k in zip(pairs, scores, kls)]
    base = rows[reference]
    table = [f"| model | judge | win vs {reference} | KL to {reference} | words | ended |",
             "|---|---|---|---|---|---|"]
    for f, rs in rows.items():
        n = len(rs)
        win = sum(1.0 if a["judge"] > b["judge"] else 0.5 if a["judge"] == b["judge"] else 0.0
                  for a, b in zip(rs, base)) / n
        table.append(f"| {f} | {sum(r['judge'] for r in rs) / n:+.3f} | {win:.1%} | "
                     f"{sum(r['kl'] for r in rs) / n:.2f} | "
                     f"{sum(len(r['text'].split()) for r in rs) / n:.1f} | "
                     f"{sum(r['ended'] for r in rs) / n:.0%} |")
    shown = []
    for i in range(min(cfg.n_show * 3, len(prompts))):
        shown.append(f"**{prompts[i][0][-1]['content'][:200]}**\n")
        shown += [f"- {f}: `{rs[i]['text'][:160]!r}` (judge {rs[i]['judge']:+.2f})"
                  for f, rs in rows.items()]
        shown.append("")
    decoding = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}"
    report = ["# minRLHF evaluation on your prompts\n",
              f"{len(prompts)} prompts from {cfg.data}, {decoding} answers, judged by the reward "
              f"model {cfg.judge_from} (a proxy: no gold scorer here). win: share of prompts where "
              f"the judge scores the answer above {reference}'s, ties half; KL: Σ log π/π_ref per "
              f"answer, mean over answers sampled at temperature 1.\n",
              "\n".join(table), "\n## Answers side by side\n", "\n".join(shown)]
    path = os.path.join(cfg.out, "report_judged.md")
    os.makedirs(cfg.out, exist_ok=True)
    checkpoint.atomic_write(path, lambda fh: fh.write("\n".join(report).encode()))
    print0("\n" + "\n".join(table) + f"\n\nreport: {path}")


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device)
    if cfg.data:
        return judged(cfg, run)
    if cfg.models or cfg.judge_from:
        raise UserError(f"--{'models' if cfg.models else 'judge_from'} is for your own prompts: "
                        f"give them with --data (without it, the stages under --out={cfg.out} "
                        f"are scored on the world's)")
    enc = world_tokenizer(cfg.data_dir)
    records = read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"), {"task": dict, "prompt": str})
    tasks = [world.Task.from_dict(r["task"]) for r in records]
    ns = number_list(cfg.best_of, "--best_of", minimum=1)
    found = [s for s in STAGES if os.path.exists(os.path.join(cfg.out, s, "ckpt.pt"))]
    wanted = [s for s in cfg.stages.split(",") if s] or found
    if not wanted:
        raise UserError(f"no checkpoints under {cfg.out}/ (looked for {', '.join(STAGES)}): "
                                f"run `python pretrain.py` and `python sft.py` first")
    load = lambda s: checkpoint.load_model(  # noqa: E731
        os.path.join(cfg.out, s, "ckpt.pt"), f"python {s}.py" if s in STAGES
        else checkpoint.ANY_STAGE, enc, device=run.device)[0].eval()
    ref = None
    if cfg.reference in wanted or os.path.exists(os.path.join(cfg.out, cfg.reference, "ckpt.pt")):
        ref = load(cfg.reference)
        # its own answers are what every win rate is measured against: scored too
        wanted = wanted if cfg.reference in wanted else [cfg.reference, *wanted]
    elif cfg.reference == Config.reference:
        print0(f"({cfg.out}/{cfg.reference} not found: no KL, win rate or best-of-n against it)")
    elif cfg.reference:  # one named on the command line must be there
        raise UserError(f"--reference={cfg.reference}: {cfg.out}/{cfg.reference}/ckpt.pt not "
                        f"found (the stage that KL and win rates are measured against)")
    reward_model = None
    if cfg.reward_from != "none":
        path = os.path.join(os.path.join(cfg.out, "reward") if cfg.reward_from == "auto"
                            else cfg.reward_from, "ckpt.pt")
        # one named on the command line must be there
        if os.path.exists(path) or cfg.reward_from != "auto":
            reward_model, _ = load_reward_model(path, "python reward.py", enc, device=run.device)
        else:
            print0(f"({path} not found: no proxy reward and no best-of-n; "
                   f"run `python reward.py` for them)")

    samples, results = {}, {}
    for stage in wanted:
        t0 = time.time()
        model = ref if stage == cfg.reference else load(stage)
        rows = evaluate(model, enc, tasks, cfg, run.device, cfg.temperature, cfg.seed, reward_model)
        if ref is not None:  # the KL sample: answers at temperature 1
            kl_rows = evaluate(model, enc, tasks, cfg, run.device, 1.0, cfg.seed + 2, ref=ref)
            for row, k in zip(rows, kl_rows):
                row["kl"] = k["kl"]
        samples[NAMES.get(stage, stage)] = rows
        o = summarize(rows)
        print0(f"{NAMES.get(stage, stage)}: gold {o['gold']:.2f}, correct {o['correct']:.0%}, "
               f"format {o['format']:.0%}{', KL %.2f' % o['kl'] if 'kl' in o else ''} "
               f"({len(tasks)} held-out prompts, {time.time() - t0:.1f}s)")
    if reward_model is not None and ns and ref is not None:
        t0 = time.time()
        for n, rows in best_of_n(ref, reward_model, enc, tasks, ns, cfg, run.device).items():
            for row in rows:
                row["kl"] = best_of_n_kl(n)  # the bound, not sampled
            samples[f"best-of-{n} ({cfg.reference})"] = rows
        print0(f"best-of-n for n = {', '.join(map(str, ns))}: {time.time() - t0:.1f}s")

    base = samples.get(NAMES.get(cfg.reference, cfg.reference))
    for name, rows in samples.items():
        results[name] = dict(overall=summarize(rows, base), families=by_family(rows, base))
    for stage in wanted:
        checkpoint.atomic_write(os.path.join(cfg.out, stage, "eval.json"),
                                lambda f: f.write(json.dumps(results[NAMES.get(stage, stage)],
                                                             indent=1).encode()))
    best = {name: r for name, r in results.items() if name.startswith("best-of-")}
    if best:  # best-of-n has no stage folder of its own
        checkpoint.atomic_write(os.path.join(cfg.out, "best_of.json"),
                                lambda f: f.write(json.dumps(best, indent=1).encode()))

    decoding = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}"
    shown = side_by_side(records, samples, cfg.n_show)
    report = [
        "# minRLHF evaluation\n",
        f"{len(records)} held-out prompts from {cfg.data_dir}/eval.jsonl. Models answer with "
        f"{decoding} decoding; best-of-n picks the reward model's favourite of n answers sampled "
        f"from {cfg.reference} at temperature 1. gold: the world's gold score (correct +1, "
        f"format +0.5, preamble −0.4, restating −0.3, ...); proxy: the reward model's score "
        f"(0 mean, 1 std on SFT samples); KL to ref: Σ log π/π_ref per answer, mean over answers "
        f"sampled at temperature 1 (best-of-n: log n − (n−1)/n, an upper bound); win: share of "
        f"prompts where the gold score beats {cfg.reference}'s {decoding} answer, ties half.\n",
        main_table(results), "\n## Per task family: correct (win vs ref)\n", family_table(results),
        "\n## Answers side by side\n", shown, "## Training curves\n", training_curves(cfg.out, cfg),
    ]
    overopt = os.path.join(cfg.out, "overopt", "report.md")
    if os.path.exists(overopt):
        with open(overopt, encoding="utf-8") as f:
            report += ["## Over-optimisation (from overopt.py)\n",
                       f.read().split("\n", 1)[1].replace("](", "](overopt/")]
    checkpoint.atomic_write(os.path.join(cfg.out, "report.md"),
                            lambda f: f.write("\n".join(report).encode()))
    print0("\n" + main_table(results) + "\n\n" + family_table(results) + "\n\n" + shown)
    print0(f"report: {cfg.out}/report.md")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
