"""PPO-RLHF: the SFT model, trained to please the reward model while a per-token KL
penalty holds it near the frozen SFT model.

Four models: the policy (trained, starts as SFT), the reference (frozen SFT), the reward
model (frozen, from reward.py) and the value model (trained, starts as the reward model).
To fit a large model on one GPU, --value_head=shared puts the value head on the policy's
own trunk instead (one trained model, one loss: the policy's plus --vf_coef times the
value loss, as in Schulman et al. 2017, eq. 9), and --frozen_dtype=bf16 keeps the two
frozen models' weights in bf16 (docs/real-models.md works out the memory of each).
Each iteration runs the six steps below, numbered the same way in `rollout` and `main`:

  1. sample prompts; the policy answers with the KV cache at --temperature; a response
     stops at its first end token
  2. the reward model scores prompt + response (normalised as stored); a response that
     never ended scores --missing_end_penalty instead
  3. log-probs of each response token under policy (read from the logits each token was
     drawn from) and reference (a forward pass), logits divided by the same temperature;
     per-token reward −β·(log π − log π_ref), the score added on the last response token
  4. values of the value model; advantages by GAE(γ, λ) in a reversed loop; returns =
     advantages + values; advantages whitened
  5. --ppo_epochs passes over shuffled minibatches: clipped-ratio policy loss and clipped
     value loss, both means over response tokens only
  6. β stays fixed, or (--adaptive_kl) moves the measured KL toward --target_kl

With --ptx_coef=γ > 0 (PPO-ptx, Ouyang et al. 2022, eq. 2) every minibatch step also
descends γ times the next-token loss on a few windows of the pretraining corpus, so the
policy keeps what pretraining taught while the reward pulls it elsewhere (held-out
facts, which only the pretraining text states, are what PPO is most likely to forget).

The details follow Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"), Ouyang et al. 2022 (InstructGPT) and Huang et al. 2022, "The N
Implementation Details of RLHF with PPO". Dropout is off in all four models (eval mode).
The log also carries gold/score, gold/correct and gold/preamble: the embedded world's
gold scorer on the same rollouts. The policy never sees them; they show whether a rising
proxy reward (objective/score) is real progress or reward hacking.

    python ppo.py                            # reads out/sft and out/reward, writes out/ppo
    python ppo.py --kl_coef=0.02 --out_dir=out/ppo_b002
    python ppo.py --adaptive_kl=true --target_kl=2
    python ppo.py --ptx_coef=0.5                 # PPO-ptx: mix in the pretraining loss
    python ppo.py --device=cuda
    torchrun --standalone --nproc_per_node=2 ppo.py   # each rank its own rollouts and seed
    python ppo.py --resume=true
    python ppo.py --init_from=out/ppo --ref_from=out/sft --out_dir=out/ppo2   # a second round
    python ppo.py --init_from=out/sft-gpt2 --reward_from=out/rm-gpt2 --data=prompts.jsonl \\
        --out_dir=out/ppo-gpt2 --value_head=shared --frozen_dtype=bf16

Your own prompts: --data an RL prompt file ({"prompt": text or messages} a line,
formats.py) for a model fine-tuned from GPT-2, in HH's chat format with GPT-2's
end-of-text ending an answer, against a reward model of the same tokenizer (reward.py
--data). Without the world there is no gold scorer to log and no verifiable reward.
"""

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import checkpoint
import distributed
import formats
import optim
from batch import (drop_pad_columns, gold_figures, left_pad, ptx_windows, response_logprobs,
                   reward_scores, show_samples, verifiable_score)
from cli import UserError, parse_config, ranges, refuse_unused, user_errors
from distributed import print0
from logger import Logger
from model import IGNORE_INDEX, ScalarGPT, freeze, token_logprobs
from records import load_prompts, prompt_room, ptx_stream, stage_model
from reward_model import load_reward_model


