"""
Generation: what GPT.generate runs, below the model (this file needs torch alone).

- generate(): batched sampling from a prompt list, left-padded, with a key/value cache,
  rows that end leaving the batch; GPT.generate is this function.
- KVCache: the keys and values of the tokens already processed, written in place.
- decode_steps(): the steps after the prompt pass, each a GPT.decode and a draw; compiled
  on request (compiled_generation), several steps a call on a CPU.
- sample_next_token(): the draw, temperature, top-k and top-p, from given uniform numbers.
- distinct_prefixes(): the rows that share a prompt, run once by the prompt pass and by
  GPT.shared_prefix_hidden.
- scaled(), entropy_of(): the temperature and the entropy, the same for a generation
  step's token_scores() as for model.token_logprobs over a forward pass.
"""

import functools

import torch
from torch import Tensor
from torch.nn import functional as F


class KVCache:
    """Keys and values of the tokens already processed, for every layer, so a generation
    step feeds only the newest token instead of recomputing the prefix. Buffers are
    allocated once at full length and written in place: no step copies the past."""

    def __init__(self, n_layer: int, batch_size: int, max_len: int, device):
        self.max_len = max_len
        self.length = 0  # positions filled so far (the same for every row)
        # (B, nh, max_len, hs) per layer, allocated on first write so the dtype follows k/v
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        # True where the stored position is a real token (False for left padding and for
        # positions not yet filled)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # set by next_slots(), moved on by each GPT.decode: the position the next generation
        # step writes, as a tensor, so the steps' shapes are those of the whole buffers
        self.slot: Tensor | None = None

    def add_mask(self, attn_mask: Tensor) -> Tensor:
        """Record validity of the T new positions; return the mask of all keys (B, length+T)."""
        end = self.length + attn_mask.size(1)
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions > max_len {self.max_len}")
        self.key_mask[:, self.length:end] = attn_mask
        return self.key_mask[:, :end]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v (B, nh, T, hs) of one layer; return all keys/values so far."""
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.values[layer] = v.new_zeros(B, nh, self.max_len, hs)
        if self.slot is not None:  # one new token: keys and values of every position
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int):  # called once all layers have stored the n new positions
        self.length += n

    def next_slots(self, n: int = 1):
        """Before n generation steps (GPT.decode each): the next n positions will hold real
        tokens of every row. `slot` is the first of them, as a tensor, so a step's shapes
        are those of the whole buffers, the same at every step; each GPT.decode marks its
        position, update() writes it there, and the step moves `slot` on by one."""
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache is full: {self.length + n} positions > max_len "
                             f"{self.max_len}")
        # filled on the device: torch.tensor([...], device=...) would copy from the host
        # and, on a GPU, wait for every queued kernel first, once a call
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.key_mask.device)
        self.length += n

    def keep(self, rows: Tensor):
        """Keep only these batch rows (indices into the current rows), in this order:
        generation drops the answers that have ended, so later steps skip them."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]
        self.key_mask = self.key_mask[rows]


