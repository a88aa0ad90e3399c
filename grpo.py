"""GRPO and its critic-free kin: the SFT model trained on groups of its own answers, each
answer's advantage measured against the other answers to the same prompt. No value model.

Three models: the policy (trained, starts as SFT), the reference (frozen SFT) and, with
--reward=model or sum, the reward model (frozen, from reward.py). Each iteration:

  1. draw this process's prompts; the policy answers each one --group_size times with
     the KV cache at --temperature (a response stops at its first end token)
  2. score every answer: --reward=verifiable is the world's correctness check (1 if
     right, else 0), model the reward model, sum both
  3. dynamic sampling (--dynamic_sampling=true): a group whose scores are all equal has
     zero advantage and carries no signal; it is dropped and more prompts are drawn until
     the batch is full (the log counts the drops; the share of zero-signal groups is
     logged either way). Equal means equal before the KL: with --kl_in=reward a group
     of equal scores that is kept (no dynamic sampling, or a top-up) gets advantages
     from its answers' KL alone, with --advantage=grpo scaled to unit std
  4. log-probs of each response token under the reference; with --kl_in=reward, also
     under the policy (π_old), and β·Σ_t(log π − log π_ref) is taken off each score
  5. group-relative advantages (--advantage), one per answer, on every one of its tokens
  6. --updates policy steps on the batch: the clipped importance ratio with its own low
     and high ε (π_old from the first step's forward, before the policy moves), plus
     (--kl_in=loss) β times the k3 KL to the reference on each token,
     aggregated over tokens and answers as --loss_agg says

The choices, each a flag, with the paper it comes from:

  --advantage=grpo       (r − mean of the group) / std of the group: Shao et al. 2024,
                         "DeepSeekMath" (GRPO), outcome supervision
  --advantage=dr_grpo    r − mean of the group, no std division: Liu et al. 2025,
                         "Understanding R1-Zero-Like Training" (Dr. GRPO)
  --advantage=rloo       r − mean of the other G − 1 answers (leave-one-out): Kool et al.
                         2019 ("Buy 4 REINFORCE samples, get a baseline for free!"),
                         Ahmadian et al. 2024 ("Back to Basics", RLOO)
  --advantage=reinforce  r − mean of the whole batch (REINFORCE with a batch baseline)
  --loss_agg=seq_mean    token mean within each answer, then the mean over answers (GRPO)
  --loss_agg=constant    token sum over the batch / (answers × --max_new_tokens) (Dr. GRPO)
  --loss_agg=token_mean  token mean over the whole batch (Yu et al. 2025, DAPO)
  --clip_low/--clip_high ρ clipped to [1 − ε_low, 1 + ε_high]: DAPO's clip-higher
  --beta, --kl_in=loss   β · k3 in the loss, k3 = exp(log π_ref − log π) − (log π_ref −
                         log π) − 1 (Schulman 2020, "Approximating KL divergence"), as
                         GRPO; β = 0 is Dr. GRPO's and DAPO's choice
  --kl_in=reward         the KL taken off the reward instead, as PPO-RLHF does
  --dynamic_sampling     DAPO's dynamic sampling
  --ptx_coef             the pretraining term of PPO-ptx (Ouyang et al. 2022), as ppo.py
  --lr_decay             the learning rate falls linearly to 0 over --iterations, as
                         ppo.py's does (constant without it)

Where it departs from the papers: one gradient step per update on the whole batch (no
minibatches; the forward and backward run in micro-batches of --micro_batch answers of
similar length, whose gradients add up to the whole batch's, so that little of the work
is padding); under torchrun each process draws, scores and normalises its own groups,
and a token mean (--loss_agg=token_mean) is taken per process, then averaged by DDP; a
response that never ends keeps its score (no missing-end penalty); after --max_rounds
rounds of drawing, dynamic sampling tops the batch up with dropped groups (logged).

The defaults (512 answers per iteration as 64 prompts × 8, dynamic sampling, answers at
temperature 0.7, 50 iterations, 2 updates, learning rate 5e-5, β 0.1, ε 0.2) run in a
few minutes on two CPU cores. The batch is what matters most: at 128 answers the update
is mostly noise, and Adam moves the policy as far on noise as on signal (RESULTS.md,
GRPO, has the runs and their times). β is larger than GRPO's 0.04: on this world it
holds the families that the training prompts do not teach (held-out spelling) nearer
SFT. The log carries the world's gold scorer on the same rollouts (gold/score,
gold/correct, gold/preamble); the policy never sees it.

    python grpo.py                          # reads out/sft, writes out/grpo
    python grpo.py --advantage=dr_grpo --loss_agg=constant --beta=0      # Dr. GRPO
    python grpo.py --loss_agg=token_mean --clip_high=0.28 --beta=0 --dynamic_sampling=true
    python grpo.py --advantage=rloo --reward=sum --out_dir=out/rloo
    python grpo.py --device=cuda
    torchrun --standalone --nproc_per_node=2 grpo.py   # each process its own groups and seed
    python grpo.py --resume=true
    python grpo.py --init_from=out/sft-gpt2 --reward=model --reward_from=out/rm-gpt2 \\
        --data=prompts.jsonl --out_dir=out/grpo-gpt2

Your own prompts: --data an RL prompt file (formats.py) for a model fine-tuned from GPT-2,
scored by a reward model of the same tokenizer (--reward=model); there is no answer to
check (verifiable) and no gold scorer to log without the world.
"""

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

