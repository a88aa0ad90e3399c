"""
A GPT language model in plain PyTorch, and what every model of the pipeline needs:

- GPT: decoder-only transformer; forward() returns logits for *every* position (or every
  one from `logits_from` on, to skip a prompt's), because reward models, PPO and DPO score
  whole sequences, not just the next token.
- ScalarGPT: the same trunk with one number per position (value model, reward trunk).
- GPT.generate(): batched sampling with a key/value cache and left padding
  (generation.py, below this file).
- token_logprobs() / token_entropy(): the one place log p(token) is computed, so PPO
  ratios, KL penalties and DPO all agree on exactly the same numbers.

Right padding needs no mask (causal attention hides later pads from real tokens); left
padding, used by generate, needs attn_mask (B, T) bool, True for real tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

import generation
from generation import KVCache, distinct_prefixes, entropy_of, scaled

IGNORE_INDEX = -100  # label value that losses skip


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence the position embedding covers
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # bias in Linear layers and LayerNorms
    gelu: str = "exact"  # the MLP's GELU: exact (erf), or tanh (GPT-2's approximation)
    ln_eps: float = 1e-5  # LayerNorm's epsilon (GPT-2's too)

    def __post_init__(self):
        if min(self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError(f"GPTConfig sizes must be >= 1: {self}")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"GPTConfig.gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"GPTConfig.n_head ({self.n_head})")


class SharedPrefix:
    """What GPT.shared_prefix_hidden gives hidden() in place of a KVCache: first the
    distinct prefixes' keys and values, kept as they are; then, once `which` (each row's
    prefix) is set, every row's own keys and values after its prefix's. No buffers and no
    writes in place: a training pass, whose gradients flow back through both."""

    def __init__(self):
        self.length, self.which = 0, None
        self.mask, self.keys, self.values = None, {}, {}

    def add_mask(self, attn_mask: Tensor) -> Tensor:
        if self.which is None:
            self.mask = attn_mask
            return attn_mask
        return torch.cat([self.mask[self.which], attn_mask], dim=1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.which is None:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        # index_select, not [which]: its backward sums the rows with index_add_, which on a
        # CPU is many times faster than the accumulating index_put_ of indexing's backward
        return (torch.cat([self.keys[layer].index_select(0, self.which), k], dim=2),
                torch.cat([self.values[layer].index_select(0, self.which), v], dim=2))

    def advance(self, n: int):
        self.length += n


def attention_mask(key_valid: Tensor, T: int) -> Tensor:
    """(B, S) key validity -> (B, 1, T, S) bool, True where a query may attend to a key.
    The T queries are the last T of the S positions (S > T when a cache holds the past)."""
    S = key_valid.size(1)
    q = torch.arange(S - T, S, device=key_valid.device)  # query positions, in key coordinates
    k = torch.arange(S, device=key_valid.device)
    allowed = (k[None, :] <= q[:, None]) & key_valid[:, None, :]  # causal and not a pad
    # every query may see itself: a pad query would otherwise have an empty row -> NaN
    allowed = allowed | (k[None, :] == q[:, None])
    return allowed[:, None]  # (B, 1, T, S), broadcast over heads


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer uses
        self.n_head = config.n_head
        self.dropout = config.dropout
        # query, key, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None,
                keep_from: int = 0) -> Tensor:
        """keep_from > 0: every column's keys and values, but queries (and the output) only
        from column keep_from on: (B, T − keep_from, C)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        if keep_from:
            q = q[:, keep_from:]
            if mask is None:  # still causal: the queries are the last T − keep_from keys
                mask = attention_mask(torch.ones(1, T, dtype=torch.bool, device=x.device),
                                      T - keep_from)
            else:
                mask = mask[:, :, keep_from:]
        q = q.view(B, T - keep_from, self.n_head, hs).transpose(1, 2)  # (B, nh, T', hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), S = past + T
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # fast path: plain causal attention, no mask tensor needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1 and dropout_p == 0.0:  # one query (a generation step), written out:
            # torch.compile fuses the scale, mask and softmax into one kernel around two
            # small matrix products, where SDPA stays one opaque call (as fast in eager)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, 1, S)
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T - keep_from, C)  # heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="none" if config.gelu == "exact" else "tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None,
                keep_from: int = 0) -> Tensor:
        """keep_from > 0: only the columns from keep_from on come out (their attention still
        reads every column's keys and values)."""
        x = (x[:, keep_from:] if keep_from else x) + self.attn(self.ln_1(x), mask, cache,
                                                               keep_from)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.__post_init__()  # re-check, in case the config was edited after creation
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection share one matrix
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # residual projections are scaled down so the residual stream's variance does not
        # grow with depth (GPT-2 paper)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Tied weights count once. With non_embedding, the position
        embedding is left out; token embeddings stay in because they are also the lm_head."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length seq_len.

        PaLM paper, appendix B: 6N for the matmuls with the N weights (2 forward, 4 backward)
        plus 12*L*H*Q*T for attention scores and weighted sums (L layers, H heads, head size Q,
        sequence length T). Multiply by tokens/second to get achieved FLOP/s."""
        cfg = self.config
        N = self.num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len
        return float(6 * N + 12 * L * H * Q * T)

    def hidden(self, idx: Tensor, *, attn_mask: Tensor | None = None, pos: Tensor | None = None,
               cache: KVCache | None = None, keep_from: int = 0) -> Tensor:
        """Run the trunk: (B, T) token ids -> (B, T, C) final-LayerNormed hidden states.

        attn_mask (B, T) bool, True for real tokens: pad keys are hidden from every query and
        positions default to the count of real tokens before (so left padding does not shift
        them). cache: keys/values of earlier positions; the new ones are appended.
        keep_from: return only the columns from keep_from on, (B, T − keep_from, C). The
        last block then runs its queries, output projection and MLP on those columns
        alone: nothing after it reads the others (every earlier block still runs every
        column, whose keys and values the kept ones attend to). The same figures as
        hidden(idx)[:, keep_from:], to float rounding.
        """
        B, T = idx.size()
        if not 0 <= keep_from < T:
            raise ValueError(f"keep_from={keep_from} must be in [0, {T}) for {T} columns")
        S = T if cache is None else cache.length + T  # number of keys attended over
        if S > self.config.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds block_size {self.config.block_size}")
        if cache is None and attn_mask is None:
            mask = None  # plain causal attention (SDPA's is_causal fast path)
            if pos is None:
                pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            if attn_mask is None:
                attn_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            key_valid = attn_mask if cache is None else cache.add_mask(attn_mask)  # (B, S)
            mask = attention_mask(key_valid, T)  # (B, 1, T, S)
            if pos is None:
                # position = number of real tokens before this one; pads get 0
                pos = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, S - T:]  # (B, T)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, keep_from if i == last else 0)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                attn_mask: Tensor | None = None, pos: Tensor | None = None,
                cache: KVCache | None = None, logits_from: int = 0,
                share_prefix: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, T) ids -> (logits (B, T − logits_from, V), mean cross-entropy over targets !=
        IGNORE_INDEX or None). targets[:, t] is the token that should follow position t.
        logits_from > 0 skips the vocabulary projection of the first positions (a prompt
        whose next-token probabilities nobody reads); targets are cut to match.
        share_prefix=True (with logits_from > 0): rows whose first logits_from + 1 columns
        are the same run those columns once (shared_prefix_hidden)."""
        if share_prefix and 0 < logits_from < idx.size(1) - 1 and cache is None and pos is None:
            h = self.shared_prefix_hidden(idx, attn_mask, logits_from + 1)
        else:
            h = self.hidden(idx, attn_mask=attn_mask, pos=pos, cache=cache,
                            keep_from=logits_from)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            targets = targets[:, logits_from:]
            # float32: low-precision log-softmax over a large vocabulary loses accuracy
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def shared_prefix_hidden(self, idx: Tensor, attn_mask: Tensor | None, P: int) -> Tensor:
        """hidden(idx, attn_mask)[:, P − 1:], with the first P columns run once for each
        distinct prefix (its tokens and mask) instead of once a row: GRPO's answers to one
        prompt, DPO's chosen and rejected answer. The distinct prefixes run first and keep
        their keys and values (SharedPrefix); then each row runs its own columns over its
        prefix's, and gradients reach a shared prefix summed over its rows. The same
        figures as without sharing, to float rounding, for a fraction of the prefix's
        arithmetic."""
        valid = torch.ones_like(idx, dtype=torch.bool) if attn_mask is None else attn_mask
        found = distinct_prefixes(idx, valid, P)
        if found is None:  # nothing shared: the plain forward
            return self.hidden(idx, attn_mask=attn_mask, keep_from=P - 1)
        one_row, which = found
        shared = SharedPrefix()
        h_prefix = self.hidden(idx[one_row, :P], attn_mask=valid[one_row, :P], cache=shared,
                               keep_from=P - 1)  # (distinct prefixes, 1, C)
        shared.which = which  # from here on every row takes its prefix's keys and values
        h_rest = self.hidden(idx[:, P:], attn_mask=valid[:, P:], cache=shared)
        return torch.cat([h_prefix.index_select(0, which), h_rest], dim=1)

    def decode(self, tok: Tensor, cache: KVCache) -> Tensor:
        """One generation step: each row's newest token (B,), stored at the position
        cache.next_slots() reserved -> the logits of the token after it (B, V). Attention runs
        over the cache's whole buffers, the unfilled positions masked, so every step has the
        same shapes and one torch.compile serves them all (generate(compile=True)). The
        logits are those of a forward pass over the whole sequence, to float rounding."""
        cache.key_mask.index_fill_(1, cache.slot, True)  # the newest token is a real one
        pos = cache.key_mask.sum(dim=1) - 1  # real tokens before the newest one
        x = self.transformer.drop(self.transformer.wte(tok) + self.transformer.wpe(pos))
        mask = cache.key_mask[:, None, None, :]  # (B, 1, 1, S): each row's real tokens
        x = x[:, None]  # (B, 1, C)
        for block in self.transformer.h:
            x = block(x, mask, cache)
        cache.slot = cache.slot + 1  # the next step's position
        return self.lm_head(self.transformer.ln_f(x[:, 0]))

    generate = generation.generate  # batched sampling with a KV cache (generation.py)

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay only on matrices and embeddings (dim >= 2); biases and
        LayerNorm gains are not decayed (shrinking them toward 0 only hurts). Fused on a CPU
        and a GPU: one kernel updates each tensor, instead of about ten small operations a
        tensor from Python (RESULTS.md, Benchmarks, times both)."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        # named_parameters() yields a tied tensor once; check nothing is lost or doubled
        ids = [id(p) for p in decay + no_decay]
        assert len(ids) == len(set(ids)) == len(params), "a parameter is in 0 or 2 groups"
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type in ("cpu", "cuda"))

