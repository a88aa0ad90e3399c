"""Direct preference optimisation and its family, on the raters' rankings.

No reward model and no sampling: the policy (initialised from SFT) is trained on
pairs from each ranking so that it prefers the chosen response more than the frozen
SFT reference does. Pick the loss with --loss:

    dpo    −log σ(β·h),  h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
           (Rafailov et al. 2023, eq. 7)
    cdpo   −(1−ε)·log σ(β·h) − ε·log σ(−β·h): labels flipped with probability ε
           (Mitchell 2023, conservative DPO)
    ipo    (h − 1/(2β))²: regress the margin to a target instead of pushing it up
           (Azar et al. 2023, eq. 17; h of summed log-probs, as the paper's, where some
           implementations average them over each response's tokens)
    simpo  −log σ(β·(mean log π(y_w) − mean log π(y_l)) − γ): length-normalised, no
           reference (Meng et al. 2024, eq. 6)
    orpo   NLL(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))), odds = P/(1−P) with P the
           per-token-average likelihood; no reference (Hong et al. 2024, eqs. 6-7)
    --nll_coef=α (dpo, cdpo, ipo): + α·NLL(y_w)/|y_w|, the chosen response's negative
           log-likelihood per token beside the preference loss, so the chosen answers stay
           likely while the margin grows (RPO: Pang et al. 2024, eq. 1; normalised by the
           response's tokens here)
    kto    unpaired: responses in the top half of a ranking are desirable, the bottom half
           undesirable; 1 − σ(β·(r − z0)) or 1 − σ(β·(z0 − r)), r = log π/π_ref,
           z0 a detached, non-negative batch estimate of KL(π‖π_ref)
           (Ethayarajh et al. 2024, eq. 8; the paper estimates z0 on mismatched
           prompt-response pairs, here on the batch's own responses)

Every pair of each ranking is used, as in reward.py. Reference log-probs are computed
once with the frozen SFT model and cached; chosen and rejected go through the policy in
one forward pass. Logged: loss, implicit-reward accuracy, chosen/rejected implicit
rewards β·(log π − log π_ref) and their margin, the policy's log-probs of chosen and
rejected (a falling chosen log-prob shows here), and at eval intervals a sampled
estimate of KL(π‖π_ref) on held-out prompts.

    python dpo.py                          # reads out/sft, writes out/dpo
    python dpo.py --loss=ipo               # writes out/ipo
    python dpo.py --prefs=prefs,prefs_sft  # also the raters' rankings of SFT samples
                                             (data/label.py)
    python dpo.py --device=cuda
    torchrun --standalone --nproc_per_node=2 dpo.py
    python dpo.py --resume=true

Your own data: --data an HH-RLHF or preference file (formats.py), --val_fraction of it
held out, pairs longer than the context skipped and counted; with an SFT model trained
from GPT-2 (sft.py --init_from=gpt2) the pairs are put in HH's chat format, and the
tokenizer travels on in the checkpoint.

    python dpo.py --init_from=out/sft-gpt2 --data=hh-rlhf/train.jsonl.gz --out_dir=out/dpo-gpt2
"""

import copy
import math
import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

import checkpoint
import distributed
import formats
import optim
from batch import (collate, length_groups, reward_scores, rows_per_pass, sample_responses,
                   sequence_kl, sequence_logprobs)
from cli import UserError, parse_config, ranges, refuse_unused, user_errors
from distributed import print0
from logger import Logger
from records import load_preference_sets, read_jsonl, stage_model

LOSSES = ("dpo", "cdpo", "ipo", "simpo", "orpo", "kto")
# each loss's peak learning rate when --learning_rate is not given: SimPO has no reference
# to hold it near SFT, and at the others' rate it collapses (RESULTS.md § DPO family)
LEARNING_RATES = dict(dpo=1e-5, cdpo=1e-5, ipo=1e-5, simpo=2e-6, orpo=1e-5, kto=1e-5)