import checkpoint
import distributed
import formats
import optim
from batch import (gold_figures, left_pad, length_chunks, ptx_windows, response_logprobs,
                   reward_scores, show_samples, verifiable_score)
from cli import UserError, parse_config, ranges, refuse_unused, user_errors
from distributed import print0
from logger import Logger
from model import freeze
from records import load_prompts, prompt_room, ptx_stream, stage_model
from reward_model import load_reward_model

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce")
LOSS_AGGS = ("seq_mean", "constant", "token_mean")


@dataclass
class Config:
    data_dir: str = "data/world"      # folder written by data/prepare.py (prompts_train.jsonl)
    data: str = ""                    # your own RL prompts instead (formats.py), e.g. for GPT-2
    init_from: str = "out/sft"        # the SFT model: the policy's start and the frozen reference
    reward_from: str = "out/reward"   # reward model (--reward=model or sum)
    reward: str = "verifiable"        # verifiable: 1 if right, else 0; model: the reward model; sum
    out_dir: str = "out/grpo"         # checkpoint and log go here
    iterations: int = 50              # rollout + update rounds
    batch_size: int = 512             # answers per iteration, all processes: prompts × group_size
    group_size: int = 8               # G: answers sampled per prompt (at least 2)
    updates: int = 2                  # μ: policy steps on each batch of rollouts
    max_new_tokens: int = 32          # response length limit
    temperature: float = 0.7          # sampling temperature, also applied to the log-probs
    learning_rate: float = 5e-5       # policy
    lr_decay: bool = False            # decay the learning rate linearly to 0 over --iterations
    weight_decay: float = 0.0         # AdamW decay (matrices only)
    grad_clip: float = 1.0            # clip the gradient norm (0 = off)
    advantage: str = "grpo"           # grpo (÷ group std), dr_grpo (no ÷), rloo, reinforce
    loss_agg: str = "seq_mean"        # seq_mean (GRPO), constant (Dr. GRPO), token_mean (DAPO)
    clip_low: float = 0.2             # ε_low: the ratio is clipped below at 1 − ε_low
    clip_high: float = 0.2            # ε_high: and above at 1 + ε_high (DAPO's clip-higher: 0.28)
    beta: float = 0.1                 # β: weight of the KL to the reference (0 = none; GRPO: 0.04)
    kl_in: str = "loss"               # loss: β·k3 per token in the loss; reward: β·KL off the score
    dynamic_sampling: bool = True     # drop groups of equal scores and draw more prompts (DAPO)
    frozen_dtype: str = "fp32"        # fp32 or bf16: the reference's and reward model's weights
    max_rounds: int = 8               # dynamic sampling: draws per iteration before topping up
    micro_batch: int = 128            # answers per forward and backward, of similar length (0: all)
    ptx_coef: float = 0.0             # γ: weight of the pretraining loss (as PPO-ptx; 0 = off)
    ptx_batch: int = 4                # pretraining windows per update, each process
    ptx_len: int = 128                # tokens per pretraining window (data_dir/train.bin)
    sample_interval: int = 20         # print a few responses every this many iterations
    log_interval: int = 1             # iterations between log lines
    ckpt_interval: int = 20           # iterations between checkpoints
    seed: int = 1337                  # each process samples from its own seed derived from this
    device: str = "auto"              # auto, cpu, cuda, cuda:N or mps
    compile: bool = False             # torch.compile policy, reference and generation
    resume: bool = False              # continue from out_dir/ckpt.pt

    RANGES: ClassVar = ranges(
        at_least_1="iterations batch_size group_size updates max_new_tokens max_rounds ptx_batch "
                   "ptx_len log_interval ckpt_interval",
        non_negative="weight_decay grad_clip clip_high beta ptx_coef temperature "
                     "sample_interval micro_batch",
        positive="learning_rate", below_1="clip_low")


