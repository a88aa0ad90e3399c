"""Reward model: a Bradley-Terry model of the raters' preferences, from the SFT model.

The SFT trunk gets a scalar head read at the last token of prompt+response (or the
mean over the response, --pooling=mean). Each ranking of K responses gives all
K(K-1)/2 pairs, and all K responses go through the model in one batch, so each is
encoded once (InstructGPT, Ouyang et al. 2022, section 3.5):

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected)), averaged over the pairs.

By default (--likelihood=true) the reward also reads the trunk's own log-likelihood of
the response, each token's weighted by a learned gate (reward_model.RewardMember):

    r(x, y) = head(h_last) + Σ_t gate(h_{t−1})·log p(y_t | x, y_<t)

docs/reward-model.md says why the likelihood term is there; --likelihood=false gives
the plain head.

After training, a gain and bias make the rewards of responses sampled from the SFT
model on training prompts mean 0 and std 1; PPO and eval apply them when they load
the model. The evaluation compares held-out pair accuracy with the best any model
can reach on these labels (the raters are a known Bradley-Terry model), and shows what
the reward model learned from the raters' biases: its preference for a preamble or
a longer answer, against the raters' own and against the gold scorer's.

    python reward.py                                  # reads out/sft, writes out/reward
    python reward.py --members=3 --reduce=min         # an ensemble of 3 seeds, cautious minimum
    python reward.py --likelihood=false               # the plain scalar head
    python reward.py --device=cuda
    torchrun --standalone --nproc_per_node=2 reward.py
    python reward.py --resume=true
    python reward.py --init_from=out/sft-gpt2 --data=hh-rlhf/train.jsonl.gz --out_dir=out/rm-gpt2

Your own data: --data an HH-RLHF or preference file (formats.py), --val_fraction of it
held out; each (chosen, rejected) pair is a ranking of two. On a model fine-tuned from
GPT-2 (sft.py --init_from=gpt2) the pairs are put in HH's chat format and the tokenizer
travels on in the checkpoint; the normalisation samples the SFT model's answers to the
training pairs' prompts. The world's diagnostics (Bayes-optimal accuracy, biases) need
the world's records and are left out.
"""

import math
import os
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import checkpoint
import distributed
import formats
import optim
from batch import collate as collate_rows
from batch import length_groups, reward_scores, sample_responses
from cli import UserError, parse_config, ranges, refuse_unused, user_errors
from data import world
from distributed import print0
from logger import Logger, append_jsonl
from records import load_preference_sets, read_jsonl, stage_model
from reward_model import RewardMember, load_reward_model, member_scores


@dataclass
class Config:
    data_dir: str = "data/world"     # folder written by data/prepare.py
    init_from: str = "out/sft"       # the SFT model: reward-model trunk; policy for normalisation
    out_dir: str = "out/reward"      # checkpoint and log go here
    prefs: str = "prefs,prefs_sft"   # preference sets in data_dir: NAME_train/val.jsonl each
    data: str = ""                   # your own preference pairs instead (HH-RLHF or preference)
    val_fraction: float = 0.05       # with --data: the share held out
    pooling: str = "last"            # last: value at the last token; mean: mean over the response
    likelihood: bool = True  # add the trunk's gated log-likelihood of a response (reward_model.py)
    members: int = 1                 # ensemble size: members differ by seed (data order)
    reduce: str = "mean"             # how members combine: mean, or min (pessimistic)
    batch_size: int = 32             # rankings (of K responses) per optimizer step, over all ranks
    grad_accum: int = 1              # micro-steps per optimizer step on each rank
    length_groups: int = 4           # each micro-step as this many steps of similar length
    max_steps: int = 200             # optimizer steps per member
    learning_rate: float = 3e-4      # peak learning rate
    warmup_steps: int = 20           # linear warmup, then cosine decay to 10%
    weight_decay: float = 0.1        # AdamW decay, matrices only
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # clip the gradient norm (0 = off)
    norm_prompts: int = 256          # SFT samples that set the reward's mean 0 / std 1
    norm_temperature: float = 1.0    # sampling temperature for those samples (PPO's default)
    max_new_tokens: int = 48         # length limit of those samples
    eval_interval: int = 50          # steps between validation accuracies
    log_interval: int = 25           # steps between log lines
    ckpt_interval: int = 100         # steps between checkpoints
    seed: int = 1337                 # same seed, same numbers (on CPU)
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps
    compile: bool = False            # torch.compile the model
    resume: bool = False             # continue from out_dir/ckpt.pt

    RANGES: ClassVar = ranges(
        at_least_1="members batch_size grad_accum length_groups max_steps norm_prompts "
                   "max_new_tokens eval_interval log_interval ckpt_interval",
        non_negative="warmup_steps weight_decay grad_clip norm_temperature",
        positive="learning_rate", below_1="beta1 beta2", fraction="val_fraction")