@dataclass
class Config:
    data_dir: str = "data/world"      # folder written by data/prepare.py (prompts_train.jsonl)
    data: str = ""                    # your own RL prompts instead (formats.py), e.g. for GPT-2
    init_from: str = "out/sft"        # the SFT model: the policy's start and the frozen reference
    ref_from: str = ""                # the frozen reference, if not init_from (iterative rounds)
    reward_from: str = "out/reward"   # reward model; its first member also starts the value model
    reward: str = "model"             # model: the reward model; verifiable: 1 if right, else 0
    out_dir: str = "out/ppo"          # checkpoint and log go here
    iterations: int = 40              # rollout + update rounds (the score levels off by ~20)
    batch_size: int = 64              # rollouts per iteration, all processes together
    minibatch_size: int = 16          # rollouts per gradient step, all processes together
    ppo_epochs: int = 4               # passes over each batch of rollouts
    max_new_tokens: int = 32          # response length limit
    temperature: float = 1.0          # sampling temperature, also applied to the log-probs
    learning_rate: float = 3e-5       # policy
    value_lr: float = 1e-4            # value model
    weight_decay: float = 0.0         # AdamW decay (matrices only)
    grad_clip: float = 1.0            # clip each model's gradient norm (0 = off)
    kl_coef: float = 0.2              # β: per-token KL penalty weight (initial value if adaptive)
    adaptive_kl: bool = False         # adapt β toward target_kl (Ziegler et al. 2019)
    target_kl: float = 2.0            # adaptive: wanted KL per response, nats
    kl_horizon: int = 10000  # adaptive: β ← β·(1 + clip(KL/target − 1, ±0.2)·batch/horizon)
    gamma: float = 1.0                # discount
    lam: float = 0.95                 # GAE λ
    clip_range: float = 0.2           # policy ratio clip ε
    clip_range_value: float = 0.2     # value clip
    value_head: str = "separate"      # separate: a value model of its own; shared: policy trunk
    vf_coef: float = 0.1              # shared head: weight of the value loss in the one loss
    frozen_dtype: str = "fp32"        # fp32 or bf16: the reference's and reward model's weights
    missing_end_penalty: float = -3.0 # score of a response that never emitted the end token
    whiten_rewards: bool = False      # scale this process's rewards to unit variance before GAE
    entropy_coef: float = 0.0         # entropy bonus (0: entropy is only logged)
    ptx_coef: float = 0.0             # γ: weight of the pretraining loss (PPO-ptx; 0 = off)
    ptx_batch: int = 4                # pretraining windows per minibatch step, each process
    ptx_len: int = 128                # tokens per pretraining window (data_dir/train.bin)
    sample_interval: int = 20         # print a few responses every this many iterations
    log_interval: int = 1             # iterations between log lines
    ckpt_interval: int = 20           # iterations between checkpoints
    seed: int = 1337                  # each process samples from its own seed derived from this
    device: str = "auto"              # auto, cpu, cuda, cuda:N or mps
    compile: bool = False             # torch.compile the models' forwards and generation
    resume: bool = False              # continue from out_dir/ckpt.pt

    RANGES: ClassVar = ranges(
        at_least_1="iterations batch_size minibatch_size ppo_epochs max_new_tokens kl_horizon "
                   "log_interval ckpt_interval ptx_batch ptx_len",
        non_negative="value_lr weight_decay grad_clip kl_coef target_kl entropy_coef ptx_coef "
                     "temperature sample_interval vf_coef",
        positive="learning_rate clip_range clip_range_value", fraction="gamma lam")