def distinct_prefixes(idx: Tensor, valid: Tensor, P: int) -> tuple[Tensor, Tensor] | None:
    """Rows of (B, T) ids whose first P columns (tokens and mask) are the same: (a row of
    each distinct prefix, each row's prefix as an index into those), or None when no two
    rows share one. GPT.shared_prefix_hidden and generate's prompt pass use it."""
    prefix = torch.where(valid[:, :P], idx[:, :P], -1)  # pads alike whatever their id
    distinct, which = torch.unique(prefix, dim=0, return_inverse=True)
    if distinct.size(0) == idx.size(0):
        return None
    one_row = torch.empty(distinct.size(0), dtype=torch.long, device=idx.device)
    one_row.scatter_(0, which, torch.arange(idx.size(0), device=idx.device))
    return one_row, which


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None,
                      u: Tensor | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids. One uniform number per row from the generator, so
    callers with equally seeded generators consume random numbers identically; or u, the
    (B, 1) float64 uniform numbers to use instead."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of better tokens
        drop_sorted = mass_before >= top_p  # the top token has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    # inverse-CDF sampling: one uniform number per row, placed on the running sum of the
    # probabilities (float64, so the sum stays exact enough); token i is drawn when
    # c[i-1] <= u < c[i], probability p[i]. Ten times cheaper on a CPU than
    # torch.multinomial, which draws one exponential number per vocabulary entry.
    cdf = F.softmax(logits, dim=-1).double().cumsum(dim=-1)  # (B, V)
    if u is None:
        u = torch.rand(logits.size(0), 1, generator=generator, device=logits.device,
                       dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(
        max=logits.size(-1) - 1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_token: int | None = None,
             pad_token: int = 0, generator: torch.Generator | None = None,
             use_cache: bool = True, compile: bool = False,
             logprobs: bool = False) -> tuple[Tensor, ...]:
    """Continue each prompt by up to max_new_tokens tokens (GPT.generate: model is a GPT).

    Prompts are left-padded into one batch, so every row's next token is in the last
    column; the attention mask makes each row's result equal to running it alone.
    temperature 0 is greedy; top_k (0 = off) and top_p (1.0 = off) filter before sampling.
    A generator must live on the model's device. Runs in eval mode, then restores the mode.
    Rows that have emitted stop_token leave the batch (DROP_ENDED_AT), so the steps after
    them run on the rows still going; every answer is the same as with them kept in.
    Returns tokens (B, N), N <= max_new_tokens the steps run, and mask (B, N) bool: True for
    generated tokens up to and including stop_token; later positions hold pad_token.
    use_cache=False recomputes the whole sequence every step (the reference path).
    compile=True runs the prompt pass and the steps after it through torch.compile
    (compiled_generation): the eager path's tokens (to float rounding), in less time per
    step once compiled (the first calls compile).
    logprobs=True (temperature > 0): also log π(token) of each generated token and the
    entropy of the distribution it was drawn from, (B, N) float32 each, 0 outside the mask,
    read from the logits the draw used, divided by the temperature, before top-k and top-p
    (the policy's log-probs PPO's ratio needs, without a forward pass of its own; equal
    to those of a forward pass over the whole sequence, to float rounding).
    """
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the "
                         f"context of {model.config.block_size} tokens (block_size)")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    if logprobs and temperature == 0:
        raise ValueError("logprobs=True needs temperature > 0 (greedy draws no distribution)")
    for name, token in (("stop_token", stop_token), ("pad_token", pad_token)):
        if token is not None and not isinstance(token, int):  # anything else never matches
            raise TypeError(f"{name} must be a token id (int) or None, got {type(token).__name__}")
    device = model.lm_head.weight.device
    B, total = len(prompts), P + max_new_tokens
    # one buffer for prompt + generated tokens, left-padded prompts; built on the host
    # and copied once (a copy to a GPU waits for the GPU: once, not once a prompt)
    seq = torch.full((B, total), pad_token, dtype=torch.long)
    seq_mask = torch.ones(B, total, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seq[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        seq_mask[i, :P - len(p)] = False
    # a prompt asked for several answers (GRPO's groups) goes through the prompt pass
    # once: the cache holds the distinct prompts, then each row takes its prompt's keys
    # and values (found on the host, where the batch is built: no wait for a GPU)
    shared = distinct_prefixes(seq, seq_mask, P) if use_cache else None
    seq, seq_mask = seq.to(device), seq_mask.to(device)
    if shared is not None:
        first, prompt_of = (x.to(device) for x in shared)
    gen_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    # logprobs=True: each generated token's log-probability and its step's entropy
    scored = torch.zeros(B, max_new_tokens, 2, device=device) if logprobs else None
    # the rows still being answered (all of them: a slice, which copies nothing; later
    # their indices into the batch), and which of them have emitted stop_token
    rows: slice | Tensor = slice(None)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = (KVCache(model.config.n_layer, B if shared is None else len(first), total, device)
             if use_cache else None)
    # compiled: the prompt pass and the steps after it through torch.compile, several
    # steps a call where that pays (STEPS_PER_CALL); eager: one step a call
    prompt_pass, steps = (compiled_generation(device.type, type(model)) if compile
                          else (type(model).hidden, decode_steps))
    per_call = STEPS_PER_CALL.get(device.type, 1) if compile else 1

    was_training = model.training
    model.eval()
    try:
        n = since_check = 0  # steps run; steps since the stop flags were last read
        while n < max_new_tokens:
            end = P + n  # tokens known so far
            # steps this time round: per_call after the prompt pass, one near the end
            k = per_call if cache is not None and 0 < n <= max_new_tokens - per_call else 1
            # one uniform number a step for every row of the batch, ended or not, so a
            # row's answer does not depend on when the others end or are dropped
            u = None if temperature == 0 else torch.rand(
                k, B, 1, generator=generator, device=device, dtype=torch.float64)[:, rows]
            if cache is not None and n > 0:  # the newest token only, the rest cached
                cache.next_slots(k)
                tok, live, finished, sc = steps(model, seq[rows, end - 1], cache, k, u,
                                                finished, temperature, top_k, top_p,
                                                stop_token, pad_token, logprobs)
            else:
                if cache is not None:  # the distinct prompts into the cache
                    distinct = slice(None) if shared is None else first
                    h = prompt_pass(model, seq[distinct, :end], attn_mask=seq_mask[distinct, :end],
                                    cache=cache, keep_from=end - 1)  # only the last is read
                    logits = model.lm_head(h[:, -1])
                    if shared is not None:  # every row: its prompt's keys, values, logits
                        cache.keep(prompt_of)
                        logits = logits[prompt_of]
                else:  # everything again, without a cache
                    h = model.hidden(seq[rows, :end], attn_mask=seq_mask[rows, :end],
                                     keep_from=end - 1)
                    logits = model.lm_head(h[:, -1])
                drawn = sample_next_token(logits, temperature, top_k, top_p,
                                          u=None if u is None else u[0])
                sc = token_scores(logits, drawn, temperature)[:, None] if logprobs else None
                tok, live, finished = ended(drawn, finished, stop_token, pad_token)
                tok, live = tok[:, None], live[:, None]
            seq[rows, end:end + k] = tok
            gen_mask[rows, n:n + k] = live
            if logprobs:
                scored[rows, n:n + k] = sc
            n, since_check = n + k, since_check + k
            if stop_token is None or since_check < STOP_CHECK_EVERY.get(device.type, 1):
                continue
            since_check = 0
            # Reading the flags makes the host wait for the device, so a GPU looks only
            # every few steps (the steps between emit padding only, cut below); a CPU
            # has nothing to wait for. Every row has ended: stop. Enough have
            # (DROP_ENDED_AT): drop them, so that later steps compute only the rows
            # still going.
            going = (~finished).nonzero().squeeze(1)
            if going.numel() == 0:
                break
            if going.numel() <= DROP_ENDED_AT * finished.numel():
                rows = going if isinstance(rows, slice) else rows[going]
                finished = finished[going]
                if cache is not None:
                    cache.keep(going)
    finally:
        model.train(was_training)
    n = int(gen_mask[:, :n].any(dim=0).sum())  # the steps that gave some row a token
    if not logprobs:
        return seq[:, P:P + n], gen_mask[:, :n]
    scored = scored[:, :n] * gen_mask[:, :n, None]
    return seq[:, P:P + n], gen_mask[:, :n], scored[..., 0], scored[..., 1]


def token_scores(logits: Tensor, drawn: Tensor, temperature: float) -> Tensor:
    """(B, V) logits and the (B,) tokens drawn from them -> (B, 2) float32: log p(drawn)
    and the entropy, under softmax(logits / temperature) (no top-k or top-p), as
    model.token_logprobs and model.token_entropy compute them from a forward pass."""
    logp = F.log_softmax(scaled(logits, temperature), dim=-1)
    return torch.stack([logp.gather(-1, drawn[:, None]).squeeze(-1), entropy_of(logp, None)],
                       dim=-1)


def scaled(logits: Tensor, temperature: float) -> Tensor:
    """float32 logits divided by the temperature; at temperature 1 no division runs (it
    would be a full pass over a (B, T, V) tensor for nothing)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def entropy_of(logp: Tensor, mask: Tensor | None) -> Tensor:
    """(..., V) log-probabilities -> (...) entropies; with mask (B, T) over (B, T-1, V)
    log-probabilities (token_logprobs' alignment), 0 where mask[:, 1:] is False."""
    out = -(logp.exp() * logp).sum(dim=-1)
    if mask is not None:
        out = out.masked_fill(~mask[:, 1:], 0.0)
    return out


def ended(tok: Tensor, finished: Tensor, stop_token: int | None,
          pad_token: int) -> tuple[Tensor, Tensor, Tensor]:
    """One step's drawn tokens (B,) -> the tokens kept (padding in rows that had already
    ended), which of them belong to an answer (B,) bool, and the rows ended after it."""
    live = ~finished
    tok = tok.masked_fill(finished, pad_token)
    if stop_token is not None:
        finished = finished | (tok == stop_token)
    return tok, live, finished


def decode_steps(model, tok: Tensor, cache: KVCache, k: int, u: Tensor | None,
                 finished: Tensor, temperature: float, top_k: int, top_p: float,
                 stop_token: int | None, pad_token: int, logprobs: bool = False,
                 decode=None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """k generation steps after the first, in the k positions cache.next_slots(k) reserved:
    each GPT.decode (or the given, compiled, form of it), then sample_next_token with that
    step's uniform numbers u[i] (u: (k, B, 1), None when greedy), then ended(). (B,) newest
    tokens -> tokens (B, k), which of them belong to an answer (B, k), the rows ended, and
    with logprobs each drawn token's token_scores (B, k, 2) (else None)."""
    decode = decode or type(model).decode
    toks, lives, scores = [], [], []
    for i in range(k):
        logits = decode(model, tok, cache)
        drawn = sample_next_token(logits, temperature, top_k, top_p,
                                  u=None if u is None else u[i])
        if logprobs:
            scores.append(token_scores(logits, drawn, temperature))
        tok, live, finished = ended(drawn, finished, stop_token, pad_token)
        toks.append(tok)
        lives.append(live)
    return (torch.stack(toks, dim=1), torch.stack(lives, dim=1), finished,
            torch.stack(scores, dim=1) if logprobs else None)


@functools.cache
def compiled_generation(device_type: str, cls: type):
    """generate(compile=True)'s prompt pass and steps: cls.hidden and decode_steps through
    torch.compile, one compilation for every model of the same architecture and every
    batch size and prompt length (dynamic shapes), and one for each count of steps a call.
    On a CPU the compiled code fuses the small operations around the matrix products, and
    its C++ wrapper calls the kernels in turn without returning to Python: a generation
    step at a small batch is mostly that per-call cost, not arithmetic, so a call runs
    several steps (STEPS_PER_CALL). Needs a C++ compiler.
    On a GPU only GPT.decode is compiled; the prompt pass and the draw run as they are:
    there inductor failed to generate the draw's float64 running sum over GPT-2's
    50304-token vocabulary (torch 2.11, an H200), and the prompt pass, a few large kernels,
    has not been measured compiled."""
    if device_type == "cpu":
        options = {"cpp_wrapper": True}
        return (torch.compile(cls.hidden, dynamic=True, options=options),
                torch.compile(decode_steps, dynamic=True, options=options))
    return cls.hidden, functools.partial(decode_steps,
                                         decode=torch.compile(cls.decode, dynamic=True))


# generation steps one compiled call runs, by device type (generate(compile=True)); each
# count is compiled apart, so a call's last few steps run one at a time. Eager: one.
STEPS_PER_CALL = {"cpu": 4}
# generation steps between checks that every row has emitted its stop token, by device
# type: each check waits for the device to finish the step before the host goes on
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 8}
# generation drops the rows that have ended once the rows still going are this share of
# the batch or less (each drop copies the cache; 0 never drops)
DROP_ENDED_AT = 0.75
