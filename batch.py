"""Prompt+response batches: how every stage and eval feed token lists to the models.

- collate: right-padded prompt+response rows with their prompt lengths, lengths and
  response mask. Right padding needs no attention mask: causal attention hides the
  later pads from every real token.
- length_groups / length_chunks: items as runs of similar length (so many runs, or runs
  of so many), so each is padded to its own longest row only.
- left_pad: prompts right-aligned, for the one layout generation needs (every row's
  next token in the last column); PPO keeps its rollouts in that layout, and
  drop_pad_columns cuts a minibatch of them to the columns its own rows use.
- response_logprobs / sequence_logprobs: log π of the response tokens, per token or
  summed (with the count, for means), through model.token_logprobs, the one place
  log-softmax is taken; rows that begin with the same prompt can run it once.
- sample_responses: answers sampled with the KV cache, batch by batch.
- reward_scores: a reward model's (or any scorer's) score of many prompt+response pairs.
- sequence_kl: the sampled estimate of KL(π‖π_ref) that eval reports and DPO logs.
- token_windows / ptx_windows: next-token windows of a token stream (pretraining, and
  the pretraining term of PPO-ptx and GRPO).
- verifiable_score: the world's correctness check as a reward (PPO and GRPO).
- gold_figures / show_samples: what PPO and GRPO log of a rollout beside the proxy (the
  world's gold scorer) and the sample lines they print.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cli import UserError
from data import world
from data.tokenizer import decode_response, encode_prompt
from distributed import print0
from model import token_logprobs


@dataclass
class Batch:
    tokens: Tensor          # (B, T) prompt + response, right-padded
    prompt_lengths: Tensor  # (B,) where each response starts
    lengths: Tensor         # (B,) real tokens per row
    mask: Tensor            # (B, T) bool, True on response tokens
    shortest_prompt: int    # min of prompt_lengths, on the host: no wait for a GPU to read it

    def __len__(self):
        return self.tokens.size(0)


def response_mask(T, prompt_lengths, lengths=None):
    """(B, T) bool, True on the response tokens of right-padded prompt+response rows:
    positions from prompt_lengths on, and before lengths when given."""
    t = torch.arange(T, device=prompt_lengths.device)[None, :]
    m = t >= prompt_lengths[:, None]
    return m if lengths is None else m & (t < lengths[:, None])


def collate(seqs, prompt_lengths, pad, device):
    """Token lists (prompt + response) and their prompt lengths -> a right-padded Batch."""
    tokens = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths, prompt_lengths = torch.tensor([len(s) for s in seqs]), torch.tensor(prompt_lengths)
    return Batch(tokens.to(device), prompt_lengths.to(device), lengths.to(device),
                 response_mask(tokens.size(1), prompt_lengths, lengths).to(device),
                 int(prompt_lengths.min()))


def collate_pairs(pairs, pad, device):
    """collate for (prompt tokens, response tokens) pairs."""
    return collate([p + r for p, r in pairs], [len(p) for p, _ in pairs], pad, device)


def length_groups(items, length, groups):
    """One micro-batch's items as `groups` runs of similar length, even in size: sorted
    by length(item) (stable), then cut (fewer runs when there are fewer items). Run one
    by one, each padded to its own longest row, they cost less than the items padded
    together: a batch of the world's answers is about half padding (RESULTS.md,
    Benchmarks). Their gradients, weighted by their share, add up to the whole's.
    groups 1: the items as they are."""
    if groups <= 1:
        return [items]
    items = sorted(items, key=length)
    n = len(items)
    return [run for run in (items[k * n // groups:(k + 1) * n // groups] for k in range(groups))
            if run]


def length_chunks(lengths, size):
    """Positions of `lengths` sorted by length (stable), in chunks of `size` (the last
    may be shorter): passes each padded to its own longest row only."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[k:k + size] for k in range(0, len(order), size)]


