"""The data files a stage reads, each checked before training starts.

JSONL records line by line (a bad line is a UserError naming the file and the line);
preference rankings, read and checked here once for the reward model and the DPO
family alike; the RL prompts with their tasks (PPO and GRPO); the world's tokenizer;
and the token streams of pretraining (and of PPO-ptx's and GRPO's pretraining term).
"""

import binascii
import gzip
import json
import os
import zlib

import numpy as np

import hf
from checkpoint import load, model_from, require
from cli import UserError
from data import world
from data.tokenizer import encode_prompt, encode_response, load_tokenizer


def json_lines(path):
    """(line number, object) of each non-blank line of a .jsonl or .jsonl.gz file; a line
    that is not UTF-8, not JSON or not an object, and a truncated or damaged .gz, each
    refused in one line naming the file (and the line)."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of "
                                    f"the line)") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}: column "
                                    f"{e.colno})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got "
                                    f"{type(rec).__name__}")
                yield lineno, rec
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except EOFError:
        raise UserError(f"{path}: truncated gzip file (it ends after line {lineno})") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{path}: damaged gzip file after line {lineno} ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None


def read_log(path, check):
    """The objects of an append-only JSONL log that a program is about to append to, each
    passed through check(obj) (a ValueError, KeyError or AttributeError marks the line bad),
    and a note or None. A bad last line, which is what a kill in the middle of a write
    leaves, is cut off the file, so the next line appended starts on a line of its own,
    and the note says so; a bad line before the end is a UserError naming it."""
    if not os.path.exists(path):
        return [], None
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out, good_bytes = [], 0
    for n, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError
            check(obj)
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError):
            if n < len(lines):
                raise UserError(f"{path}:{n}: not a line of this log; the file is damaged "
                                f"before its end") from None
            os.truncate(path, good_bytes)
            return out, f"{path}:{n}: cut off a damaged last line (a crash or a kill mid-write)"
        out.append(obj)
        good_bytes += len(raw) + 1
    if data and not data.endswith(b"\n"):  # a whole last object, but its newline was lost
        with open(path, "ab") as f:
            f.write(b"\n")
    return out, None


def read_jsonl(path, fields):
    """Records from a JSONL file; `fields` maps each required field to its type. Each
    record gets `_line`, its line number."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` first")
    records = []
    for lineno, rec in json_lines(path):
        for name, typ in fields.items():
            if name not in rec:
                raise UserError(f"{path}:{lineno}: missing field {name!r}")
            if not isinstance(rec[name], typ) or (typ is int and isinstance(rec[name], bool)):
                raise UserError(f"{path}:{lineno}: field {name!r} should be {typ.__name__}, "
                                f"got {type(rec[name]).__name__}")
        rec["_line"] = lineno
        records.append(rec)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def preference_paths(data_dir, prefs, split):
    """(name, path) of each preference set named in a --prefs value ("prefs,prefs_sft")
    for one split (train or val), each checked to exist: prefs_*.jsonl are written by
    data/prepare.py, prefs_sft_*.jsonl by data/label.py."""
    names = [x for x in prefs.split(",") if x]
    if not names:
        raise UserError("--prefs is empty: name at least one preference set (e.g. prefs)")
    made_by = {"prefs_sft": "python data/label.py", "prefs_human": "python data/labeler.py",
               "prefs_playground": "python playground.py"}
    paths = [(name, os.path.join(data_dir, f"{name}_{split}.jsonl")) for name in names]
    for name, path in paths:  # a name no command writes: a typo, or a set not made yet
        if split == "train" and os.path.isdir(data_dir) and not os.path.exists(path) and \
                name != "prefs" and name not in made_by:
            there = sorted(f[:-len("_train.jsonl")] for f in os.listdir(data_dir)
                           if f.startswith("prefs") and f.endswith("_train.jsonl"))
            raise UserError(f"{path} not found: --prefs={prefs} names no preference set "
                            f"{name!r} in {data_dir} (there: {', '.join(there) or 'none'})")
    # a set after the first may have no held-out file (the playground's labels): it only trains
    return [(name, require(path, made_by.get(name, "python data/prepare.py")))
            for k, (name, path) in enumerate(paths)
            if split == "train" or k == 0 or os.path.exists(path)]