def freeze(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """Make a model that is only ever run, never trained (PPO's and GRPO's reference and
    reward model): no gradients, eval mode (no dropout), and with dtype "bf16" its weights
    cast to bfloat16, 2 bytes a parameter instead of 4 (the callers cast logits and scores
    back to float32 before any log-softmax or sum). Returns the model."""
    model.requires_grad_(False).eval()
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def token_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor | None = None,
                   temperature: float = 1.0, entropy: bool = False):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) as (B, T-1) float32.

    logits (B, T, V) come from running the model on tokens (B, T); position t predicts
    token t+1, hence the shift. mask (B, T) bool: entries whose *predicted* token is
    masked (mask[:, 1:] False) are set to 0. entropy=True: also token_entropy's (B, T-1),
    from the same log-softmax (one pass over the vocabulary instead of two).
    """
    logp = F.log_softmax(scaled(logits[:, :-1], temperature), dim=-1)  # (B, T-1, V)
    out = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if mask is not None:
        out = out.masked_fill(~mask[:, 1:], 0.0)
    return (out, entropy_of(logp, mask)) if entropy else out


def token_entropy(logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Entropy of each next-token distribution, (B, T-1) float32, aligned like token_logprobs."""
    return entropy_of(F.log_softmax(scaled(logits[:, :-1], temperature), dim=-1), mask)