@dataclass
class Config:
    loss: str = "dpo"                # dpo, cdpo, ipo, simpo, orpo or kto
    data_dir: str = "data/world"     # folder written by data/prepare.py
    init_from: str = "out/sft"       # the SFT model: the policy's start and the frozen reference
    out_dir: str = ""                # default out/<loss>
    prefs: str = "prefs"  # preference sets in data_dir, NAME_train/val.jsonl; prefs_sft: label.py's
    beta: float = 0.1                # strength of the KL anchor (dpo, cdpo, ipo, kto)
    label_smoothing: float = 0.1     # cdpo: assumed share of flipped labels
    simpo_beta: float = 2.0          # simpo: reward scale (Meng et al. use 2 to 2.5)
    simpo_gamma: float = 1.0         # simpo: target reward margin
    orpo_lambda: float = 0.1         # orpo: weight of the odds-ratio term beside the NLL
    nll_coef: float = 0.0            # dpo, cdpo, ipo: α of the chosen answers' NLL (RPO); 0 = off
    kto_desirable_weight: float = 1.0    # kto: weight of desirable examples
    kto_undesirable_weight: float = 1.0  # kto: weight of undesirable examples
    batch_size: int = 32             # pairs (kto: responses) per optimizer step, over all ranks
    grad_accum: int = 1              # micro-steps per optimizer step on each rank
    length_groups: int = 4           # each micro-step as this many of similar length (not kto)
    max_steps: int = 300             # optimizer steps
    learning_rate: float = 0.0       # peak learning rate (0: the loss's own, LEARNING_RATES)
    warmup_steps: int = 20           # linear warmup, then cosine decay to 10%
    weight_decay: float = 0.0        # AdamW decay, matrices only (0: the reference is the anchor)
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # clip the gradient norm (0 = off)
    kl_prompts: int = 64             # held-out prompts for the KL estimate
    max_new_tokens: int = 48         # length limit of those samples
    eval_interval: int = 100         # steps between evaluations (validation pairs, KL)
    log_interval: int = 25           # steps between log lines
    ckpt_interval: int = 100         # steps between checkpoints
    seed: int = 1337                 # same seed, same numbers (on CPU)
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps
    compile: bool = False            # torch.compile the model
    resume: bool = False             # continue from out_dir/ckpt.pt
    data: str = ""                   # your own preference pairs (default: the world's --prefs)
    val_fraction: float = 0.05       # with --data: the share held out

    RANGES: ClassVar = ranges(
        at_least_1="batch_size grad_accum length_groups max_steps kl_prompts max_new_tokens "
                   "eval_interval log_interval ckpt_interval",
        non_negative="beta simpo_beta simpo_gamma orpo_lambda nll_coef kto_desirable_weight "
                     "kto_undesirable_weight warmup_steps weight_decay grad_clip learning_rate",
        fraction="label_smoothing val_fraction",
        below_1="beta1 beta2")


# --- the losses: sequence log-probs in, per-example loss out ------------------------------
# pc, pr: summed log-probs of chosen / rejected under the policy; rc, rr: under the
# reference; nc, nr: their response lengths in tokens.


def dpo_loss(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def cdpo_loss(pc, pr, rc, rr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def ipo_loss(pc, pr, rc, rr, beta):
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def simpo_loss(pc, pr, nc, nr, beta, gamma):
    return -F.logsigmoid(beta * (pc / nc - pr / nr) - gamma)


def orpo_loss(pc, pr, nc, nr, lam):
    """NLL of the chosen response (per token) plus λ times the odds-ratio term."""
    def log_odds(logp_sum, n):
        mean = logp_sum / n  # log P, P the per-token-average likelihood
        return mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))  # log(P / (1 − P))
    return -pc / nc + lam * -F.logsigmoid(log_odds(pc, nc) - log_odds(pr, nr))


def nll_per_token(pc, nc):
    """The chosen response's negative log-likelihood per token: RPO's term beside DPO."""
    return -pc / nc