# --- pure functions: masked statistics, GAE, the two losses, the KL controller ---------------


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, shift_mean=True, run=None):
    """(x − mean) / std over the masked entries (of every process, when run is DDP);
    shift_mean=False keeps the mean (for rewards, whose sign matters)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if run is not None and run.ddp:
        torch.distributed.all_reduce(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean ** 2).clamp(min=0) * n / (n - 1).clamp(min=1)  # unbiased
    out = (x - mean.float()) * torch.rsqrt(var.float() + 1e-8)
    if not shift_mean:
        out = out + mean.float()
    return out * mask


def per_token_rewards(logp, ref_logp, score, mask, beta):
    """−β·(log π − log π_ref) on every response token, plus the score on the last one.
    All (B, N) with mask (B, N) marking response tokens (a prefix of each row)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # index of each response's last token
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response
    tokens, from the last token back: δ_t = r_t + γ·V_{t+1} − V_t and
    A_t = δ_t + γλ·A_{t+1}, with V and A taken as 0 after the response's end.
    Returns (advantages, returns = advantages + values), 0 outside the mask."""
    rewards, values = rewards * mask, values * mask
    N = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv * mask[:, t]
        next_adv = advantages[:, t]  # 0 past the end: nothing flows back from padding
    return advantages, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip_range):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), negated for descent:
    mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.
    Returns (loss, clip fraction, approx KL ½(log ρ)², mean ratio)."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return loss, clipfrac, approx_kl, ratio_mean


def value_loss(values, old_values, returns, mask, clip_range):
    """½·max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, ±ε), mean over
    tokens (the value clipping of the PPO baselines). Returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).float(), mask).detach()


def adaptive_kl_step(beta, kl, target, n_rollouts, horizon):
    """Ziegler et al. 2019, §2.2: β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_rollouts / horizon)


def explained_variance(values, returns, mask):
    """1 − Var(R − V)/Var(R) over response tokens: 1 is a perfect value model, 0 no better
    than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r.clamp(min=1e-8)).item()


# --- the rollout: steps 1 to 4 ------------------------------------------------------------------


def response_values(value_model, tokens, attn, P):
    """V(state before each response token) (B, N): the value head read at the position
    that predicts that token."""
    return value_model(tokens, attn_mask=attn, keep_from=P - 1).float()[:, :-1]


