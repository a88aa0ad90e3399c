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

--out_dir is replaced as a whole, so it must be new, empty, or a world this script wrote
(its meta.json); anything else is refused before any work. The labels a person gave in
that world (data/labeler.py's labels_human.jsonl and prefs_human_*.jsonl, the
playground's prefs_playground_*.jsonl) are carried into the new one; everything else
that other scripts wrote there (data/label.py's sets) goes with the old world. Ctrl-C
(exit 130) and SIGTERM (exit 143) stop the run and leave the previous world as it was,
with no temporary folder.
"""

import json
import os
import random
import shutil
import signal
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
    out_dir: str = "data/world"  # the world's folder, replaced as a whole: new, empty, or a world
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


# the labels a person gave, kept when the world they lie in is written again
PEOPLES = ("labels_human*.jsonl", "prefs_human_*.jsonl", "prefs_playground_*.jsonl")
# every file main() writes; a <out>.tmp left by a killed run holds some of them and no other
FILES = ("corpus.txt", "tokenizer.tiktoken", "train.bin", "val.bin", "sft_train.jsonl",
         "sft_val.jsonl", "prefs_train.jsonl", "prefs_val.jsonl", "prompts_train.jsonl",
         "eval.jsonl", "meta.json")
STOPS = (signal.SIGINT, signal.SIGTERM)


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


def is_world(folder):
    """Whether folder holds a meta.json of this script's (every version wrote one, with the
    config, seed included, and the tokenizer's name)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):  # none, unreadable, not JSON
        return False
    return (isinstance(meta, dict) and "tokenizer" in meta
            and isinstance(meta.get("config"), dict) and "seed" in meta["config"])


def check_out_dir(flag, out, tmp):
    """Refuse to replace what this script did not write: out must be missing, an empty folder
    or a world; tmp (deleted first) missing or a leftover of a killed run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag}: {out} is a file, not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not is_world(out):
        raise UserError(f"{flag}: {out} is not empty and not a world data/prepare.py wrote "
                        f"(no meta.json of one); the folder is replaced as a whole: give a new "
                        f"or empty folder")
    if tmp.exists() and not (tmp.is_dir() and all(f.name in FILES for f in tmp.iterdir())):
        raise UserError(f"{flag}: {tmp}, where the world is written first, holds other files; "
                        f"move it away or give another folder")


def on_stops(handler):
    for sig in STOPS:
        signal.signal(sig, handler)


def stop(signum, frame):
    """Ctrl-C or SIGTERM: an exception, so that main's `finally` removes the temporary folder
    (SIGTERM would kill at once and leave it); further ones are ignored while it does."""
    on_stops(signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # cli.user_errors: "interrupted", exit 130
    print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(cfg):
    if cfg.K < 2:
        raise UserError(f"--K={cfg.K}: a ranking needs at least 2 responses")
    if cfg.K > len(world.STYLES):
        raise UserError(f"--K={cfg.K}: at most {len(world.STYLES)} (one response per style)")
    if min(cfg.n_sft, cfg.n_prefs, cfg.n_rl, cfg.n_eval) < 1:
        raise UserError("--n_sft, --n_prefs, --n_rl and --n_eval must be at least 1")
    if cfg.n_docs < 2:
        raise UserError(f"--n_docs={cfg.n_docs}: at least 2 (one for train.bin, one for val.bin)")
    if cfg.vocab_size < 256:
        raise UserError(f"--vocab_size={cfg.vocab_size}: must be at least 256 (one token per byte)")
    wc = world.WorldConfig(max_add=cfg.max_add, max_compare=cfg.max_compare,
                           sort_len=(cfg.sort_min, cfg.sort_max))
    check_task_ranges(cfg, wc)
    flag = f"--out_dir={cfg.out_dir}"
    out = Path(cfg.out_dir).resolve()  # "." and ".." by their names
    if out == out.parent:  # the root
        raise UserError(f"{flag}: give a folder of its own for the world")
    tmp = out.with_name(out.name + ".tmp")  # written whole, then swapped in: no partial folder
    check_out_dir(flag, out, tmp)
    handlers = {sig: signal.getsignal(sig) for sig in STOPS}
    for sig, handler in handlers.items():
        if handler is not signal.SIG_IGN:  # a run started with them ignored (nohup) keeps them so
            signal.signal(sig, stop)
    stopped = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        summary = write_world(cfg, wc, tmp)
        on_stops(signal.SIG_IGN)  # the swap is not cut short: the old world or the new, whole
        check_out_dir(flag, out, tmp)  # (a file put there meanwhile)
        kept = sorted({f for pattern in PEOPLES for f in out.glob(pattern)}) if out.is_dir() else []
        for f in kept:  # copied, so that a failure before the swap leaves the old world whole
            shutil.copy2(f, tmp / f.name)
        if out.is_dir() and any(out.iterdir()):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a folder that cannot be made: one line, nothing left
        raise UserError(f"could not write {e.filename or out}: {e.strerror or e}") from None
    except (KeyboardInterrupt, SystemExit):  # by stop(): deaf to more signals until the exit
        stopped = True
        raise
    else:  # (still deaf to Ctrl-C: the world is written)
        print(f"wrote {Path(cfg.out_dir)}/ {summary}")
        if kept:
            print(f"kept the labels given in the world it replaced: "
                  f"{', '.join(f.name for f in kept)}")
    finally:
        try:
            on_stops(signal.SIG_IGN)  # (a signal pending runs stop() first, which raises)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_IGN if stopped else handler)


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
        # one thread: encode_ordinary_batch's thread pool deadlocks when Ctrl-C lands inside
        # its locks (the workers wait forever on a lock the main thread never releases)
        ids = [t for d in part for t in (*enc.encode_ordinary(d), eot)]
        np.array(ids, dtype=np.uint16).tofile(tmp / f"{name}.bin")
        if name == "train":
            n_train_tokens = len(ids)

    # 3. demonstrations, preference rankings, RL prompts: train split only
    def tasks(n):
        return world.task_stream(rng, "train", n, wc)

    sft = [world.sft_record(rng, t, cfg.imperfect, cfg.habit)
           for t in tasks(cfg.n_sft + max(1, cfg.n_sft // 10))]
    raters = world.RaterConfig(k=cfg.rater_k, b_len=cfg.rater_b_len, b_style=cfg.rater_b_style)
    prefs = [world.preference_record(rng, t, cfg.K, raters)
             for t in tasks(cfg.n_prefs + max(1, cfg.n_prefs // 10))]
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
