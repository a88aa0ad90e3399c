"""A labeler a person can use: a prompt and two answers, one key, the next pair.

The pairs are the answers of a checkpoint to the world's training prompts (two samples
per prompt at temperature 1, made once and kept beside the log, so a second session sees
the same pairs), or a file of your own (--pairs: {"prompt", "responses": [two of
{"text", "ended"}]} a line). Which answer is shown as A is drawn per pair from --seed and
recorded. Keys, no Enter needed:

  a  A is better        b  B is better        t  a tie          x  both are bad
  s  skip this pair     u  undo the last label                  q  quit
  ?  help

Every label is one JSON line appended to --log and flushed to the disk (fsync) before the
next pair is shown, so a crash or a kill loses nothing already given; undo appends a
retraction rather than editing the file. Starting again resumes after the last label. A
damaged last line (a label being written when the process was killed) is cut off, and
the labeler says so.

--export=true turns the log into rankings reward.py and dpo.py read: the A/B choices
become data_dir/prefs_human_train.jsonl and prefs_human_val.jsonl (ties, both-bad and
skips are counted and left out), each answer with the world's gold score and the
simulated raters' utility when the pair comes from the world, so reward.py's diagnostics
work on it too:

    python data/labeler.py                                  # label answers of out/sft
    python data/labeler.py --pairs=my_pairs.jsonl --log=my_labels.jsonl
    python data/labeler.py --export=true
    python reward.py --prefs=prefs,prefs_sft,prefs_human
"""

import contextlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import checkpoint  # noqa: E402
import distributed  # noqa: E402
from batch import sample_responses  # noqa: E402
from cli import UserError, parse_config, ranges, user_errors  # noqa: E402
from data import world  # noqa: E402
from data.tokenizer import decode_response  # noqa: E402
import records  # noqa: E402
from records import load_raters, read_jsonl, world_tokenizer  # noqa: E402

CHOICES = {"a": "A", "b": "B", "t": "tie", "x": "both_bad", "s": "skip"}
HELP = ("keys: a = A is better, b = B is better, t = tie, x = both bad, s = skip, "
        "u = undo, q = quit, ? = help")


@dataclass
class Config:
    data_dir: str = "data/world"       # the world (prompts, tokenizer, raters); exports go here
    policy: str = "out/sft"            # the checkpoint whose answers are compared
    pairs: str = ""                    # a pairs file to label instead (default: sampled)
    log: str = "data/world/labels_human.jsonl"  # the labels, one JSON line each, appended
    n_pairs: int = 100                 # pairs to sample from --policy (the first session)
    max_new_tokens: int = 48           # answer length limit when sampling
    export: bool = False               # write prefs_human_{train,val}.jsonl from the log
    seed: int = 1337                   # the sampled pairs and which answer is shown as A
    device: str = "auto"               # auto, cpu, cuda, cuda:N or mps

    RANGES: ClassVar = ranges(at_least_1="n_pairs max_new_tokens")


# --- the pairs -------------------------------------------------------------------------------


def sampled_pairs(cfg, path):
    """Two different answers of --policy to each of the first training prompts; written
    to path once, so every later session labels the same pairs."""
    run = distributed.setup(cfg.seed, cfg.device)
    enc = world_tokenizer(cfg.data_dir)
    policy, _ = checkpoint.load_model(os.path.join(cfg.policy, "ckpt.pt"), "python sft.py", enc,
                                      device=run.device)
    records = read_jsonl(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                         {"task": dict, "prompt": str, "family": str})
    pairs, rng = [], random.Random(cfg.seed)
    order = rng.sample(range(len(records)), len(records))
    for start in range(0, len(order), 4 * cfg.n_pairs):
        batch = [records[i] for i in order[start:start + 4 * cfg.n_pairs]]
        samples = sample_responses(policy, enc, [r["prompt"] for r in batch for _ in range(2)],
                                   cfg.max_new_tokens, 1.0, cfg.seed + start, run.device)
        answers = [decode_response(enc, r) for _, r in samples]
        for k, rec in enumerate(batch):
            a, b = answers[2 * k], answers[2 * k + 1]
            if a[0] != b[0] and len(pairs) < cfg.n_pairs:
                pairs.append(dict(task=rec["task"], family=rec["family"], prompt=rec["prompt"],
                                  responses=[dict(text=t, ended=e) for t, e in (a, b)]))
        if len(pairs) == cfg.n_pairs:
            break
    checkpoint.atomic_write(path, lambda f: f.write(
        "".join(json.dumps(p) + "\n" for p in pairs).encode()))
    print(f"sampled {len(pairs)} pairs of answers of {cfg.policy} into {path}")
    return pairs