def ranking_pairs(ranking):
    """Every (chosen, rejected) pair of a ranking given best first (InstructGPT: a
    ranking of K responses gives K(K-1)/2 comparisons)."""
    return [(ranking[a], ranking[b])
            for a in range(len(ranking)) for b in range(a + 1, len(ranking))]


NO_PREFERENCE = ("tie", "both_bad", "skip")  # a labeler's choices that rank nothing


def load_rankings(path, enc, block_size):
    """Each ranking record as its K token sequences (prompt + response), the prompt
    length, the ranking (best first), its (chosen, rejected) pairs and the record. A
    record with a "choice" in NO_PREFERENCE and no ranking (a tie or skip the playground
    logged) is left out."""
    out = []
    for rec in read_jsonl(path, {"prompt": str, "responses": list}):
        where = f"{path}:{rec['_line']}"
        if rec.get("choice") in NO_PREFERENCE and "ranking" not in rec:
            continue  # a labeler's tie or skip: a label, but no preference to learn from
        if "ranking" not in rec:
            raise UserError(f"{where}: missing field 'ranking'")
        if not isinstance(rec["ranking"], list):
            raise UserError(f"{where}: field 'ranking' should be list, got "
                            f"{type(rec['ranking']).__name__}")
        resp, ranking = rec["responses"], rec["ranking"]
        if len(resp) < 2:
            raise UserError(f"{where}: a ranking needs at least 2 responses, got {len(resp)}")
        if sorted(ranking) != list(range(len(resp))):
            raise UserError(f"{where}: 'ranking' must order all {len(resp)} responses (indices 0.."
                            f"{len(resp) - 1}, each once), got {ranking}")
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in resp):
            raise UserError(f"{where}: every response needs a string field 'text'")
        p = encode_prompt(enc, rec["prompt"])
        seqs = [p + encode_response(enc, r["text"], bool(r.get("ended", True))) for r in resp]
        if max(map(len, seqs)) > block_size:
            raise UserError(f"{where}: {max(map(len, seqs))} tokens, longer than the context of "
                            f"{block_size} tokens (block_size)")
        out.append(dict(seqs=seqs, prompt_len=len(p), ranking=ranking,
                        pairs=ranking_pairs(ranking), rec=rec))
    return out


def load_preference_sets(data_dir, prefs, split, enc, block_size):
    """{name: rankings} of each preference set named in --prefs, for one split."""
    return {name: load_rankings(path, enc, block_size)
            for name, path in preference_paths(data_dir, prefs, split)}


