"""Generate the embedded assistant world: corpus, tokenizer, demonstrations,
preference rankings and prompts. Deterministic from --seed.

    python data/prepare.py                      # writes data/world/
    python data/prepare.py --seed=2 --out_dir=data/world2

Files (field by field in docs/world.md):
    corpus.txt          pretraining text, documents separated by blank lines
    tokenizer.tiktoken  the byte-level BPE, tiktoken rank-file format
    train.bin, val.bin  the corpus tokenized, uint16, documents joined by <|endoftext|>
    sft_train.jsonl, sft_val.jsonl       demonstrations (prompt, ideal-ish response)
    prefs_train.jsonl, prefs_val.jsonl   K responses per prompt, ranked by the raters
    prompts_train.jsonl                  training prompts for RL
    eval.jsonl                           held-out prompts, for every evaluation
    meta.json           the config, counts, tokenizer name
"""

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import numpy as np  # noqa: E402

from data import tokenizer as tok  # noqa: E402
from data import world  # noqa: E402
from cli import UserError, parse_config, ranges, user_errors  # noqa: E402


@dataclass
class Config:
    out_dir: str = "data/world"  # folder for the generated files (replaced as a whole)
    seed: int = 1337             # everything below is a function of this seed
    n_docs: int = 40000          # pretraining documents
    vocab_size: int = 1024       # BPE vocabulary (256 bytes + merges), special tokens extra
    n_sft: int = 4000            # demonstrations (10% more for validation)
    n_prefs: int = 3000          # preference rankings (10% more for validation)
    n_rl: int = 4000             # training prompts for RL
    n_eval: int = 40             # held-out eval prompts per task kind
    K: int = 4                   # responses per preference ranking
    max_add: int = 29            # add/sub operands are 0..max_add
    max_compare: int = 99        # compared numbers are 0..max_compare
    sort_min: int = 3            # lists to sort have sort_min..sort_max digits
    sort_max: int = 5
    imperfect: float = 0.06      # share of demonstrations that are imperfect
    habit: float = 0.6           # share of the other demos of world.SIGN_OFFS kinds that sign off
    rater_k: float = 3.0         # raters: how sharply they follow the gold gap
    rater_b_len: float = 0.12    # raters: bias per word of length (0 = none)
    rater_b_style: float = 1.5   # raters: bias for a friendly preamble (0 = none)

    RANGES: ClassVar = ranges(at_least_1="vocab_size", fraction="imperfect habit",
                              non_negative="n_docs n_sft n_prefs n_rl n_eval rater_k rater_b_len "
                                           "rater_b_style")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def check_task_ranges(cfg, wc):
    """Each number kind must have tasks in both splits: training data and held-out prompts."""
    for name in ("max_add", "max_compare"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    sort = f"--sort_min={cfg.sort_min} --sort_max={cfg.sort_max}"
    if not 2 <= cfg.sort_min <= cfg.sort_max:
        raise UserError(f"{sort}: need 2 <= sort_min <= sort_max")
    flags = {"add": f"--max_add={cfg.max_add}", "sub": f"--max_add={cfg.max_add}",
             "larger": f"--max_compare={cfg.max_compare}",
             "smaller": f"--max_compare={cfg.max_compare}", "sort": sort}
    for kind, flag in flags.items():
        for split in ("train", "heldout"):
            try:
                world.sample_task(random.Random(0), kind, split, wc)
            except RuntimeError:
                raise UserError(f"{flag}: the range is too small to give {kind} tasks in the "
                                f"{split} split (a fixed hash holds out {wc.heldout_pct}% of "
                                f"them); widen it") from None


def main(cfg):
    if cfg.K < 2:
        raise UserError(f"--K={cfg.K}: a ranking needs at least 2 responses")
    if cfg.K > len(world.STYLES):
        raise UserError(f"--K={cfg.K}: at most {len(world.STYLES)} (one response per style)")
    if min(cfg.n_docs, cfg.n_sft, cfg.n_prefs, cfg.n_rl, cfg.n_eval) < 1:
        raise UserError("--n_docs, --n_sft, --n_prefs, --n_rl and --n_eval must be at least 1")
    if cfg.vocab_size < 256:
        raise UserError(f"--vocab_size={cfg.vocab_size}: must be at least 256 (one token per byte)")
    wc = world.WorldConfig(max_add=cfg.max_add, max_compare=cfg.max_compare,
                           sort_len=(cfg.sort_min, cfg.sort_max))
    check_task_ranges(cfg, wc)
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")  # written whole, then swapped in: no partial folder
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        summary = write_world(cfg, wc, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a folder that cannot be made: one line, nothing left
        raise UserError(f"could not write {e.filename or out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/ {summary}")


def write_world(cfg, wc, tmp):
    """Every file of the world into the folder tmp; returns a summary of what was written."""
    t0 = time.time()
    # 1. the pretraining corpus, and a tokenizer trained on it
    rng = random.Random(cfg.seed)
    docs = world.corpus_documents(rng, cfg.n_docs, wc)
    (tmp / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    ranks = tok.train_bpe("\n\n".join(docs), cfg.vocab_size)
    (tmp / "tokenizer.tiktoken").write_text(tok.format_ranks(ranks))
    enc = tok.load_tokenizer(tmp / "tokenizer.tiktoken")
    t_tok = time.time() - t0

    # 2. tokenized corpus: the last 5% of documents are validation
    eot = enc.encode_single_token("<|endoftext|>")
    n_val = max(1, len(docs) // 20)
    for name, part in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
        ids = [t for d in enc.encode_ordinary_batch(part) for t in (*d, eot)]
        np.array(ids, dtype=np.uint16).tofile(tmp / f"{name}.bin")
        if name == "train":
            n_train_tokens = len(ids)

    # 3. demonstrations, preference rankings, RL prompts: train split only
    def tasks(n):
        return world.task_stream(rng, "train", n, wc)

    sft = [world.sft_record(rng, t, cfg.imperfect, cfg.habit)
           for t in tasks(cfg.n_sft + cfg.n_sft // 10)]
    raters = world.RaterConfig(k=cfg.rater_k, b_len=cfg.rater_b_len, b_style=cfg.rater_b_style)
    prefs = [world.preference_record(rng, t, cfg.K, raters)
             for t in tasks(cfg.n_prefs + cfg.n_prefs // 10)]
    write_jsonl(tmp / "sft_train.jsonl", sft[:cfg.n_sft])
    write_jsonl(tmp / "sft_val.jsonl", sft[cfg.n_sft:])
    write_jsonl(tmp / "prefs_train.jsonl", prefs[:cfg.n_prefs])
    write_jsonl(tmp / "prefs_val.jsonl", prefs[cfg.n_prefs:])
    write_jsonl(tmp / "prompts_train.jsonl",
                [dict(task=t.to_dict(), family=t.family, prompt=t.prompt) for t in tasks(cfg.n_rl)])

    # 4. held-out eval prompts: n_eval per kind, distinct where the split has enough
    evals = []
    for kind in world.KINDS:
        seen = set()
        for _ in range(50 * cfg.n_eval):
            t = world.sample_task(rng, kind, "heldout", wc)
            if t.prompt not in seen:
                seen.add(t.prompt)
                evals.append(dict(task=t.to_dict(), family=t.family, prompt=t.prompt,
                                  answer=world.ideal_answer(t)))
            if len(seen) == cfg.n_eval:
                break
    write_jsonl(tmp / "eval.jsonl", evals)

    meta = dict(config=asdict(cfg), tokenizer=enc.name, vocab_size=enc.n_vocab,
                train_tokens=n_train_tokens, docs=len(docs), sft=cfg.n_sft, prefs=cfg.n_prefs,
                rl_prompts=cfg.n_rl, eval_prompts=len(evals), raters=asdict(raters),
                gold_weights=world.GOLD_WEIGHTS)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return (f"in {time.time() - t0:.1f}s (tokenizer {t_tok:.1f}s): {len(docs)} documents, "
            f"{n_train_tokens:,} training tokens, vocabulary {enc.n_vocab}, {cfg.n_sft} "
            f"demonstrations, {cfg.n_prefs} rankings of {cfg.K}, {cfg.n_rl} RL prompts, "
            f"{len(evals)} held-out eval prompts")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