def left_pad(rows, pad, device):
    """Token lists -> (tokens, mask) (B, P), right-aligned so every row ends in column P−1;
    mask is True on real tokens."""
    P = max(len(r) for r in rows)
    tokens = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = True
    return tokens.to(device), mask.to(device)


def drop_pad_columns(tokens, attn, mask, P):
    """Rows in the rollout layout (left-padded prompts in the first P columns, then
    right-padded responses; attn (B, T) True on real tokens, mask (B, N) on response
    tokens) without the columns that are padding in every row: the prompt's before the
    earliest first token, the responses' after the longest. Positions count real tokens
    (GPT.hidden), so no row's figures change. Returns tokens, attn, mask and the new P."""
    # the first column any row's prompt uses, and the longest response: read together, one
    # wait for a GPU
    first, n = torch.stack([attn[:, :P].any(0).int().argmax(), mask.sum(1).max().long()]).tolist()
    n = max(n, 1)
    return tokens[:, first:P + n], attn[:, first:P + n], mask[:, :n], P - first


def response_logprobs(model, tokens, mask=None, *, attn_mask=None, start=1, temperature=1.0,
                      entropy=False, share_prefix=False):
    """log π(tokens[:, t] | tokens[:, :t]) for the columns t ≥ start, (B, T − start)
    float32, logits divided by the temperature; 0 where mask[:, t] is False (mask None:
    every column). Only the positions that predict those tokens go through the
    log-softmax. With entropy=True, also the entropies of those distributions.
    share_prefix=True: rows with the same first `start` columns run them once
    (GPT.shared_prefix_hidden), for answers that share their prompt."""
    kwargs = {"share_prefix": True} if share_prefix else {}
    logits = model(tokens, attn_mask=attn_mask, logits_from=start - 1, **kwargs)[0]
    m = None if mask is None else mask[:, start - 1:]
    return token_logprobs(logits, tokens[:, start - 1:], m, temperature=temperature,
                          entropy=entropy)


def sequence_logprobs(model, batch):
    """Summed log-probs of each row's response tokens, and their count: (B,), (B,). The
    columns before the shortest prompt's end hold no response token and are skipped, and
    rows that share them (a pair's chosen and rejected answer) run them once."""
    start = max(1, batch.shortest_prompt)
    logp = response_logprobs(model, batch.tokens, batch.mask, start=start, share_prefix=True)
    return logp.sum(-1), batch.mask[:, 1:].sum(-1).float()


@torch.no_grad()
def sample_responses(model, enc, prompts, max_new_tokens, temperature, seed, device, batch_size=64,
                     stop=None):
    """Answer each prompt with the KV cache, batch by batch, from one generator seeded with
    `seed`: a text, put in the world's chat format, or a token list already in the model's
    own (then `stop` is its end token). Returns (prompt tokens, response tokens) per
    prompt; a response keeps its end token when it emitted one."""
    end = enc.encode_single_token("<|end|>") if stop is None else stop
    pad = enc.encode_single_token("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = [p if isinstance(p, list) else encode_prompt(enc, p)
                 for p in prompts[i:i + batch_size]]
        longest = max(len(b) for b in batch)
        if longest + max_new_tokens > model.config.block_size:
            raise UserError(f"a prompt of {longest} tokens + --max_new_tokens={max_new_tokens} "
                            f"exceeds the context of {model.config.block_size} tokens")
        tokens, mask = model.generate(batch, max_new_tokens, temperature=temperature,
                                      stop_token=end, pad_token=pad, generator=g)
        out += [(p, [t for t, keep in zip(row, m) if keep])
                for p, row, m in zip(batch, tokens.tolist(), mask.tolist())]
    return out


