"""Evaluation: every checkpoint answers the same held-out prompts, and the gold scorer
says how good each answer really is.

Per task family and overall: the share answered in the expected format (canonical
answer sentence, then the end token), correctness, mean gold score, mean length in
words, and the end-token rate; then a few answers side by side. Writes out/report.md
and out/<stage>/eval.json.

    python eval.py                                   # every stage found under out/
    python eval.py --stages=sft --temperature=1.0    # one stage, sampled
    python eval.py --device=cuda
"""

import json
import os
import time
from dataclasses import dataclass

import runtime
from data import world
from data.tokenizer import decode_response, load_tokenizer
from runtime import print0

STAGES = ("pretrain", "sft", "ppo", "dpo", "cdpo", "ipo", "simpo", "orpo", "kto")  # language-model stages


@dataclass
class Config:
    data_dir: str = "data/world"     # folder written by data/prepare.py
    out: str = "out"                 # where the stages' checkpoints are; the report goes here
    stages: str = ""                 # comma-separated stages to score (default: every one found)
    temperature: float = 0.0         # 0 = greedy decoding
    max_new_tokens: int = 48         # answer length limit
    batch_size: int = 64             # prompts per generation batch
    n_show: int = 1                  # answers shown per task kind and stage
    seed: int = 1337                 # sampling seed (when temperature > 0)
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps


def generate_answers(model, enc, prompts, cfg, device):
    """(text, ended) for each prompt."""
    samples = runtime.sample_responses(model, enc, prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed, device,
                                       cfg.batch_size)
    return [decode_response(enc, response) for _, response in samples]


def summarize(grades):
    n = max(1, len(grades))
    return dict(n=len(grades), format=sum(g["format"] for g in grades) / n, correct=sum(g["correct"] for g in grades) / n,
                gold=sum(g["gold"] for g in grades) / n, words=sum(g["words"] for g in grades) / n,
                ended=sum(g["ended"] for g in grades) / n)


def evaluate(model, enc, records, cfg, device):
    tasks = [world.Task.from_dict(r["task"]) for r in records]
    answers = generate_answers(model, enc, [t.prompt for t in tasks], cfg, device)
    rows = []
    for t, (text, ended) in zip(tasks, answers):
        rows.append(dict(family=t.family, kind=t.kind, prompt=t.prompt, text=text, **world.grade(t, text, ended),
                         ended=ended))
    by_family = {f: summarize([r for r in rows if r["family"] == f]) for f in world.FAMILIES}
    return dict(overall=summarize(rows), families=by_family), rows


def win_rate(rows, base_rows):
    """Share of prompts where the gold score beats the base stage's answer; ties count half."""
    wins = [1.0 if a["gold"] > b["gold"] else 0.5 if a["gold"] == b["gold"] else 0.0 for a, b in zip(rows, base_rows)]
    return sum(wins) / len(wins)


def table(results):
    """Markdown: one row per stage and family."""
    head = ("| stage | family | n | format | correct | gold | words | ended | win vs sft |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for stage, res in results.items():
        for fam, s in [("all", res["overall"]), *res["families"].items()]:
            win = f"{s['win_vs_sft']:.0%}" if "win_vs_sft" in s else ""
            lines.append(f"| {stage} | {fam} | {s['n']} | {s['format']:.0%} | {s['correct']:.0%} | {s['gold']:.2f} | "
                         f"{s['words']:.1f} | {s['ended']:.0%} | {win} |")
    return "\n".join(lines)


def main(cfg):
    run = runtime.setup(cfg.seed, cfg.device)
    enc = load_tokenizer(runtime.require(os.path.join(cfg.data_dir, "tokenizer.tiktoken"), "python data/prepare.py"))
    records = runtime.read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"), {"task": dict, "prompt": str})
    wanted = [s for s in cfg.stages.split(",") if s] or [s for s in STAGES
                                                        if os.path.exists(os.path.join(cfg.out, s, "ckpt.pt"))]
    if not wanted:
        raise runtime.UserError(f"no checkpoints under {cfg.out}/ (looked for {', '.join(STAGES)}): "
                                f"run `python pretrain.py` and `python sft.py` first")
    results, samples = {}, {}
    for stage in wanted:
        t0 = time.time()
        model, _ = runtime.load_model(os.path.join(cfg.out, stage, "ckpt.pt"), f"python {stage}.py", enc,
                                      device=run.device)
        results[stage], rows = evaluate(model, enc, records, cfg, run.device)
        samples[stage] = rows
        o = results[stage]["overall"]
        print0(f"{stage}: format {o['format']:.0%}, correct {o['correct']:.0%}, gold {o['gold']:.2f} "
               f"({len(records)} held-out prompts, {time.time() - t0:.1f}s)")

    if "sft" in samples:  # win rate against SFT under the gold scorer, per family and overall
        for stage in wanted:
            rows = samples[stage]
            results[stage]["overall"]["win_vs_sft"] = win_rate(rows, samples["sft"])
            for fam in world.FAMILIES:
                idx = [i for i, r in enumerate(rows) if r["family"] == fam]
                results[stage]["families"][fam]["win_vs_sft"] = win_rate([rows[i] for i in idx],
                                                                         [samples["sft"][i] for i in idx])

    # the same prompts through every stage, one per task kind
    shown = []
    for kind in world.KINDS:
        idx = [i for i, r in enumerate(records) if r["task"]["kind"] == kind][:cfg.n_show]
        for i in idx:
            shown.append(f"**{records[i]['prompt']}**\n")
            for stage in wanted:
                r = samples[stage][i]
                shown.append(f"- {stage}: `{r['text'][:120]!r}`{'' if r['ended'] else ' (no end token)'} "
                             f"(gold {r['gold']:.2f})")
            shown.append("")
    for stage in wanted:
        runtime.atomic_write(os.path.join(cfg.out, stage, "eval.json"),
                             lambda f: f.write(json.dumps(results[stage], indent=1).encode()))
    report = (f"# minRLHF evaluation\n\n{len(records)} held-out prompts from {cfg.data_dir}/eval.jsonl, "
              f"{'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}'} decoding.\n\n"
              f"{table(results)}\n\n## Answers side by side\n\n" + "\n".join(shown) + "\n")
    runtime.atomic_write(os.path.join(cfg.out, "report.md"), lambda f: f.write(report.encode()))
    print0("\n" + table(results) + "\n\n" + "\n".join(shown))
    print0(f"report: {cfg.out}/report.md")


if __name__ == "__main__":
    with runtime.user_errors():
        main(runtime.parse_config(Config))