# --- pure functions: advantages, the k3 KL, loss aggregation, the clipped objective ---------


def group_advantages(rewards, group_size, kind):
    """One advantage per answer, rewards (B,) in groups of group_size consecutive rows.
    grpo: (r − group mean) / (group std + 1e-4), the std unbiased; dr_grpo: r − group
    mean; rloo: r − mean of the group's other answers; reinforce: r − batch mean."""
    r = rewards.view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    if kind == "grpo":
        adv = (r - mean) / (r.std(1, keepdim=True) + 1e-4)
    elif kind == "dr_grpo":
        adv = r - mean
    elif kind == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    elif kind == "reinforce":
        adv = r - r.mean()
    else:
        raise UserError(f"--advantage={kind}: expected one of {', '.join(ADVANTAGES)}")
    return adv.reshape(-1)


def k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(π‖π_ref) per sampled token: e^d − d − 1 with
    d = log π_ref − log π; never negative, unbiased under samples of π."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(x, mask, how, max_new_tokens, whole=None):
    """A per-token quantity (B, N) to one number over the response tokens (mask):
    seq_mean (GRPO), constant (Dr. GRPO: Σ / (B · max_new_tokens)), token_mean (DAPO).
    whole: (answers, response tokens) of the whole batch when x is one micro-batch of it;
    the counts divide by those, so the micro-batches' results add up to the whole
    batch's (None: x is the whole batch)."""
    answers, tokens = whole or (mask.size(0), mask.sum().clamp(min=1))
    if how == "seq_mean":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / answers
    if how == "constant":
        return (x * mask).sum() / (answers * max_new_tokens)
    if how == "token_mean":
        return (x * mask).sum() / tokens
    raise UserError(f"--loss_agg={how}: expected one of {', '.join(LOSS_AGGS)}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, whole=None):
    """The clipped objective, negated for descent, per token
    −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·k3 (the k3 term only with
    cfg.kl_in == "loss"), ρ = π/π_old, aggregated by cfg.loss_agg. logp etc. (B, N),
    advantages (B,); whole as aggregate's, so both the loss and the diagnostics of the
    micro-batches add up to the whole batch's. Returns (loss, diagnostics as detached
    0-d tensors: the caller adds up its micro-batches' and reads them once per update,
    so a GPU waits for the host once, not once per micro-batch)."""
    adv = advantages[:, None]
    ratio = torch.exp((logp - old_logp) * mask)
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    surrogate = torch.min(ratio * adv, clipped * adv)
    kl = k3(logp * mask, ref_logp * mask)  # 0 outside the responses
    beta = cfg.beta if cfg.kl_in == "loss" else 0.0
    loss = aggregate(-surrogate + beta * kl, mask, cfg.loss_agg, cfg.max_new_tokens, whole)
    with torch.no_grad():
        mean = lambda x: aggregate(x.float(), mask, "token_mean", 0, whole)  # noqa: E731
        stats = {"loss/policy": loss, "loss/k3": mean(kl), "policy/ratio": mean(ratio),
                 "policy/clipfrac_low": mean((ratio < 1 - cfg.clip_low) & (adv < 0)),
                 "policy/clipfrac_high": mean((ratio > 1 + cfg.clip_high) & (adv > 0))}
    return loss, {k: v.detach() for k, v in stats.items()}


# --- steps 1 to 3: sampling groups, and dynamic sampling ----------------------------------


@torch.no_grad()
def sample_groups(policy, prompts, group_size, cfg, tok, generator):
    """Step 1: group_size answers to each prompt (token lists), consecutive; each answer
    as a token list that keeps its end token when it emitted one."""
    rows = [p for p in prompts for _ in range(group_size)]
    response, mask = policy.generate(rows, cfg.max_new_tokens, temperature=cfg.temperature,
                                     stop_token=tok.end, pad_token=tok.pad, generator=generator,
                                     compile=cfg.compile)
    return [row[m].tolist() for row, m in zip(response, mask)]


def fill_groups(draw, n_groups, n_prompts, dynamic, max_rounds):
    """Step 3. draw(round) -> [(group, scores (G,))]. Without dynamic sampling: the first
    draw. With it: the groups whose scores are not all equal, in order, drawing again
    until n_groups are kept; after max_rounds draws the batch is topped up with dropped
    groups. Refused when a draw of the whole prompt set's worth kept nothing. Returns
    the (group, scores) pairs and {share of zero-signal groups among those looked at,
    groups dropped, draws}."""
    kept, dropped, seen, zero, rounds = [], [], 0, 0, 0
    while len(kept) < n_groups and rounds < (max_rounds if dynamic else 1):
        for group, scores in draw(rounds):
            if len(kept) == n_groups:
                break
            uniform = bool((scores == scores[0]).all())
            seen, zero = seen + 1, zero + uniform
            (dropped if dynamic and uniform else kept).append((group, scores))
        rounds += 1
        if dynamic and not kept and seen >= n_prompts:
            raise UserError(f"--dynamic_sampling=true: every one of the {seen} groups drawn had "
                            f"equal scores (the {n_prompts} prompts give no signal), so no "
                            f"batch can be filled; turn it off or change --reward")
    topped = dropped[:n_groups - len(kept)]
    return kept + topped, {"groups/zero_signal": zero / max(seen, 1),
                           "dynamic/dropped": len(dropped) - len(topped), "dynamic/rounds": rounds}


def assemble(prompt_rows, responses, pad, device):
    """Step 4's layout: left-padded prompts then right-padded responses, so every response
    starts in column P. Returns tokens, attention mask, response mask (float) and P."""
    prompt_tokens, prompt_mask = left_pad(prompt_rows, pad, device)
    resp, resp_mask = (x.flip(1) for x in left_pad([r[::-1] for r in responses], pad, device))
    return (torch.cat([prompt_tokens, resp], 1), torch.cat([prompt_mask, resp_mask], 1),
            resp_mask.float(), prompt_tokens.size(1))


@dataclass
class Micro:
    """One micro-batch of answers, laid out by assemble, with its per-token figures."""
    rows: torch.Tensor             # (n,) the answers' positions in the batch
    tokens: torch.Tensor           # (n, P + N) prompt and response tokens
    attn: torch.Tensor             # (n, P + N) attention mask
    mask: torch.Tensor             # (n, N) 1.0 on response tokens
    P: int                         # the column where every response starts
    ref_logp: torch.Tensor | None = None  # (n, N) under the reference
    old_logp: torch.Tensor | None = None  # (n, N) under π_old, the policy that sampled
    entropy: torch.Tensor | None = None   # (n, N) the policy's, at its first update


def micro_batches(prompt_rows, responses, size, pad, device):
    """The batch as micro-batches of `size` answers (0: all in one), the answers sorted by
    prompt plus response length first, so that each micro-batch is padded to its own
    longest answer only (half the default batch's token grid is padding otherwise). The
    update's gradient is the sum of theirs, the same as the whole batch's."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_rows, responses)]
    return [Micro(torch.tensor(c, device=device),
                  *assemble([prompt_rows[i] for i in c], [responses[i] for i in c], pad, device))
            for c in length_chunks(lengths, size or len(lengths))]


def check(cfg, run):
    """The settings that cannot work, each refused in one line naming its flag."""
    if cfg.group_size < 2:
        raise UserError(f"--group_size={cfg.group_size}: a group needs at least 2 answers, or "
                        f"every advantage is 0")
    if cfg.batch_size % (cfg.group_size * run.world_size):
        raise UserError(f"--batch_size={cfg.batch_size} does not split into whole groups of "
                        f"--group_size={cfg.group_size} on {run.world_size} process(es)")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature={cfg.temperature}: GRPO samples, so it must be > 0")
    for flag, value, allowed in (("advantage", cfg.advantage, ADVANTAGES),
                                 ("loss_agg", cfg.loss_agg, LOSS_AGGS),
                                 ("reward", cfg.reward, ("verifiable", "model", "sum")),
                                 ("kl_in", cfg.kl_in, ("loss", "reward")),
                                 ("frozen_dtype", cfg.frozen_dtype, ("fp32", "bf16"))):
        if value not in allowed:
            raise UserError(f"--{flag}={value}: expected one of {', '.join(allowed)}")
    # flags this run would ignore, refused rather than ignored without a word
    refuse_unused(cfg, ["reward_from"], "with --reward=verifiable", cfg.reward == "verifiable")
    refuse_unused(cfg, ["ptx_batch", "ptx_len"], "with --ptx_coef=0", cfg.ptx_coef == 0)
    refuse_unused(cfg, ["max_rounds"], "with --dynamic_sampling=false", not cfg.dynamic_sampling)
    refuse_unused(cfg, ["kl_in"], "with --beta=0", cfg.beta == 0)


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    check(cfg, run)
    G, n_groups = cfg.group_size, cfg.batch_size // (cfg.group_size * run.world_size)
    formats.refuse_world_only(cfg)
    # a model fine-tuned from GPT-2 carries its tokenizer and chat format
    ref, enc, chat, carried = stage_model(cfg.init_from, "python sft.py",
                                          cfg.data_dir, run.device)
    tok = formats.rl_tokens(enc, chat)
    policy = copy.deepcopy(ref)
    freeze(ref, cfg.frozen_dtype)
    reward_model, rm_config = None, None
    if cfg.reward != "verifiable":
        reward_model, rm_ckpt = load_reward_model(os.path.join(cfg.reward_from, "ckpt.pt"),
                                                  "python reward.py", enc, device=run.device)
        freeze(reward_model.members, cfg.frozen_dtype)
        rm_config = rm_ckpt["config"]
    room = prompt_room(policy.config.block_size, cfg.max_new_tokens)
    if cfg.data:  # your prompts: no tasks, so no check and no gold scorer
        (texts, prompts), tasks = formats.rl_prompts(cfg.data, enc, chat, room), None
    else:
        texts, prompts, tasks = load_prompts(os.path.join(cfg.data_dir, "prompts_train.jsonl"),
                                             enc, room)
    ptx_data = ptx_stream(cfg, enc, policy.config.block_size)  # None when --ptx_coef=0

    optimizer = policy.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95),
                                            run.device_type)
    it, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(cfg.out_dir, run, ("grpo",))  # this run's folder until it ends
    guard = optim.NonFiniteGuard(ckpt_path=ckpt_path)  # its counts resume with the run
    if cfg.resume:
        it, _ = checkpoint.resume(ckpt_path, "grpo", policy, optimizer, guard=guard, same=dict(
            reward=cfg.reward, advantage=cfg.advantage, loss_agg=cfg.loss_agg, kl_in=cfg.kl_in))
    train_policy = distributed.wrap(policy, run, cfg.compile)
    ref_forward = distributed.run_only(ref, cfg.compile)
    log = Logger(cfg.out_dir, cfg, cfg.iterations, cfg.log_interval, run.master, start_step=it)
    print0(f"GRPO: {len(prompts)} prompts, {cfg.iterations} iterations of {cfg.batch_size} "
           f"answers ({cfg.batch_size // G} prompts x {G}), {cfg.updates} update(s) each, "
           f"advantage {cfg.advantage}, loss {cfg.loss_agg}, reward {cfg.reward}, "
           f"on {run.device} x {run.world_size}")

    def score(idx, rows, responses):  # step 2, every answer of a draw at once
        s = torch.zeros(len(rows), device=run.device)
        if cfg.reward != "model":
            s += verifiable_score(enc, [tasks[i] for i in idx])(rows, responses).to(run.device)
        if reward_model is not None:
            s += reward_scores(reward_model, list(zip(rows, responses)), tok.pad, run.device,
                               len(rows))
        return s

    stop = distributed.StopSignal()
    for m in (policy, ref):
        m.eval()  # dropout off; gradients still flow through the policy
    while it < cfg.iterations:
        t0 = time.time()
        g = torch.Generator(device=run.device).manual_seed(
            distributed.iteration_seed(cfg.seed, run.rank, it))
        first = distributed.rank_chunks(
            distributed.global_batch(len(prompts), it, cfg.batch_size // G, cfg.seed), run, 1)[0]

        # 1-3. groups of answers, scored; dynamic sampling draws more prompts from g
        def draw(rnd):
            idx = first if rnd == 0 else torch.randint(
                len(prompts), (n_groups,), generator=g, device=g.device).tolist()
            responses = sample_groups(policy, [prompts[i] for i in idx], G, cfg, tok, g)
            rows = [i for i in idx for _ in range(G)]
            scores = score(rows, [prompts[i] for i in rows], responses).view(-1, G)
            return [((i, responses[k * G:(k + 1) * G]), scores[k]) for k, i in enumerate(idx)]
        with run.autocast:  # bf16 on CUDA, as the updates
            groups, sampling = fill_groups(draw, n_groups, len(prompts), cfg.dynamic_sampling,
                                           cfg.max_rounds)
        idx = [i for (i, _), _ in groups for _ in range(G)]
        responses = [r for (_, rs), _ in groups for r in rs]
        scores = torch.cat([s for _, s in groups])
        # 4. the answers in micro-batches of similar length; log-probs under the reference
        # and, for the KL in the reward, under π_old
        micro = micro_batches([prompts[i] for i in idx], responses, cfg.micro_batch, tok.pad,
                              run.device)
        whole = (len(responses), sum(mb.mask.sum() for mb in micro).clamp(min=1))
        with torch.no_grad(), run.autocast:
            for mb in micro:
                mb.ref_logp = response_logprobs(ref_forward, mb.tokens, attn_mask=mb.attn,
                                                start=mb.P, temperature=cfg.temperature,
                                                share_prefix=True)
                if cfg.kl_in == "reward":  # the KL is needed now, before the advantages
                    mb.old_logp = response_logprobs(policy, mb.tokens, attn_mask=mb.attn,
                                                    start=mb.P, temperature=cfg.temperature,
                                                    share_prefix=True)
            if cfg.kl_in == "reward":
                kl = torch.zeros_like(scores)
                for mb in micro:
                    kl[mb.rows] = ((mb.old_logp - mb.ref_logp) * mb.mask).sum(1)
                scores_kl = scores - cfg.beta * kl
            # 5. group-relative advantages, in the batch's order (its groups)
            advantages = group_advantages(scores_kl if cfg.kl_in == "reward" else scores, G,
                                          cfg.advantage)
        t_rollout = time.time() - t0

        # 6. μ policy steps on the batch, each the sum of its micro-batches' gradients; the
        # first step's forward also gives π_old (the policy has not moved yet), which
        # saves a forward pass over the rollouts
        stats = {}
        lr = cfg.learning_rate * (1 - it / cfg.iterations if cfg.lr_decay else 1)
        optim.set_lr(optimizer, lr)  # the same for every update of the batch
        for u in range(cfg.updates):
            update = {}
            for k, mb in enumerate(micro):
                with distributed.grad_sync(train_policy, run, last=k == len(micro) - 1), \
                        run.autocast:
                    # the entropies are only logged: the first update's are enough
                    out = response_logprobs(train_policy, mb.tokens, attn_mask=mb.attn,
                                            start=mb.P, temperature=cfg.temperature,
                                            entropy=u == 0, share_prefix=True)
                    logp = out[0] if u == 0 else out
                    if u == 0:
                        mb.entropy = out[1].detach()
                        mb.old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
                    loss, part = grpo_loss(logp, mb.old_logp, mb.ref_logp,
                                           advantages[mb.rows], mb.mask, cfg, whole)
                    loss.backward()
                for key, v in part.items():
                    update[key] = update.get(key, 0.0) + v
            if ptx_data is not None:  # PPO-ptx's term: its own forward on longer windows
                with run.autocast:
                    ptx = train_policy(*ptx_windows(ptx_data, cfg.ptx_batch, cfg.ptx_len, g,
                                                    run.device))[1]
                    (cfg.ptx_coef * ptx).backward()
                update["loss/ptx"] = ptx.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                       cfg.grad_clip or math.inf).item()
            if guard.ok(grad_norm, it):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # the diagnostics read from the device at once, one wait per update
            for key, v in zip(update, torch.stack([v.float() for v in update.values()]).tolist()):
                stats.setdefault(key, []).append(v)
        t_update = time.time() - t0 - t_rollout

        # the world's gold scorer on the same rollouts: logged, never optimised
        gold = gold_figures(enc, tasks and [tasks[i] for i in idx], responses)
        def mean(x):  # over this process's answers, then over the processes
            return distributed.all_reduce_mean(float(torch.as_tensor(x).float().mean()), run)
        ended = [tok.end in r for r in responses]
        kl = torch.cat([((mb.old_logp - mb.ref_logp) * mb.mask).sum(1) for mb in micro])
        entropy = torch.cat([(mb.entropy * mb.mask).sum(1) / mb.mask.sum(1) for mb in micro])
        length = torch.cat([mb.mask.sum(1) for mb in micro])
        metrics = {
            "objective/score": mean(scores), "objective/kl": mean(kl),
            "objective/entropy": mean(entropy),
            **{k: mean(v) for k, v in stats.items()},
            **{k: mean(v) for k, v in sampling.items()},
            "rollout/length": mean(length), "rollout/ended": mean(ended),
            **{k: mean(v) for k, v in gold.items()},
            "policy/lr": lr, "time/rollout_s": t_rollout, "time/update_s": t_update,
            **guard.logged(),
        }
        it += 1
        shown = ("objective/score", "objective/kl", "gold/correct", "groups/zero_signal",
                 "policy/clipfrac_high", "rollout/length")
        log.step(it - 1, int(length.sum().item()) * run.world_size, show=shown, **metrics)
        if run.master and cfg.sample_interval and (it % cfg.sample_interval == 0 or it == 1):
            show_samples(enc, [texts[i] for i in idx[:3]], responses, scores.tolist(), tok.end)
        stop.checkpoint(run, it, it % cfg.ckpt_interval == 0 or it == cfg.iterations, ckpt_path,
                        lambda: checkpoint.save(ckpt_path, checkpoint.stage_checkpoint(
                            "grpo", policy, cfg, it, optimizer, enc, guard,
                            reward_model=rm_config, **carried)))  # also on SIGTERM
    print0(f"done: checkpoint {ckpt_path}")
    lock.release()
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