def load_raters(data_dir):
    """The raters' biases prepare.py wrote to data_dir/meta.json."""
    meta_path = require(os.path.join(data_dir, "meta.json"), "python data/prepare.py")
    try:
        with open(meta_path, encoding="utf-8") as f:
            return world.RaterConfig(**json.load(f)["raters"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: not the meta.json data/prepare.py writes "
                        f"({type(e).__name__}: {str(e)[:80]}): run `python data/prepare.py` "
                        f"again") from None


def world_tokenizer(data_dir):
    """data_dir's tokenizer (written by data/prepare.py); a damaged rank file is a
    UserError that names it and says what is wrong."""
    path = require(os.path.join(data_dir, "tokenizer.tiktoken"), "python data/prepare.py")
    try:
        return load_tokenizer(path)
    except (ValueError, binascii.Error) as e:  # UnicodeDecodeError is a ValueError
        what = str(e) if str(e).startswith(path) else f"{path}: {e}"
        raise UserError(f"{what}: the tokenizer file is damaged; run `python data/prepare.py` "
                        f"again") from None


def stage_model(folder, made_by, data_dir, device):
    """A model to start a stage from, in eval mode, with its tokenizer and chat format: a
    Hugging Face GPT-2 directory or model name (GPT-2's tokenizer, HH's chat format), or a
    stage's folder (its ckpt.pt; GPT-2's tokenizer and "hh" when it was fine-tuned from
    GPT-2, which the checkpoint carries, else the world's of data_dir and "world").
    Returns (model, enc, chat, carried), carried being what the next stage's checkpoint
    keeps of them."""
    if hf.is_gpt2(folder):
        directory = hf.resolve(folder)
        model, enc = hf.from_pretrained(directory)
        return (model.to(device), enc, "hh",
                dict(hf_tokenizer=hf.tokenizer_texts(directory), chat="hh", init_from=folder))
    path = os.path.join(folder, "ckpt.pt")
    ckpt = load(path, made_by)
    enc = hf.checkpoint_tokenizer(ckpt, path) or world_tokenizer(data_dir)
    carried = {k: ckpt[k] for k in ("hf_tokenizer", "chat", "init_from") if k in ckpt}
    model = model_from(ckpt, path, made_by, enc, device=device)
    return model, enc, ckpt.get("chat", "world"), carried


def token_stream(path, vocab_size, min_tokens):
    """A uint16 token file (train.bin, val.bin) as a read-only memmap, after checking
    that it holds whole tokens, at least min_tokens of them, all below vocab_size."""
    path = require(str(path), "python data/prepare.py")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(f"{path}: {size} bytes, not a whole number of 2-byte tokens: the file is "
                        f"damaged; run `python data/prepare.py` again")
    if size // 2 < min_tokens:
        raise UserError(f"{path} holds {size // 2} tokens, fewer than the {min_tokens} needed "
                        f"(one window of the context and its next token): write more with "
                        f"`python data/prepare.py --n_docs=N` (val.bin gets 1 in 20), or use a "
                        f"shorter window")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(data.max())
    if top >= vocab_size:
        raise UserError(f"{path}: token id {top} is beyond the tokenizer's vocabulary of "
                        f"{vocab_size}: the file is damaged or from another tokenizer; run "
                        f"`python data/prepare.py`")
    return data


def prompt_room(block_size, max_new_tokens):
    """Tokens a prompt may have: the context less --max_new_tokens, at least one."""
    if max_new_tokens >= block_size:
        raise UserError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                        f"the model's context of {block_size} tokens")
    return block_size - max_new_tokens


def load_prompts(path, enc, max_prompt_len):
    """RL training prompts (text, tokens, task), tokenized once; one too long for the
    context is an error naming its line."""
    texts, prompts, tasks = [], [], []
    for rec in read_jsonl(path, {"prompt": str, "task": dict}):
        ids = encode_prompt(enc, rec["prompt"])
        if len(ids) > max_prompt_len:
            raise UserError(f"{path}:{rec['_line']}: prompt of {len(ids)} tokens leaves no room "
                            f"for --max_new_tokens in the context "
                            f"(at most {max_prompt_len} prompt tokens)")
        texts.append(rec["prompt"])
        prompts.append(ids)
        tasks.append(world.Task.from_dict(rec["task"]))
    return texts, prompts, tasks


def ptx_stream(cfg, enc, block_size):
    """The pretraining tokens (data_dir/train.bin) of an RL stage's --ptx_coef term, or
    None when --ptx_coef is 0; a window longer than the policy's context is refused."""
    if cfg.ptx_coef <= 0:
        return None
    if cfg.ptx_len > block_size:
        raise UserError(f"--ptx_len={cfg.ptx_len} must be at most {block_size} "
                        f"(the policy's context)")
    return token_stream(os.path.join(cfg.data_dir, "train.bin"), enc.n_vocab, cfg.ptx_len + 2)