def load_pairs(path):
    pairs = read_jsonl(path, {"prompt": str, "responses": list})
    for p in pairs:
        rs = p["responses"]
        if len(rs) != 2 or not all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                    for r in rs):
            raise UserError(f"{path}:{p['_line']}: 'responses' should be two objects with a "
                            f"string 'text'")
    return pairs


# --- the log ---------------------------------------------------------------------------------


def read_log(path, n_pairs):
    """The labels in force (retractions applied), in order, and a note on a damaged last
    line (cut off the log, so labelling goes on after the last whole label). Each label:
    {"pair", "choice", "left"}."""
    def check(ev):
        if ev["event"] not in ("label", "undo") or ev["event"] == "label" and (
                not isinstance(ev.get("pair"), int) or not 0 <= ev["pair"] < n_pairs
                or ev.get("choice") not in CHOICES.values() or ev.get("left") not in (0, 1)):
            raise ValueError
    events, note = records.read_log(path, check)
    labels = []
    for ev in events:
        if ev["event"] == "label":
            labels.append(ev)
        elif labels:
            labels.pop()
    return labels, note


def append(f, event):
    """One line, on the disk before the function returns."""
    f.write(json.dumps(event) + "\n")
    f.flush()
    os.fsync(f.fileno())


# --- the terminal ----------------------------------------------------------------------------


@contextlib.contextmanager
def keys():
    """read() -> one key press. In a terminal, keys arrive without Enter (cbreak mode of
    the standard library's termios, for the whole session, so no key typed ahead is lost
    and the terminal is restored however the labeler ends); from a pipe, the first
    character of each line. '' at the end of the input."""
    if not sys.stdin.isatty():
        yield lambda: (sys.stdin.readline() or "")[:1]
        return
    import termios
    import tty
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)
    try:
        yield lambda: os.read(fd, 1).decode("utf-8", "replace")
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def show(i, n, pair, left, message):
    a, b = pair["responses"][left], pair["responses"][1 - left]
    end = lambda r: "" if r.get("ended", True) else "   (no end)"  # noqa: E731
    print("\033[2J\033[H", end="")
    print(f"pair {i + 1} of {n}" + (f"   [{message}]" if message else ""))
    print(f"\nPROMPT  {pair['prompt']}\n")
    print(f"A       {a['text']}{end(a)}")
    print(f"B       {b['text']}{end(b)}\n")
    print("a / b / t(ie) / x (both bad) / s(kip) / u(ndo) / q(uit) / ? > ", end="", flush=True)


def label(cfg, pairs):
    labels, note = read_log(cfg.log, len(pairs))
    if note:
        print(note)
    message = note and "resumed after a damaged last line"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.log)), exist_ok=True)
    with open(cfg.log, "a", encoding="utf-8") as f, keys() as read_key:
        while len(labels) < len(pairs):
            i = len(labels)
            left = random.Random(f"{cfg.seed}:{i}").randrange(2)  # the same on every resume
            show(i, len(pairs), pairs[i], left, message)
            key = read_key().lower()
            message = None
            if key in ("q", ""):
                break
            if key in CHOICES:
                event = {"event": "label", "pair": i, "choice": CHOICES[key], "left": left}
                append(f, event)
                labels.append(event)
            elif key == "u":
                if labels:
                    append(f, {"event": "undo", "pair": labels[-1]["pair"]})
                    labels.pop()
                    message = f"undid the label of pair {i}"
                else:
                    message = "nothing to undo"
            elif key in ("?", "h"):
                message = HELP
            else:
                message = f"unknown key {key!r}; press ? for help"
    done = len(labels)
    print(f"\n{done} of {len(pairs)} pairs labelled; the labels are in {cfg.log}"
          + ("" if done < len(pairs) else " (all done: --export=true makes rankings of them)"))