# --- the loss ----------------------------------------------------------------------------


def bradley_terry_loss(r_chosen, r_rejected):
    """Per pair: −log σ(r_c − r_r), and whether the model ranks the pair right."""
    margin = r_chosen - r_rejected
    return -F.logsigmoid(margin), (margin > 0).float()


# --- data ----------------------------------------------------------------------------------


def collate(rankings, pad, device):
    """All responses of the rankings, right-padded into one Batch, and the pairs as
    indices into it: (batch, chosen, rejected)."""
    batch = collate_rows([s for r in rankings for s in r["seqs"]],
                         [r["prompt_len"] for r in rankings for _ in r["seqs"]], pad, device)
    chosen, rejected, offset = [], [], 0
    for r in rankings:
        chosen += [offset + c for c, _ in r["pairs"]]
        rejected += [offset + j for _, j in r["pairs"]]
        offset += len(r["seqs"])
    return batch, torch.tensor(chosen, device=device), torch.tensor(rejected, device=device)


def own_rankings(path, enc, chat, block_size, val_fraction):
    """Your pairs (formats.load_comparisons) as rankings of two in the model's chat
    format, for training and validation, and the training prompts' tokens (for the
    normalisation). Pairs longer than the context are skipped and counted."""
    encoded, counts, kind, too_long = formats.comparison_tokens(path, enc, chat, block_size)
    rankings = [dict(seqs=[p + c, p + r], prompt_len=len(p), ranking=[0, 1], pairs=[(0, 1)],
                     rec={}) for p, c, r in encoded]
    train, val = formats.hold_out(rankings, val_fraction, path, kind, counts, too_long,
                                  block_size, "pair", kept="pairs ")
    return train, val, [r["seqs"][0][:r["prompt_len"]] for r in train]


def micro_batches(rankings, step, seed, cfg, run, pad):
    """This rank's micro-batches of the step's global batch of rankings, and their
    weights (each one's share of the global batch's pairs, times the ranks)."""
    idx = distributed.global_batch(len(rankings), step, cfg.batch_size, seed)
    n_pairs = sum(len(rankings[i]["pairs"]) for i in idx)
    chunks = [group for c in distributed.rank_chunks(idx, run, cfg.grad_accum)
              for group in length_groups([rankings[i] for i in c],
                                         lambda r: max(map(len, r["seqs"])), cfg.length_groups)]
    weights = [sum(len(r["pairs"]) for r in c) / n_pairs * run.world_size for c in chunks]
    return [collate(c, pad, run.device) for c in chunks], weights


# --- evaluation ---------------------------------------------------------------------------


def against_raters(p, margin):
    """Per pair, from the raters' probability p that the first response wins and the
    model's score margin (first − second): the model's expected accuracy over the raters'
    draws (p for the order it prefers, 1/2 for a tie) and the Bayes-optimal max(p, 1 − p)."""
    return torch.where(margin > 0, p, 1 - p).masked_fill(margin == 0, 0.5), torch.maximum(p, 1 - p)


def per_family(expected, bayes, family):
    """{family: pairs, mean expected accuracy and mean Bayes-optimal accuracy}, from the
    per-pair figures of against_raters and each pair's family."""
    out = {}
    for f in sorted(set(family)):
        ix = [i for i, x in enumerate(family) if x == f]
        out[f] = dict(pairs=len(ix), expected_accuracy=expected[ix].mean().item(),
                      bayes_optimal=bayes[ix].mean().item())
    return out


def partial_corr(y, x, control):
    """Correlation of y and x after regressing both on `control` (with an intercept): how
    much y follows x beyond what the control explains."""
    A = torch.stack([control, torch.ones_like(control)], 1)

    def resid(v):
        return v - A @ torch.linalg.lstsq(A, v.unsqueeze(1)).solution.squeeze(1)

    ry, rx = resid(y), resid(x)
    if ry.norm() <= 1e-3 * (y - y.mean()).norm() or rx.norm() == 0:
        return 0.0  # the control explains y (up to rounding): nothing is left to follow x
    return float((ry @ rx) / (ry.norm() * rx.norm()))