class SharedValueHead(nn.Module):
    """--value_head=shared: the policy with a value head on its own final hidden states,
    so one trunk serves both. Called like GPT (so PPO-ptx and the DDP wrapper see one
    module), it also returns the values read at the same positions as the logits. The
    head starts at zero (V = 0): the policy's trunk, unlike the reward model's, has never
    been trained to predict a score."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        p = next(policy.parameters())
        self.head = nn.Linear(policy.config.n_embd, 1).to(device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, targets=None, *, attn_mask=None, logits_from=0):
        h = self.policy.hidden(idx, attn_mask=attn_mask, keep_from=logits_from)
        logits, values = self.policy.lm_head(h), self.head(h).squeeze(-1).float()
        loss = None
        if targets is not None:  # PPO-ptx's windows: the next-token loss alone (0·values
            # keeps the head in the graph, which DDP's gradient reduction expects)
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets[:, logits_from:].reshape(-1),
                ignore_index=IGNORE_INDEX) \
                + 0.0 * values.sum()
        return logits, loss, values


def policy_and_values(model, tokens, attn, P, temperature):
    """One forward pass of a SharedValueHead: the response tokens' log-probs, entropies
    and values, each (B, N), aligned as response_logprobs and response_values align them."""
    logits, _, values = model(tokens, attn_mask=attn, logits_from=P - 1)
    logp, entropy = token_logprobs(logits, tokens[:, P - 1:], temperature=temperature,
                                   entropy=True)
    return logp, entropy, values[:, :-1]


@torch.no_grad()
def rollout(policy, ref, value_model, score_fn, prompts, beta, cfg, tok, generator, device):
    """Steps 1-4 for one batch of prompts (token lists); score_fn(prompts, responses)
    gives each response's score; value_model None: policy is a SharedValueHead. Returns
    a dict of tensors."""
    shared = value_model is None
    lm = policy.policy if shared else policy
    # 1. generate; the mask keeps each response up to and including its first end token.
    # The policy's log-probs and entropies come from the logits the draw used (step 3)
    response, mask, *drawn = lm.generate(prompts, cfg.max_new_tokens,
                                         temperature=cfg.temperature, stop_token=tok.end,
                                         pad_token=tok.pad, generator=generator,
                                         compile=cfg.compile, logprobs=not shared)
    prompt_tokens, prompt_mask = left_pad(prompts, tok.pad, device)
    P = prompt_tokens.size(1)
    tokens, attn = torch.cat([prompt_tokens, response], 1), torch.cat([prompt_mask, mask], 1)
    mask = mask.float()
    ended = ((response == tok.end) & (mask > 0)).any(1)

    # 2. score, or the fixed penalty for a response that never ended
    responses = [row[m > 0].tolist() for row, m in zip(response, mask)]
    raw_score = score_fn(prompts, responses).to(device).float()
    scores = torch.where(ended, raw_score, torch.full_like(raw_score, cfg.missing_end_penalty))

    # 3. log-probs under policy (the generation's) and reference (a forward pass, the same
    # temperature); per-token rewards
    if shared:  # the values come out of a forward pass of the policy (step 4)
        logp, entropy, values = policy_and_values(policy, tokens, attn, P, cfg.temperature)
    else:
        logp, entropy = drawn
        values = response_values(value_model, tokens, attn, P)
    ref_logp = response_logprobs(ref, tokens, attn_mask=attn, start=P, temperature=cfg.temperature)
    logp, ref_logp = logp * mask, ref_logp * mask
    rewards, kl = per_token_rewards(logp, ref_logp, scores, mask, beta)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)

    # 4. values and GAE (the caller whitens the advantages, over every process)
    values = values * mask
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return dict(tokens=tokens, attn=attn, mask=mask, P=P, logp=logp, values=values, returns=returns,
                advantages=advantages, scores=scores, raw_scores=raw_score, ended=ended, kl=kl,
                entropy=entropy, rewards=rewards, responses=responses)


# --- step 5: the PPO update ----------------------------------------------------------------------


def ppo_update(policy, value_model, opt_policy, opt_value, batch, cfg, lr, value_lr, generator, run,
               guard=None, it=0, ptx_data=None):
    """--ppo_epochs passes over this rank's rollouts in shuffled minibatches; one optimizer
    step per minibatch for each model, skipped when its gradient is not finite (counted by
    `guard`, an optim.NonFiniteGuard). With ptx_data (the pretraining tokens, passed when
    --ptx_coef > 0) the policy's step also descends γ·(pretraining loss). value_model None:
    policy is a SharedValueHead, and one loss, policy + vf_coef·value, trains both (its
    optimizer's last group is the head, at value_lr). Returns the mean of each statistic."""
    guard = guard or optim.NonFiniteGuard()
    B, mb = batch["tokens"].size(0), cfg.minibatch_size // run.world_size
    stats = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator, device=generator.device).tolist()
        for start in range(0, B, mb):
            idx = torch.tensor(order[start:start + mb], device=batch["tokens"].device)
            # the minibatch's own width: the batch's longest prompt and answer may be elsewhere
            tokens, attn, mask, P = drop_pad_columns(batch["tokens"][idx], batch["attn"][idx],
                                                     batch["mask"][idx], batch["P"])
            old = {k: batch[k][idx, :mask.size(1)]  # the rollout's figures (π_old, V_old)
                   for k in ("logp", "advantages", "values", "returns")}
            # the policy: clipped surrogate (minus the entropy bonus), then PPO-ptx's term
            with run.autocast:
                if value_model is None:  # shared trunk: the value loss joins the same loss
                    logp, entropy, values = policy_and_values(policy, tokens, attn, P,
                                                              cfg.temperature)
                else:
                    logp, entropy = response_logprobs(policy, tokens, attn_mask=attn, start=P,
                                                      temperature=cfg.temperature, entropy=True)
                pg_loss, clipfrac, approx_kl, ratio = policy_loss(
                    logp, old["logp"], old["advantages"], mask, cfg.clip_range)
                ent = masked_mean(entropy, mask)
                # at entropy_coef 0 the entropy is only logged: kept out of the loss, so the
                # backward does not run through it for a gradient of zero
                loss = pg_loss - cfg.entropy_coef * ent if cfg.entropy_coef else pg_loss
                if value_model is None:
                    vf_loss, vf_clipfrac = value_loss(values, old["values"], old["returns"],
                                                      mask, cfg.clip_range_value)
                    loss = loss + cfg.vf_coef * vf_loss
                loss.backward()
            if ptx_data is not None:  # (main passes it only when --ptx_coef > 0)
                # its own forward and backward: the windows are longer than the rollouts
                with run.autocast:
                    ptx = policy(*ptx_windows(ptx_data, cfg.ptx_batch, cfg.ptx_len, generator,
                                              tokens.device))[1]
                    (cfg.ptx_coef * ptx).backward()
                stats.setdefault("loss/ptx", []).append(ptx.item())
            optim.set_lr(opt_policy, lr)
            if value_model is None:
                opt_policy.param_groups[-1]["lr"] = value_lr
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                       cfg.grad_clip or math.inf).item()
            if guard.ok(grad_norm, it, model="policy"):
                opt_policy.step()
            opt_policy.zero_grad(set_to_none=True)
            if value_model is not None:  # the value model: clipped value loss, its own step
                with run.autocast:
                    values = response_values(value_model, tokens, attn, P)
                    vf_loss, vf_clipfrac = value_loss(values, old["values"], old["returns"],
                                                      mask, cfg.clip_range_value)
                    vf_loss.backward()
                optim.set_lr(opt_value, value_lr)
                grad_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(),
                                                           cfg.grad_clip or math.inf).item()
                if guard.ok(grad_norm, it, model="value model"):
                    opt_value.step()
                opt_value.zero_grad(set_to_none=True)
            for k, v in (("loss/policy", pg_loss), ("loss/value", vf_loss),
                         ("policy/clipfrac", clipfrac), ("policy/approxkl", approx_kl),
                         ("policy/ratio", ratio), ("policy/entropy", ent),
                         ("value/clipfrac", vf_clipfrac)):
                stats.setdefault(k, []).append(v.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


# --- set-up and the loop -------------------------------------------------------------------------


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    local_batch = distributed.micro_batch_size(cfg.batch_size, 1, run)
    if (cfg.minibatch_size <= 0 or cfg.minibatch_size % run.world_size
            or local_batch % (cfg.minibatch_size // run.world_size)):
        raise UserError(f"--minibatch_size={cfg.minibatch_size} must split --batch_size="
                        f"{cfg.batch_size} evenly, and into {run.world_size} process(es)")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature={cfg.temperature}: PPO samples, so it must be > 0")
    if cfg.adaptive_kl and cfg.target_kl <= 0:
        raise UserError(f"--target_kl={cfg.target_kl} with --adaptive_kl=true: the controller "
                        f"divides by the target KL, which must be above 0")
    if cfg.adaptive_kl and cfg.kl_coef == 0:
        raise UserError("--kl_coef=0 with --adaptive_kl=true: the controller scales β by a "
                        "factor, so it would stay 0; start from a β above 0")
    if cfg.reward not in ("model", "verifiable"):
        raise UserError(f"--reward={cfg.reward}: expected model or verifiable")
    if cfg.value_head not in ("separate", "shared"):
        raise UserError(f"--value_head={cfg.value_head}: expected separate or shared")
    if cfg.frozen_dtype not in ("fp32", "bf16"):
        raise UserError(f"--frozen_dtype={cfg.frozen_dtype}: expected fp32 or bf16")
    # flags this run would ignore, refused rather than ignored without a word
    refuse_unused(cfg, ["target_kl", "kl_horizon"], "without --adaptive_kl=true",
                  not cfg.adaptive_kl)
    refuse_unused(cfg, ["vf_coef"], "with --value_head=separate", cfg.value_head == "separate")
    refuse_unused(cfg, ["reward_from"], "with --reward=verifiable", cfg.reward == "verifiable")
    refuse_unused(cfg, ["ptx_batch", "ptx_len"], "with --ptx_coef=0", cfg.ptx_coef == 0)
    formats.refuse_world_only(cfg)
    # a model fine-tuned from GPT-2 carries its tokenizer and chat format
    ref, enc, chat, carried = stage_model(cfg.init_from, "python sft.py",
                                          cfg.data_dir, run.device)
    tok = formats.rl_tokens(enc, chat)
    policy = copy.deepcopy(ref)
    if cfg.ref_from:  # a policy of an earlier round starts; the reference stays the SFT model
        ref, _ = checkpoint.load_model(os.path.join(cfg.ref_from, "ckpt.pt"), "python sft.py",
                                       enc, device=run.device)
    reward_model, rm_ckpt, value_model = None, {"config": None}, None
    if cfg.reward == "model":
        reward_model, rm_ckpt = load_reward_model(os.path.join(cfg.reward_from, "ckpt.pt"),
                                                  "python reward.py", enc, device=run.device)
        if cfg.value_head == "separate":
            value_model = ScalarGPT(reward_model.members[0].config).to(run.device)
            # (the gate is the reward's own)
            value_model.load_state_dict(reward_model.members[0].trunk_and_head())
        freeze(reward_model.members, cfg.frozen_dtype)
    elif cfg.value_head == "separate":  # no reward model: the SFT trunk with a zero head
        value_model = ScalarGPT.from_lm(ref)
    freeze(ref, cfg.frozen_dtype)
    lm = policy  # the language model alone: generation, the checkpoint
    if value_model is None:  # --value_head=shared: the head joins the policy
        policy = SharedValueHead(policy)
    for m in (policy, value_model):
        if m is not None:
            m.eval()  # dropout off in every model; gradients still flow through the trained ones
    room = prompt_room(lm.config.block_size, cfg.max_new_tokens)
    if cfg.data:  # your prompts: no tasks, so no gold scorer
        (texts, prompts), tasks = formats.rl_prompts(cfg.data, enc, chat, room), None
    else:
        texts, prompts, tasks = load_prompts(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                                             enc, room)
    ptx_data = ptx_stream(cfg, enc, lm.config.block_size)  # None when --ptx_coef=0

    opt_policy = lm.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95),
                                         run.device_type)
    if value_model is None:  # the shared head: a group of its own at value_lr, not decayed
        opt_policy.add_param_group({"params": list(policy.head.parameters()), "lr": cfg.value_lr,
                                    "weight_decay": 0.0})
        opt_value = None
    else:
        opt_value = value_model.configure_optimizers(cfg.weight_decay, cfg.value_lr, (0.9, 0.95),
                                                     run.device_type)
    beta, it = cfg.kl_coef, 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(cfg.out_dir, run, ("ppo",))  # this run's folder until it ends
    guard = optim.NonFiniteGuard(ckpt_path=ckpt_path)  # its counts resume with the run
    if cfg.resume:
        it, ckpt = checkpoint.resume(ckpt_path, "ppo", lm, opt_policy, guard=guard,
                                     same=dict(value_head=cfg.value_head, reward=cfg.reward))
        if value_model is None:
            policy.head.load_state_dict(ckpt["value_head"])
        else:
            value_model.load_state_dict(ckpt["value_model"])
            opt_value.load_state_dict(ckpt["value_optimizer"])
        beta = ckpt["kl_coef"]
    train_policy = distributed.wrap(policy, run, cfg.compile)
    train_value = None if value_model is None else distributed.wrap(value_model, run, cfg.compile)
    # the rollout's passes of the frozen reference and of the value model, compiled alike
    ref_forward, value_forward = (distributed.run_only(m, cfg.compile) for m in (ref, value_model))
    log = Logger(cfg.out_dir, cfg, cfg.iterations, cfg.log_interval, run.master, start_step=it)
    print0(f"PPO: {len(prompts)} prompts, {cfg.iterations} iterations of {cfg.batch_size} rollouts "
           f"({cfg.ppo_epochs} epochs x {cfg.batch_size // cfg.minibatch_size} minibatches), "
           f"β {beta:g}{' adaptive' if cfg.adaptive_kl else ''}, value head "
           f"{cfg.value_head}, frozen models in {cfg.frozen_dtype}, on {run.device} x "
           f"{run.world_size}")

    stop = distributed.StopSignal()
    values_state = lambda: (  # noqa: E731  (the head's optimizer state is opt_policy's)
        dict(value_head=policy.head.state_dict()) if value_model is None else
        dict(value_model=value_model.state_dict(), value_optimizer=opt_value.state_dict()))
    rm_score = None
    if reward_model is not None:  # every rollout of the batch scored in one forward pass
        def rm_score(prompts, responses):
            return reward_scores(reward_model, list(zip(prompts, responses)), tok.pad, run.device,
                                 len(prompts))
    while it < cfg.iterations:
        t0 = time.time()
        g = torch.Generator(device=run.device).manual_seed(
            distributed.iteration_seed(cfg.seed, run.rank, it))
        mine = distributed.rank_chunks(
            distributed.global_batch(len(prompts), it, cfg.batch_size, cfg.seed), run, 1)[0]
        # steps 1-4
        score_fn = rm_score or verifiable_score(enc, [tasks[i] for i in mine])
        with run.autocast:  # bf16 on CUDA as the update, so the first ratio is exactly 1
            batch = rollout(policy, ref_forward, value_forward, score_fn,
                            [prompts[i] for i in mine], beta, cfg, tok, g, run.device)
        batch["advantages"] = whiten(batch["advantages"], batch["mask"], run=run)
        n_tokens = batch["mask"].sum().item()
        t_rollout = time.time() - t0
        # the world's gold scorer on the same rollouts: logged to show what the proxy hides,
        # never optimised
        gold = gold_figures(enc, tasks and [tasks[i] for i in mine], batch["responses"])

        # 5. PPO epochs over minibatches (learning rates decay linearly to 0, as in Ziegler et al.)
        frac = 1.0 - it / cfg.iterations
        update = ppo_update(train_policy, train_value, opt_policy, opt_value, batch, cfg,
                            cfg.learning_rate * frac, cfg.value_lr * frac, g, run, guard, it,
                            ptx_data)
        t_update = time.time() - t0 - t_rollout

        # 6. the KL coefficient for the next iteration
        mean = lambda x: distributed.all_reduce_mean(x.float().mean().item(), run)  # noqa: E731
        kl = mean(batch["kl"].sum(1))
        metrics = {
            "objective/score": mean(batch["scores"]), "objective/kl": kl,
            "objective/non_score_reward": mean(-beta * batch["kl"].sum(1)),
            "objective/entropy": mean(batch["entropy"].mul(batch["mask"]).sum(1)
                                      / batch["mask"].sum(1)),
            "objective/beta": beta,
            **{k: distributed.all_reduce_mean(v, run) for k, v in update.items()},
            "value/explained_variance": distributed.all_reduce_mean(
                explained_variance(batch["values"], batch["returns"], batch["mask"]), run),
            "rollout/length": mean(batch["mask"].sum(1)), "rollout/ended": mean(batch["ended"]),
            **{k: mean(torch.tensor(v)) for k, v in gold.items()},
            "time/rollout_tok_per_s": distributed.all_reduce_mean(n_tokens / t_rollout, run)
                                      * run.world_size,
            "time/rollout_s": t_rollout, "time/update_s": t_update,
            **guard.logged(),
        }
        if cfg.adaptive_kl:
            beta = adaptive_kl_step(beta, kl, cfg.target_kl, cfg.batch_size, cfg.kl_horizon)
        it += 1
        shown = ("objective/score", "objective/kl", "objective/beta", "gold/score",
                 "policy/clipfrac", "value/explained_variance", "rollout/length")
        log.step(it - 1, int(n_tokens) * run.world_size, show=shown, **metrics)
        if run.master and cfg.sample_interval and (it % cfg.sample_interval == 0 or it == 1):
            show_samples(enc, [texts[i] for i in mine], batch["responses"],
                         batch["scores"].tolist(), tok.end)
        stop.checkpoint(run, it, it % cfg.ckpt_interval == 0 or it == cfg.iterations, ckpt_path,
                        lambda: checkpoint.save(ckpt_path, checkpoint.stage_checkpoint(
                            "ppo", lm, cfg, it, opt_policy, enc, guard, **values_state(),
                            kl_coef=beta, reward_model=rm_ckpt["config"],
                            **carried)))  # also on SIGTERM
    print0(f"done: checkpoint {ckpt_path}")
    lock.release()
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