@torch.no_grad()
def reward_scores(score_fn, pairs, pad, device, batch_size=64):
    """score_fn(Batch) -> (B,) scores, one per row, over (prompt tokens, response tokens)
    pairs: a 1-D float tensor on the device, in the pairs' order. Inference only. More
    pairs than batch_size run in passes of pairs of similar length (sorted, so that each
    pass is padded to its own longest); the scores are the same up to rounding."""
    if len(pairs) <= batch_size:
        return score_fn(collate_pairs(pairs, pad, device)).float()
    chunks = length_chunks([len(p) + len(r) for p, r in pairs], batch_size)
    scores = torch.cat([score_fn(collate_pairs([pairs[i] for i in c], pad, device)).float()
                        for c in chunks])
    order = torch.tensor([i for c in chunks for i in c], device=scores.device)
    return scores[torch.argsort(order)]


LOGIT_BUDGET = 2 ** 28  # logits one no-grad pass may hold: 1 GiB in float32


def rows_per_pass(longest, vocab_size, cap, budget=LOGIT_BUDGET):
    """How many rows of up to `longest` tokens one scoring pass takes: at most cap, and
    few enough that their logits (rows × longest × vocabulary) stay within budget. The
    world's small vocabulary never reaches it; GPT-2's 50,257 entries do at a few dozen
    long rows (128 rows of 300 tokens are 7.7 GB of float32 logits, and the log-softmax
    as much again)."""
    return max(1, min(cap, budget // max(1, longest * vocab_size)))


@torch.no_grad()
def sequence_kl(model, ref, pairs, pad, device, batch_size=64):
    """Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) over each response's tokens at
    temperature 1, for (prompt tokens, response tokens) pairs. The mean over responses
    sampled from π estimates KL(π‖π_ref)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i:i + batch_size], pad, device)
        start = max(1, b.shortest_prompt)
        logp, ref_logp = (response_logprobs(model, b.tokens, b.mask, start=start),
                          response_logprobs(ref, b.tokens, b.mask, start=start))
        out += (logp - ref_logp).sum(1).tolist()
    return out


def token_windows(data, starts, length, device):
    """Windows of length + 1 tokens of a token stream (a uint16 memmap of train.bin or
    val.bin) at the given starts: inputs and next-token targets, (B, length) each."""
    rows = np.stack([data[i:i + length + 1] for i in starts.tolist()]).astype(np.int64)
    xy = torch.from_numpy(rows).to(device)
    return xy[:, :-1], xy[:, 1:]


def ptx_windows(data, n, length, generator, device):
    """PPO-ptx's pretraining batch: n random windows of the token stream `data`, as
    inputs and next-token targets (B, length) each."""
    starts = torch.randint(len(data) - length - 1, (n,), generator=generator,
                           device=generator.device)
    return token_windows(data, starts, length, device)


def gold_figures(enc, tasks, responses):
    """The world's gold scorer on answers (token lists) to tasks, in order: each answer's
    gold score, correctness and preamble, as lists under the names the RL stages log.
    Logged beside the proxy to show what it hides, never optimised. {} without tasks (your
    own prompts have no gold scorer)."""
    if tasks is None:
        return {}
    grades = [world.grade(t, *decode_response(enc, r)) for t, r in zip(tasks, responses)]
    return {f"gold/{name}": [float(g[key]) for g in grades]
            for name, key in (("score", "gold"), ("correct", "correct"), ("preamble", "preamble"))}


def show_samples(enc, texts, responses, scores, end, n=3):
    """Print the first n answers of a rollout (token lists) beside their prompts' texts and
    scores (the master process only)."""
    for prompt, r, s in list(zip(texts, responses, scores))[:n]:
        text, ended = decode_response(enc, r, end)
        print0(f"    {prompt!r} -> {text!r}{'' if ended else ' (no end token)'}  score {s:+.2f}")


def verifiable_score(enc, tasks):
    """The verifiable reward: 1 for a correct final answer, 0 otherwise (the correctness
    part of the world's gold scorer; no reward model, nothing to hack but the checker).
    Returns score_fn(prompts, responses) for responses to the tasks, in order."""
    def score_fn(prompts, responses):
        return torch.tensor([float(world.grade(t, *decode_response(enc, r))["correct"])
                             for t, r in zip(tasks, responses)])
    return score_fn