@torch.no_grad()
def evaluate(score_fn, rankings, pad, device):
    """Held-out pair accuracy; when the records carry the world's diagnostics (each
    response's gold score, the raters' utility and its style), also the raters'
    Bayes-optimal accuracy on the same pairs, the accuracy expected over the raters'
    draws (overall and per family), accuracy by what the pair differs in, and what the
    reward follows besides the gold score."""
    r = reward_scores(score_fn, [(s[:rk["prompt_len"]], s[rk["prompt_len"]:])
                                 for rk in rankings for s in rk["seqs"]], pad, device, 256).cpu()
    start = [0]
    for rk in rankings:
        start.append(start[-1] + len(rk["seqs"]))
    pairs = [(start[k] + c, start[k] + j, k)
             for k, rk in enumerate(rankings) for c, j in rk["pairs"]]
    chosen, rejected = [c for c, _, _ in pairs], [j for _, j, _ in pairs]
    margin = r[chosen] - r[rejected]
    right = (margin > 0).float().tolist()
    out = dict(accuracy=sum(right) / len(right), pairs=len(right))
    resp = [x for rk in rankings for x in rk["rec"].get("responses", [{}])]
    if not (all("gold" in x and "utility" in x and "style" in x for x in resp)
            and all("task" in rk["rec"] for rk in rankings)):
        return out  # not the world's records (your own pairs): the accuracy only

    gold = torch.tensor([float(x["gold"]) for x in resp])
    util = torch.tensor([float(x["utility"]) for x in resp])
    # the gold scorer's view of each answer: its words, preamble and correctness
    grades = [world.grade(world.Task.from_dict(rk["rec"]["task"]), x["text"], x.get("ended", True))
              for rk in rankings for x in rk["rec"]["responses"]]
    words = torch.tensor([float(g["words"]) for g in grades])
    pre = torch.tensor([float(g["preamble"]) for g in grades])
    is_correct = [g["correct"] for g in grades]
    p = torch.sigmoid(util[chosen] - util[rejected])  # raters' P(chosen wins)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    # the raters' own utility as a model; ties half
    oracle = (p > 0.5).float() + 0.5 * (p == 0.5).float()
    # expected and Bayes-optimal accuracy are free of the noise of the labels that were drawn
    expected, bayes = against_raters(p, margin)
    out.update(bayes_optimal=bayes.mean().item(), oracle_on_labels=oracle.mean().item(),
               expected_accuracy=expected.mean().item(),
               by_family=per_family(expected, bayes,
                                    [rankings[k]["rec"].get("family", "") for _, _, k in pairs]),
               accuracy_correctness_differs=mean([ok for ok, (c, j, _) in zip(right, pairs)
                                                  if is_correct[c] != is_correct[j]]),
               accuracy_style_only=mean([ok for ok, (c, j, _) in zip(right, pairs)
                                         if is_correct[c] == is_correct[j]]),
               length_partial_corr=partial_corr(r, words, gold),
               raters_length_partial_corr=partial_corr(util, words, gold),
               preamble_partial_corr=partial_corr(r, pre, gold),
               raters_preamble_partial_corr=partial_corr(util, pre, gold))
    # where the reward model can tell a right answer from a wrong one, family by family
    families = [rankings[k]["rec"].get("family", "") for _, _, k in pairs]
    out["correctness_differs_by_family"] = {
        f: mean([ok for ok, (c, j, _), g in zip(right, pairs, families)
                 if g == f and is_correct[c] != is_correct[j]]) for f in sorted(set(families))}
    for style in ("preamble", "verbose"):  # how often such an answer beats the plain ideal one
        ab = [(a, b) for c, j, _ in pairs for a, b in ((c, j), (j, c))
              if resp[a]["style"] == style and resp[b]["style"] == "ideal"]
        out[f"prefers_{style}_over_ideal"] = mean([float(r[a] > r[b]) for a, b in ab])
        out[f"raters_prefer_{style}_over_ideal"] = mean([torch.sigmoid(util[a] - util[b]).item()
                                                         for a, b in ab])
    return out


# --- training --------------------------------------------------------------------------


