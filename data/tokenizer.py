"""Byte-level BPE for the embedded world, trained here and run by tiktoken.

Why a tokenizer of our own: GPT-2's 50k-token vocabulary is far too large for a
model of a million parameters trained for minutes, and it merges digits into
multi-digit tokens, which makes arithmetic hard to learn. This one is trained on
the world's corpus with a small vocabulary (1024 by default) and a pre-tokenizer
that keeps every digit a token of its own.

Subword tokens make copying a word from the prompt easy (one token to copy) and
spelling it hard (its letters are hidden inside the token). So the spelling tasks
answer with letters joined by hyphens ("t-e-n-a-l-p"): punctuation is split off
by the pre-tokenizer, so each letter is one token, and the model must learn which
letters a word token holds. The corpus states every word's spelling for it.

File format: tiktoken's own rank file, one token a line, "<base64 bytes> <rank>".
The chat special tokens come after the ranks; they are never produced from user
text (encode_ordinary), so a prompt that contains "<|end|>" stays plain text.
"""

import base64
import collections
import hashlib
import re

import tiktoken

# ASCII classes so that Python's re (used for training) and tiktoken's regex
# engine split text identically. Non-ASCII bytes fall into the punctuation class
# and stay encodable, byte by byte.
PAT_STR = r""" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")


def train_bpe(text, vocab_size):
    """Learn merges on text until the vocabulary holds vocab_size tokens
    (256 single bytes + merges; the special tokens come on top).
    Returns tiktoken's mergeable ranks {token bytes: rank}."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: must be at least 256 (one token per byte)")
    # Count pre-tokens once; merges then work on the few thousand distinct words.
    counts = collections.Counter(re.findall(PAT_STR, text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freqs = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}

    # pair -> total count, and pair -> indices of words containing it
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for a, b in zip(w, w[1:]):
            pair_counts[a, b] += f
            where[a, b].add(i)

    while len(ranks) < vocab_size and pair_counts:
        # most frequent pair; ties broken by the bytes so the result is deterministic
        (a, b), n = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        if n < 2:
            break
        new = a + b
        ranks[new] = len(ranks)
        for i in list(where[a, b]):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):  # remove this word's old pairs
                pair_counts[p] -= f
                if pair_counts[p] <= 0:
                    del pair_counts[p]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for p in zip(merged, merged[1:]):  # add its new pairs
                pair_counts[p] += f
                where[p].add(i)
        del where[a, b]
    return ranks


def format_ranks(ranks):
    """The rank file's text; the caller writes it (atomically)."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"


def parse_ranks(data, path="<ranks>"):
    ranks = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>'")
        ranks[base64.b64decode(parts[0])] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def load_tokenizer(path):
    """The world's tokenizer as a tiktoken.Encoding; its name carries the rank
    file's hash, which checkpoints store so a mismatch is caught at load."""
    with open(path, "rb") as f:
        data = f.read()
    ranks = parse_ranks(data, path)
    digest = hashlib.sha256(data).hexdigest()[:12]
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"world-{digest}", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens=specials)


# --- the chat format --------------------------------------------------------------
# <|user|> question <|end|> <|assistant|> answer <|end|>


def special_ids(enc):
    return {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}


def encode_prompt(enc, text):
    s = special_ids(enc)
    return [s["<|user|>"], *enc.encode_ordinary(text), s["<|end|>"], s["<|assistant|>"]]


def encode_response(enc, text, ended=True):
    """A response's tokens; ended=False leaves off the end token (a truncated answer)."""
    return enc.encode_ordinary(text) + ([enc.encode_single_token("<|end|>")] if ended else [])


def decode_response(enc, tokens, end=None):
    """(text, ended): the text up to the first end token (the world's <|end|>, or the id
    given), and whether there was one."""
    end = enc.encode_single_token("<|end|>") if end is None else end
    ended = end in tokens
    if ended:
        tokens = tokens[: tokens.index(end)]
    return enc.decode(tokens), ended
