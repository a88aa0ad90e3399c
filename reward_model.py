"""The reward model as reward.py trains it and PPO, eval and the labelers load it.

A member is the SFT trunk with a scalar head (model.ScalarGPT) and, by default, the
trunk's own gated log-likelihood of the response added to it:

    r(x, y) = head(h_last) + Σ_t gate(h_{t−1})·log p(y_t | x, y_<t)

read at the last token (or averaged over the response, pooling "mean"). The reward
model is one or more members, each normalised by its stored gain and bias (mean 0,
std 1 on SFT samples), combined by their mean or, more cautiously, their minimum.
docs/reward-model.md says why the likelihood term is there.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from batch import Batch, response_mask
from checkpoint import check_tokenizer, load
from cli import UserError
from model import GPTConfig, ScalarGPT, token_logprobs


class RewardMember(ScalarGPT):
    """ScalarGPT + (likelihood=True) a learned gate on the trunk's log-likelihood of
    each response token, summed along the response: value_t = head(h_t) +
    Σ_{s ≤ t, s in the response} gate(h_{s−1})·log p(y_s | y_<s). The gate decides which
    tokens' likelihood counts (the answer, not the preamble). Compare DPO's implicit
    reward β·log π(y|x)/π_ref(y|x) (Rafailov et al. 2023), also made of the policy's own
    log-likelihood."""

    def __init__(self, config: GPTConfig, likelihood: bool = False):
        super().__init__(config)
        self.gate = None
        if likelihood:
            # starts as a constant weight: 0.3 × the response's log-likelihood
            self.gate = nn.Linear(config.n_embd, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 0.3)

    def forward(self, idx: Tensor, *, attn_mask: Tensor | None = None,
                prompt_lengths: Tensor | None = None, shortest: int | None = None) -> Tensor:
        """(B, T) ids -> (B, T) float scalar per position. prompt_lengths (B,) say where
        each response starts (right padding is harmless: a pad position only adds to
        values after the sequence's last token); the likelihood term needs them. Given
        them, the positions before the shortest prompt's last token are not computed
        (they hold 0; no score reads them), and rows that begin with the same prompt (a
        ranking's answers) run it once (GPT.shared_prefix_hidden). shortest: the shortest
        prompt's length when the caller has it on the host (Batch.shortest_prompt), so
        the model need not read it from prompt_lengths."""
        if prompt_lengths is None:
            if self.gate is not None:
                raise ValueError("a reward model with the likelihood term needs prompt_lengths")
            return super().forward(idx, attn_mask=attn_mask)
        T = idx.size(1)
        if shortest is None:
            shortest = int(prompt_lengths.min())
        start = max(0, shortest - 1)  # the first position a score reads
        h = (self.shared_prefix_hidden(idx, attn_mask, start + 1) if 0 < start < T - 1
             else self.hidden(idx, attn_mask=attn_mask, keep_from=start))  # (B, T - start, C)
        values = self.score(h).squeeze(-1)  # (B, T - start)
        if self.gate is not None:
            logp = token_logprobs(self.lm_head(h), idx[:, start:],
                                  response_mask(T, prompt_lengths)[:, start:])  # (B, T-start-1)
            term = (self.gate(h[:, :-1]).squeeze(-1).float() * logp).cumsum(1)
            values = values.float() + F.pad(term, (1, 0))  # position t: the sum up to token t
        return F.pad(values, (start, 0))

    def trunk_and_head(self) -> dict:
        """The state dict without the likelihood gate: what PPO's value model starts from."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("gate.")}


def pool_scores(values: Tensor, lengths: Tensor, prompt_lengths: Tensor,
                pooling: str = "last") -> Tensor:
    """(B, T) per-position scalars of right-padded prompt+response rows -> (B,).
    "last": the value at the last real token (the end token when the response ended);
    "mean": the mean over the response's tokens."""
    if pooling == "last":
        return values.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    if pooling == "mean":
        m = response_mask(values.size(1), prompt_lengths, lengths)
        return (values * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


def member_scores(member, batch: Batch, pooling: str) -> Tensor:
    """One member's raw (unnormalised) score of each row of a Batch, (B,) float32."""
    values = member(batch.tokens, prompt_lengths=batch.prompt_lengths,
                    shortest=batch.shortest_prompt).float()
    return pool_scores(values, batch.lengths, batch.prompt_lengths, pooling)


class RewardModel(nn.Module):
    """Members, each normalised by its (gain, bias), combined by mean or min. Called on
    a Batch, returns (B,) rewards. Gradients flow; callers that only score wrap the call
    in torch.no_grad (batch.reward_scores does)."""

    def __init__(self, members: list, norms: list, pooling: str = "last", reduce: str = "mean"):
        super().__init__()
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
        self.members = nn.ModuleList(members)
        self.register_buffer("norms",
                             torch.tensor(norms, dtype=torch.float32).reshape(-1, 2))  # (M, 2)
        self.pooling, self.reduce = pooling, reduce

    def forward(self, batch: Batch) -> Tensor:
        raw = torch.stack([member_scores(m, batch, self.pooling) for m in self.members])  # (M, B)
        scores = raw * self.norms[:, :1] + self.norms[:, 1:]
        return scores.mean(0) if self.reduce == "mean" else scores.min(0).values


def load_reward_model(path, made_by, enc, device="cpu", reduce=None):
    """The reward model written by reward.py: its members, their normalisation, pooling
    and (unless overridden) how members are combined. Returns (RewardModel, ckpt), in
    eval mode."""
    ckpt = load(path, made_by)
    if not isinstance(ckpt, dict) or ckpt.get("stage") != "reward" or not ckpt.get("members"):
        raise UserError(f"{path}: not a finished reward-model checkpoint "
                        f"(stage {ckpt.get('stage')!r}): run `{made_by}`")
    check_tokenizer(path, ckpt, enc)
    members = []
    for sd in ckpt["members"]:
        m = RewardMember(GPTConfig(**ckpt["model_config"]),
                         bool(ckpt["config"].get("likelihood", False)))
        m.load_state_dict(sd)
        members.append(m)
    rm = RewardModel(members, ckpt["norms"], ckpt["config"]["pooling"],
                     reduce or ckpt["config"]["reduce"])
    return rm.to(device).eval(), ckpt