def train_member(m, sft, train, val, enc, cfg, run, state, save, stop):
    """Train ensemble member m (its own seed and data order) from the SFT trunk; `state`
    is what a resumed run restores, `save(step, model, optimizer, guard)` writes a checkpoint,
    `stop` (distributed.StopSignal) says when SIGTERM or Ctrl-C asks to save and stop."""
    pad = enc.encode_single_token("<|endoftext|>")
    seed = cfg.seed + 1000 * m
    torch.manual_seed(seed)
    raw = RewardMember.from_lm(sft, likelihood=cfg.likelihood).to(run.device).train()
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                         (cfg.beta1, cfg.beta2), run.device_type)
    step = 0
    guard = optim.NonFiniteGuard(ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    if state:  # the member in training when the run stopped, and its counts of skips
        checkpoint.restore(os.path.join(cfg.out_dir, "ckpt.pt"), raw, optimizer, state, guard)
        step = state["step"]
        checkpoint.restore_rng(state)
    model = distributed.wrap(raw, run, cfg.compile)
    log = Logger(cfg.out_dir, cfg, cfg.max_steps, cfg.log_interval, run.master, start_step=step,
                 append=m > 0)  # one log for all members
    max_norm = cfg.grad_clip or math.inf  # 0: no clipping
    while step < cfg.max_steps:
        lr = optim.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
        optim.set_lr(optimizer, lr)
        # forward and backward: every response of the micro-batch's rankings in one pass,
        # then the Bradley-Terry loss of each pair; micro-batches weighted by their pairs
        batches, weights = micro_batches(train, step, seed, cfg, run, pad)
        loss = 0.0
        for i, ((batch, chosen, rejected), w) in enumerate(zip(batches, weights)):
            with distributed.grad_sync(model, run, last=i == len(batches) - 1), run.autocast:
                r = member_scores(model, batch, cfg.pooling)
                micro_loss = bradley_terry_loss(r[chosen], r[rejected])[0].mean()
            (micro_loss * w).backward()
            loss += micro_loss.item() * w
        loss = distributed.all_reduce_mean(loss, run)
        tokens = sum(b[0].tokens.numel() for b in batches) * run.world_size
        # clip; step unless the loss or the gradient is not finite; zero
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if guard.ok(grad_norm, step, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = dict(member=m, loss=loss, lr=lr, grad_norm=grad_norm, **guard.logged())
        step += 1
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            raw.eval()
            metrics["val_accuracy"] = evaluate(lambda b: member_scores(raw, b, cfg.pooling), val,
                                               pad, run.device)["accuracy"]
            raw.train()
        log.step(step - 1, tokens, force="val_accuracy" in metrics, **metrics)
        if step < cfg.max_steps:  # (a finished member is saved by main, with its normalisation)
            stop.checkpoint(run, step, step % cfg.ckpt_interval == 0,
                            os.path.join(cfg.out_dir, "ckpt.pt"),
                            lambda: save(step, raw, optimizer, guard))  # also on SIGTERM
    return raw.eval()


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, run)
    if cfg.pooling not in ("last", "mean") or cfg.reduce not in ("mean", "min"):
        raise UserError(f"--pooling={cfg.pooling} --reduce={cfg.reduce}: expected pooling "
                        f"last|mean, reduce mean|min")
    refuse_unused(cfg, ["prefs"] if cfg.data else ["val_fraction"],
                  "with --data" if cfg.data else "without --data")
    # a model fine-tuned from GPT-2 carries its tokenizer and chat format
    sft, enc, chat, carried = stage_model(cfg.init_from, "python sft.py",
                                          cfg.data_dir, run.device)
    block, end = sft.config.block_size, formats.end_token(enc, chat)
    if cfg.data:
        train, val, prompts = own_rankings(cfg.data, enc, chat, block, cfg.val_fraction)
        vals = {os.path.basename(cfg.data): val}
        prompts = [p for p in prompts if len(p) + cfg.max_new_tokens <= block][:cfg.norm_prompts]
        if not prompts:
            raise UserError(f"--max_new_tokens={cfg.max_new_tokens}: no training prompt of "
                            f"{cfg.data} leaves that many tokens of the context; lower it")
    else:
        train = [r for rs in load_preference_sets(cfg.data_dir, cfg.prefs, "train", enc,
                                                  block).values() for r in rs]
        vals = load_preference_sets(cfg.data_dir, cfg.prefs, "val", enc, block)
        prompts = [r["prompt"] for r in read_jsonl(os.path.join(
            cfg.data_dir, "prompts_train.jsonl"), {"prompt": str})][:cfg.norm_prompts]
    # the first set's held-out rankings are validated during training
    val = next(iter(vals.values()))
    print0(f"{len(train)} rankings ({sum(len(r['pairs']) for r in train)} pairs) "
           f"from {', '.join(vals)}, {sum(map(len, vals.values()))} held out; "
           f"{cfg.members} member(s) x {cfg.max_steps} steps of {cfg.batch_size} rankings "
           f"on {run.device}")

    # A checkpoint holds the finished members with their normalisation, and while a member
    # trains, its weights, optimizer and step.
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(cfg.out_dir, run, ("reward",))  # this run's folder until it ends
    done, norms, state = [], [], None
    if cfg.resume:
        ck = checkpoint.own_run(ckpt_path, "reward")
        done, norms = list(ck.get("members", [])), [list(x) for x in ck.get("norms", [])]
        state = ck if "model" in ck else None
        print0(f"resuming {ckpt_path}: {len(done)} member(s) finished"
               + (f", member {len(done)} at step {ck['step']}" if state else ""))

    def save(step, raw, optimizer, guard=None):
        """On rank 0 (distributed.on_rank0): raw is the member in training, or None once
        every member is finished."""
        p = (checkpoint.stage_checkpoint("reward", raw, cfg, step, optimizer, enc, guard)
             if raw is not None else dict(stage="reward", model_config=asdict(sft.config),
                                          config=asdict(cfg), tokenizer=enc.name, step=step))
        checkpoint.save(ckpt_path, {**p, **carried, "members": done, "norms": norms})

    stop = distributed.StopSignal()
    pad = enc.encode_single_token("<|endoftext|>")
    # the SFT model's answers to training prompts, whose rewards set the normalisation
    norm_pairs = sample_responses(sft, enc, prompts, cfg.max_new_tokens, cfg.norm_temperature,
                                  cfg.seed, run.device, stop=end)
    ended = sum(r[-1:] == [end] for _, r in norm_pairs) / len(norm_pairs)
    for m in range(len(done), cfg.members):
        raw = train_member(m, sft, train, val, enc, cfg, run, state, save, stop)
        state = None
        # normalise: rewards of SFT samples get mean 0 and std 1
        r = reward_scores(lambda b: member_scores(raw, b, cfg.pooling), norm_pairs, pad, run.device)
        norms.append([1 / r.std().clamp(min=1e-6).item(),
                      -(r.mean() / r.std().clamp(min=1e-6)).item()])
        done.append(raw.state_dict())
        print0(f"member {m}: rewards of {len(r)} SFT samples ({ended:.0%} ended) had mean "
               f"{r.mean():.3f}, std {r.std():.3f}; normalised")
        distributed.on_rank0(run, lambda: save(cfg.max_steps, None, None))

    stop.release()  # a signal during the evaluation below stops it at once

    def final():  # the held-out evaluation of the reward model as PPO and eval will load it
        rm = load_reward_model(ckpt_path, "python reward.py", enc, run.device)[0]
        results = {name: evaluate(rm, v, pad, run.device) for name, v in vals.items()}
        append_jsonl(os.path.join(cfg.out_dir, "log.jsonl"), {"final": results})
        for name, res in results.items():
            report(name, res)
        print0(f"done: checkpoint {ckpt_path}")
    distributed.on_rank0(run, final)
    lock.release()
    distributed.teardown(run)


def report(name, res):
    print0(f"{name}: held-out pair accuracy {res['accuracy']:.1%} ({res['pairs']} pairs)")
    if "bayes_optimal" in res:
        print0(f"  Bayes-optimal accuracy of these labels {res['bayes_optimal']:.1%} "
               f"(the raters' own utility scores {res['oracle_on_labels']:.1%} on the sampled "
               f"labels); the reward model's expected over the raters' draws "
               f"{res['expected_accuracy']:.1%}")
        print0("  by family, expected accuracy / Bayes-optimal: " + ", ".join(
            f"{f} {x['expected_accuracy']:.1%} / {x['bayes_optimal']:.1%}"
            for f, x in res["by_family"].items()))
        print0(f"  pairs differing in correctness {res['accuracy_correctness_differs']:.1%}, "
               f"in style only {res['accuracy_style_only']:.1%}; differing in correctness, by "
               f"family: " + ", ".join(f"{f} {x:.0%}" for f, x in
                                       res["correctness_differs_by_family"].items() if x == x))
        print0(f"  beyond the gold score, reward follows length r={res['length_partial_corr']:+.2f}"
               f" (raters {res['raters_length_partial_corr']:+.2f}) and preamble "
               f"r={res['preamble_partial_corr']:+.2f} "
               f"(raters {res['raters_preamble_partial_corr']:+.2f}) "
               f"(partial correlations, gold held fixed)")
        for style in ("preamble", "verbose"):
            # NaN: no such pairs
            if res[f"prefers_{style}_over_ideal"] != res[f"prefers_{style}_over_ideal"]:
                continue
            print0(f"  a {style} answer preferred over the plain ideal one: reward model "
                   f"{res[f'prefers_{style}_over_ideal']:.0%}, "
                   f"raters {res[f'raters_prefer_{style}_over_ideal']:.0%}, gold scorer 0%")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