# --- export ------------------------------------------------------------------------------------


def export(cfg, pairs):
    labels, note = read_log(cfg.log, len(pairs))
    if note:
        print(note)
    raters = None
    if os.path.exists(os.path.join(cfg.data_dir, "meta.json")):
        raters = load_raters(cfg.data_dir)  # a damaged file refused in one line
    rankings, counts = [], {c: 0 for c in CHOICES.values()}
    for ev in labels:
        counts[ev["choice"]] += 1
        if ev["choice"] not in ("A", "B"):
            continue
        pair = pairs[ev["pair"]]
        shown_a = ev["left"]
        winner = shown_a if ev["choice"] == "A" else 1 - shown_a
        responses = []
        for r in pair["responses"]:
            resp = dict(text=r["text"], ended=bool(r.get("ended", True)), style="human_pair")
            if "task" in pair and raters is not None:
                task = world.Task.from_dict(pair["task"])
                resp.update(gold=round(world.gold(task, resp["text"], resp["ended"]), 4),
                            utility=round(world.rater_utility(task, resp["text"], resp["ended"],
                                                              raters), 4))
            responses.append(resp)
        rankings.append({**{k: pair[k] for k in ("task", "family") if k in pair},
                         "prompt": pair["prompt"], "responses": responses,
                         "ranking": [winner, 1 - winner]})
    if len(rankings) < 2:
        raise UserError(f"{cfg.log}: {len(rankings)} A/B label(s); at least 2 are needed to "
                        f"write a training and a validation set")
    n_val = max(1, len(rankings) // 10)
    for split, part in (("train", rankings[:-n_val]), ("val", rankings[-n_val:])):
        checkpoint.atomic_write(os.path.join(cfg.data_dir, f"prefs_human_{split}.jsonl"),
                                lambda f: f.write("".join(json.dumps(r) + "\n"
                                                          for r in part).encode()))
    left_out = ", ".join(f"{counts[c]} {c.replace('_', ' ')}" for c in ("tie", "both_bad", "skip"))
    print(f"wrote {cfg.data_dir}/prefs_human_train.jsonl and prefs_human_val.jsonl: "
          f"{len(rankings)} rankings ({left_out} left out); "
          f"train on them with python reward.py --prefs=prefs,prefs_sft,prefs_human")


def main(cfg):
    if os.path.isdir(cfg.log):
        raise UserError(f"--log={cfg.log} is a folder: name a file, such as "
                        f"{os.path.join(cfg.log, 'labels_human.jsonl')}")
    if cfg.pairs and not os.path.exists(cfg.pairs):
        raise UserError(f"--pairs={cfg.pairs} not found: a JSONL file of pairs to label (each "
                        f"line {{\"prompt\", \"responses\": two {{\"text\"}}}}), or leave "
                        f"--pairs out to sample pairs from --policy")
    path = cfg.pairs or os.path.splitext(cfg.log)[0] + ".pairs.jsonl"
    if cfg.pairs or os.path.exists(path):
        pairs = load_pairs(path)
    elif cfg.export:
        raise UserError(f"{path} not found: label some pairs first (python data/labeler.py)")
    else:
        pairs = sampled_pairs(cfg, path)
    (export if cfg.export else label)(cfg, pairs)


if __name__ == "__main__":
    with user_errors():
        try:
            main(parse_config(Config))
        except KeyboardInterrupt:  # Ctrl-C: every label given is already on the disk
            print("\ninterrupted; the labels given so far are in the log")
            sys.exit(130)