class ScalarGPT(GPT):
    """GPT trunk + one scalar per position: PPO's value model, and the trunk of the
    reward model (reward_model.RewardMember).

    The tied lm_head is kept (it costs no parameters), so a language-model state dict
    loads with strict=False and only the new head is missing."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, 1)
        # zero init: a fresh reward model has no random preference and a fresh value head
        # predicts a neutral 0. The weight still gets gradient at once (hidden states are
        # non-zero), and the trunk does from the next step on.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, idx: Tensor, *, attn_mask: Tensor | None = None,
                keep_from: int = 0) -> Tensor:
        """(B, T) ids -> (B, T − keep_from) scalar per position, from column keep_from on."""
        return self.score(self.hidden(idx, attn_mask=attn_mask, keep_from=keep_from)).squeeze(-1)

    @classmethod
    def from_lm(cls, gpt: GPT, **kwargs) -> "ScalarGPT":
        """A model of this class whose trunk is a copy of gpt's weights (same device and
        dtype); the modules GPT does not have keep their initial values."""
        p = next(gpt.parameters())
        model = cls(gpt.config, **kwargs).to(device=p.device, dtype=p.dtype)
        missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
        assert set(missing) == set(model.state_dict()) - set(gpt.state_dict()) and not unexpected
        return model