def kto_loss(p, r, desirable, beta, z0, w_desirable, w_undesirable):
    """p, r: summed log-probs of each response under policy and reference; desirable: bool."""
    ratio = p - r
    v = torch.where(desirable, torch.sigmoid(beta * (ratio - z0)),
                    torch.sigmoid(beta * (z0 - ratio)))
    w = torch.where(desirable, torch.full_like(p, w_desirable), torch.full_like(p, w_undesirable))
    return w * (1 - v)


def kto_reference_point(p, r):
    """z0: a detached, non-negative estimate of KL(π‖π_ref) from the batch."""
    return (p - r).mean().clamp(min=0).detach()


# --- data: responses, with the pairs (or kto labels) as indices into them -----------------


def load_sets(data_dir, prefs, split, enc, block_size):
    """Every response of every ranking of the --prefs sets as (tokens, prompt length);
    the (chosen, rejected) pairs of each ranking as indices into them; each response's
    kto label (desirable: in the top half of its ranking)."""
    seqs, pairs, desirable = [], [], []
    for rankings in load_preference_sets(data_dir, prefs, split, enc, block_size).values():
        for r in rankings:
            base = len(seqs)
            seqs += [(s, r["prompt_len"]) for s in r["seqs"]]
            pairs += [(base + c, base + j) for c, j in r["pairs"]]
            top = set(r["ranking"][:len(r["ranking"]) // 2])
            desirable += [i in top for i in range(len(r["seqs"]))]
    return seqs, pairs, desirable


def own_sets(path, enc, chat, block_size, val_fraction):
    """Your pairs (formats.load_comparisons) in the model's chat format, as load_sets
    gives the world's, for training and validation; and the validation prompts' tokens
    (for the KL estimate). Pairs longer than the context are skipped and counted."""
    encoded, counts, kind, too_long = formats.comparison_tokens(path, enc, chat, block_size)
    train, val = formats.hold_out(encoded, val_fraction, path, kind, counts, too_long,
                                  block_size, "pair", kept="pairs ")

    def sets(part):
        seqs, pairs, desirable = [], [], []
        for p, c, r in part:
            pairs.append((len(seqs), len(seqs) + 1))
            seqs += [(p + c, len(p)), (p + r, len(p))]
            desirable += [True, False]
        return seqs, pairs, desirable
    return sets(train), sets(val), [p for p, _, _ in val]


@torch.no_grad()
def reference_logps(ref, seqs, pad, device, batch=128):
    """The frozen reference's summed log-probs of every response, computed once, in
    passes of at most `batch` rows whose logits fit batch.rows_per_pass's budget."""
    batch = rows_per_pass(max((len(s) for s, _ in seqs), default=1), ref.config.vocab_size,
                          batch)
    return reward_scores(lambda rows: sequence_logprobs(ref, rows)[0],
                         [(s[:n], s[n:]) for s, n in seqs], pad, device, batch)


# --- one batch: the loss and what to log ---------------------------------------------------


def batch_loss(model, batch, cfg):
    """batch: (Batch, reference log-probs[, kto labels]). Returns (mean loss, metrics)."""
    rows, ref = batch[:2]
    logp, n = sequence_logprobs(model, rows)
    if cfg.loss == "kto":
        desirable = batch[2]
        z0 = kto_reference_point(logp, ref)
        loss = kto_loss(logp, ref, desirable, cfg.beta, z0, cfg.kto_desirable_weight,
                        cfg.kto_undesirable_weight)
        reward = cfg.beta * (logp - ref).detach()
        return loss.mean(), {"kto/z0": z0.item(),
                             "rewards/desirable": reward[desirable].mean().item(),
                             "rewards/undesirable": reward[~desirable].mean().item()}
    B = len(rows) // 2  # chosen first, then rejected, in one forward pass
    pc, pr, rc, rr, nc, nr = logp[:B], logp[B:], ref[:B], ref[B:], n[:B], n[B:]
    if cfg.loss == "dpo":
        loss = dpo_loss(pc, pr, rc, rr, cfg.beta)
    elif cfg.loss == "cdpo":
        loss = cdpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
    elif cfg.loss == "ipo":
        loss = ipo_loss(pc, pr, rc, rr, cfg.beta)
    elif cfg.loss == "simpo":
        loss = simpo_loss(pc, pr, nc, nr, cfg.simpo_beta, cfg.simpo_gamma)
    else:
        loss = orpo_loss(pc, pr, nc, nr, cfg.orpo_lambda)
    extra = {}
    if cfg.nll_coef:  # RPO: the chosen answers kept likely
        nll = nll_per_token(pc, nc)
        loss, extra = loss + cfg.nll_coef * nll, {"loss/nll": nll.mean().item()}
    chosen, rejected = cfg.beta * (pc - rc).detach(), cfg.beta * (pr - rr).detach()
    return loss.mean(), {"rewards/chosen": chosen.mean().item(),
                         "rewards/rejected": rejected.mean().item(),
                         "rewards/margin": (chosen - rejected).mean().item(),
                         "rewards/accuracy": (chosen > rejected).float().mean().item(),
                         "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item(),
                         **extra}


def make_batch(data, chosen_items, cfg, pad, device):
    """(Batch, reference log-probs[, kto labels]) for the given pairs (chosen responses
    first, then rejected) or, for kto, responses."""
    seqs, items, ref, labels = data
    if cfg.loss == "kto":
        rows = [items[i] for i in chosen_items]
    else:
        rows = [items[i][0] for i in chosen_items] + [items[i][1] for i in chosen_items]
    batch = (collate([seqs[j][0] for j in rows], [seqs[j][1] for j in rows], pad, device),
             ref[rows].to(device))
    return (batch + (torch.tensor([labels[j] for j in rows], device=device),)
            if cfg.loss == "kto" else batch)


def make_batches(data, step, cfg, run, pad):
    """This rank's micro-batches of the step's global batch, and their weights (each
    one's share of the rank's pairs). A pair's two answers stay in one micro-batch. KTO
    keeps its micro-batches as drawn: its reference point z0 is estimated from each one,
    and a run of answers of one length would bias it."""
    seqs, items = data[:2]
    idx = distributed.global_batch(len(items), step, cfg.batch_size, cfg.seed)
    chunks = distributed.rank_chunks(idx, run, cfg.grad_accum)
    if cfg.loss != "kto":
        chunks = [group for c in chunks for group in length_groups(
            c, lambda i: max(len(seqs[items[i][0]][0]), len(seqs[items[i][1]][0])),
            cfg.length_groups)]
    n = sum(map(len, chunks))
    return [make_batch(data, c, cfg, pad, run.device) for c in chunks], [len(c) / n for c in chunks]


@torch.no_grad()
def validate(model, data, cfg, pad, device, chunk=256):
    """The loss and diagnostics over every held-out pair (kto: response)."""
    n, totals = len(data[1]), {}
    for i in range(0, n, chunk):
        items = list(range(i, min(n, i + chunk)))
        loss, diag = batch_loss(model, make_batch(data, items, cfg, pad, device), cfg)
        for k, v in {"loss": loss.item(), **diag}.items():
            totals[k] = totals.get(k, 0.0) + v * len(items) / n
    return totals


@torch.no_grad()
def kl_to_reference(policy, ref, enc, prompts, cfg, device, stop=None):
    """Monte-Carlo KL(π‖π_ref): mean over sampled responses of Σ_t log π − log π_ref.
    prompts: the world's texts, or token lists in the model's chat format (stop: its end
    token)."""
    samples = sample_responses(policy, enc, prompts, cfg.max_new_tokens, 1.0, cfg.seed, device,
                               batch_size=len(prompts), stop=stop)
    longest = max(len(p) + len(r) for p, r in samples)
    kls = sequence_kl(policy, ref, samples, enc.encode_single_token("<|endoftext|>"), device,
                      batch_size=rows_per_pass(longest, policy.config.vocab_size, len(samples)))
    return sum(kls) / len(kls)


# the losses each loss-specific flag is read by (the others ignore it)
READ_BY = dict(beta=("dpo", "cdpo", "ipo", "kto"), label_smoothing=("cdpo",),
               simpo_beta=("simpo",), simpo_gamma=("simpo",), orpo_lambda=("orpo",),
               kto_desirable_weight=("kto",), kto_undesirable_weight=("kto",),
               length_groups=("dpo", "cdpo", "ipo", "simpo", "orpo"))


def refuse_settings_that_train_nothing(cfg):
    """Settings under which the chosen loss is constant (its gradient zero) or undefined,
    and a term asked of a loss it does not go with."""
    refuse_unused(cfg, [f for f, losses in READ_BY.items() if cfg.loss not in losses],
                  f"with --loss={cfg.loss}")
    refuse_unused(cfg, ["prefs"] if cfg.data else ["val_fraction"],
                  "with --data" if cfg.data else "without --data")
    if cfg.loss in ("dpo", "cdpo", "ipo", "kto") and cfg.beta <= 0:
        why = "divides by β" if cfg.loss == "ipo" else "is then constant and trains nothing"
        raise UserError(f"--beta={cfg.beta}: the {cfg.loss} loss {why}; use β > 0")
    if cfg.loss == "simpo" and cfg.simpo_beta <= 0:
        raise UserError(f"--simpo_beta={cfg.simpo_beta}: the simpo loss is then constant and "
                        f"trains nothing; use a value > 0")
    if cfg.loss == "cdpo" and cfg.label_smoothing >= 0.5:
        raise UserError(f"--label_smoothing={cfg.label_smoothing}: at 0.5 or more cdpo trusts the "
                        f"flipped labels as much as the labels or more; use a value below 0.5")
    if cfg.nll_coef and cfg.loss not in ("dpo", "cdpo", "ipo"):
        raise UserError(f"--nll_coef={cfg.nll_coef} with --loss={cfg.loss}: the NLL term goes "
                        f"beside dpo, cdpo or ipo (orpo has its own)")
    if cfg.loss == "kto" and cfg.kto_desirable_weight == cfg.kto_undesirable_weight == 0:
        raise UserError("--kto_desirable_weight=0 and --kto_undesirable_weight=0: the kto loss is "
                        "then zero and trains nothing")


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, run)
    if cfg.loss not in LOSSES:
        raise UserError(f"--loss={cfg.loss}: expected one of {', '.join(LOSSES)}")
    refuse_settings_that_train_nothing(cfg)
    cfg = replace(cfg, learning_rate=cfg.learning_rate or LEARNING_RATES[cfg.loss])  # as logged
    out_dir = cfg.out_dir or os.path.join("out", cfg.loss)
    # a model fine-tuned from GPT-2 carries its tokenizer and chat format
    ref, enc, chat, carried = stage_model(cfg.init_from, "python sft.py",
                                          cfg.data_dir, run.device)
    raw_model = copy.deepcopy(ref).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    pad, end = enc.encode_single_token("<|endoftext|>"), formats.end_token(enc, chat)
    if cfg.data:
        (seqs, pairs, desirable), (vseqs, vpairs, vdesirable), prompts = own_sets(
            cfg.data, enc, chat, ref.config.block_size, cfg.val_fraction)
        room = ref.config.block_size - cfg.max_new_tokens  # the KL samples' prompts must fit
        prompts = [p for p in prompts if len(p) <= room][:cfg.kl_prompts]
        if not prompts:
            raise UserError(f"--max_new_tokens={cfg.max_new_tokens}: no held-out prompt of "
                            f"{cfg.data} leaves that many tokens of the context; lower it")
    else:
        seqs, pairs, desirable = load_sets(cfg.data_dir, cfg.prefs, "train", enc,
                                           ref.config.block_size)
        vseqs, vpairs, vdesirable = load_sets(cfg.data_dir, cfg.prefs, "val", enc,
                                              ref.config.block_size)
        prompts = [r["prompt"] for r in read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"),
                                                   {"prompt": str})][:cfg.kl_prompts]
    # the frozen reference's log-probs, once (simpo and orpo do not use them; they are logged)
    ref_lp = reference_logps(ref, seqs, pad, run.device).cpu()
    vref_lp = reference_logps(ref, vseqs, pad, run.device).cpu()
    items = list(range(len(seqs))) if cfg.loss == "kto" else pairs
    vitems = list(range(len(vseqs))) if cfg.loss == "kto" else vpairs
    data, vdata = (seqs, items, ref_lp, desirable), (vseqs, vitems, vref_lp, vdesirable)
    print0(f"--loss={cfg.loss}: {len(items)} {'responses' if cfg.loss == 'kto' else 'pairs'} "
           f"({len(vitems)} held out), {cfg.max_steps} steps of {cfg.batch_size} on {run.device}")

    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), run.device_type)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(out_dir, run, (cfg.loss, *LOSSES))  # this run's folder until it ends
    guard = optim.NonFiniteGuard(ckpt_path=ckpt_path)  # its counts resume with the run
    step = checkpoint.resume(ckpt_path, cfg.loss, raw_model, optimizer,
                             guard=guard)[0] if cfg.resume else 0
    model = distributed.wrap(raw_model, run, cfg.compile)
    log = Logger(out_dir, cfg, cfg.max_steps, cfg.log_interval, run.master, start_step=step)
    stop = distributed.StopSignal()

    max_norm = cfg.grad_clip or math.inf  # 0: no clipping
    while step < cfg.max_steps:
        lr = optim.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
        optim.set_lr(optimizer, lr)
        # forward and backward over this rank's micro-batches; the loss is their weighted mean
        batches, weights = make_batches(data, step, cfg, run, pad)
        loss, metrics = 0.0, {}
        for i, (batch, w) in enumerate(zip(batches, weights)):
            with distributed.grad_sync(model, run, last=i == len(batches) - 1), run.autocast:
                micro_loss, diagnostics = batch_loss(model, batch, cfg)
            (micro_loss * w).backward()
            loss += micro_loss.item() * w
            for k, v in diagnostics.items():  # the diagnostics, weighted as the loss
                metrics[k] = metrics.get(k, 0.0) + v * w
        # the loss and the diagnostics averaged over the ranks, as one step's figures
        loss, *averaged = distributed.all_reduce_mean([loss, *metrics.values()], run)
        metrics = dict(zip(metrics, averaged))
        # clip; step unless the loss or the gradient is not finite; zero
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if guard.ok(grad_norm, step, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics.update(loss=loss, lr=lr, grad_norm=grad_norm, **guard.logged())
        step += 1
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            raw_model.eval()
            metrics.update({f"val/{k}": v
                            for k, v in validate(raw_model, vdata, cfg, pad, run.device).items()})
            metrics["objective/kl"] = kl_to_reference(raw_model, ref, enc, prompts, cfg, run.device,
                                                      end)
            raw_model.train()
        log.step(step - 1, sum(b[0].tokens.numel() for b in batches) * run.world_size,
                 force="objective/kl" in metrics, **metrics)
        stop.checkpoint(run, step, step % cfg.ckpt_interval == 0 or step == cfg.max_steps,
                        ckpt_path, lambda: checkpoint.save(ckpt_path, checkpoint.stage_checkpoint(
                            cfg.loss, raw_model, cfg, step, optimizer, enc, guard,
                            **carried)))  # also on SIGTERM
    print0(f"done: checkpoint {ckpt_path}")
    lock.release()
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
