"""Pretraining: a small GPT learns to predict the next token of the world's corpus.

The result is a base model. It knows the facts and spellings stated in the corpus and
has seen worked examples, but it continues text: given a question it writes more
questions or forum chatter, and it has never seen the chat markers.

The optimizer is Muon for the blocks' weight matrices and AdamW for the embeddings and
LayerNorm gains (optim.Muon, one learning rate for both). On the default world, 500
steps of it at a peak rate of 6e-3 reach a lower validation loss than 1,000 steps of
AdamW at 3e-3, the default before it, and a better SFT model (RESULTS.md, "Muon:
pretraining in half the steps"). --optimizer=adamw --max_steps=1000 --learning_rate=3e-3
--warmup_steps=100 is the run before.

    python data/prepare.py && python pretrain.py                 # CPU
    python pretrain.py --device=cuda --compile=true              # one GPU
    torchrun --standalone --nproc_per_node=2 pretrain.py         # DDP (CPU: gloo, GPU: nccl)
    python pretrain.py --resume=true                             # continue out/pretrain

GPU-sized preset (one GPU, bf16 autocast): --n_layer=12 --n_head=12 --n_embd=768
--block_size=1024 --batch_size=64 --max_steps=5000 --learning_rate=6e-4 --compile=true --device=cuda
"""

import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

import checkpoint
import distributed
import optim
from batch import token_windows
from cli import UserError, parse_config, ranges, user_errors
from distributed import print0
from logger import Logger
from model import GPT, GPTConfig
from records import token_stream, world_tokenizer


@dataclass
class Config:
    data_dir: str = "data/world"   # folder written by data/prepare.py
    out_dir: str = "out/pretrain"  # checkpoint and log go here
    # model
    n_layer: int = 4               # transformer blocks
    n_head: int = 4                # attention heads
    n_embd: int = 128              # width
    block_size: int = 128          # context length in tokens
    dropout: float = 0.0           # dropout rate (0 suits a model this small)
    # optimisation
    batch_size: int = 64           # sequences per optimizer step, over all ranks and micro-steps
    grad_accum: int = 1            # micro-steps per optimizer step on each rank
    max_steps: int = 500           # optimizer steps
    learning_rate: float = 6e-3    # peak learning rate
    warmup_steps: int = 50         # linear warmup, then cosine decay to 10%
    optimizer: str = "muon"        # muon: Muon for the blocks' matrices, AdamW the rest; adamw
    weight_decay: float = 0.1      # decay, matrices only
    beta1: float = 0.9             # AdamW beta1
    beta2: float = 0.95            # AdamW beta2
    grad_clip: float = 1.0         # clip the gradient norm (0 = off)
    # bookkeeping
    eval_interval: int = 200       # steps between validation losses
    eval_batches: int = 8          # draws of 64 validation windows per validation loss
    log_interval: int = 50         # steps between log lines
    ckpt_interval: int = 200       # steps between checkpoints
    seed: int = 1337               # same seed, same numbers (on CPU)
    device: str = "auto"           # auto, cpu, cuda, cuda:N or mps
    compile: bool = False          # torch.compile the model
    resume: bool = False           # continue from out_dir/ckpt.pt

    RANGES: ClassVar = ranges(
        at_least_1="n_layer n_head n_embd block_size batch_size grad_accum max_steps eval_interval "
                   "eval_batches log_interval ckpt_interval",
        non_negative="warmup_steps weight_decay grad_clip", positive="learning_rate",
        below_1="dropout beta1 beta2")


VAL_DRAW = 64  # windows per validation draw


def window_starts(data, seed, step, n, block_size):
    """n window starts drawn from (seed, step) alone: the same on every rank and after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(len(data) - block_size - 1, (n,), generator=g)


def micro_batches(data, step, seed, cfg, run):
    """The global batch of a step; each rank takes its slice and splits it into micro-batches."""
    starts = window_starts(data, seed, step, cfg.batch_size, cfg.block_size)
    return [token_windows(data, s, cfg.block_size, run.device)
            for s in distributed.rank_chunks(starts, run, cfg.grad_accum)]


@torch.no_grad()
def val_loss(model, data, cfg, run):
    """Mean loss on fixed validation windows: eval_batches draws of VAL_DRAW windows, the
    same at every evaluation and whatever --batch_size, so that runs with different batch
    sizes are scored on the same text. Each draw is shared out over the ranks and cut into
    micro-batches no larger than training's."""
    model.eval()
    micro = distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, run)
    total, count = 0.0, 0
    for i in range(cfg.eval_batches):
        mine = window_starts(data, 999_983, i, VAL_DRAW, cfg.block_size)[run.rank::run.world_size]
        for j in range(0, len(mine), micro):
            x, y = token_windows(data, mine[j:j + micro], cfg.block_size, run.device)
            total, count = total + model(x, y)[1].item() * len(x), count + len(x)
    model.train()
    return distributed.all_reduce_mean(total, run) / distributed.all_reduce_mean(count, run)


def main(cfg):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, run)
    enc = world_tokenizer(cfg.data_dir)
    # every window is --block_size tokens and the next one
    train_data, val_data = (token_stream(os.path.join(cfg.data_dir, name), enc.n_vocab,
                                         cfg.block_size + 2) for name in ("train.bin", "val.bin"))

    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd} must be divisible by --n_head={cfg.n_head} "
                        f"(the heads split it)")
    mconf = GPTConfig(block_size=cfg.block_size, vocab_size=enc.n_vocab, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    raw_model = GPT(mconf).to(run.device)
    optimizer = optim.pretrain_optimizer(raw_model, cfg.optimizer, cfg.weight_decay,
                                         cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                         run.device_type)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(cfg.out_dir, run, ("pretrain",))  # this run's folder until it ends
    guard = optim.NonFiniteGuard(ckpt_path=ckpt_path)  # its counts resume with the run
    step = checkpoint.resume(ckpt_path, "pretrain", raw_model, optimizer,  # states differ
                             same=dict(optimizer=cfg.optimizer),
                             guard=guard)[0] if cfg.resume else 0
    model = distributed.wrap(raw_model, run, cfg.compile)
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {cfg.max_steps} steps of "
           f"{cfg.batch_size} x {cfg.block_size} tokens; "
           f"{run.world_size} process(es) on {run.device}")
    log = Logger(cfg.out_dir, cfg, cfg.max_steps, cfg.log_interval, run.master, start_step=step)
    flops_per_step = raw_model.flops_per_token(cfg.block_size) * cfg.batch_size * cfg.block_size
    peak = distributed.peak_flops(run.device)
    val = float("nan")
    stop = distributed.StopSignal()

    max_norm = cfg.grad_clip or math.inf  # 0: no clipping
    while step < cfg.max_steps:
        t0 = time.time()
        lr = optim.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
        optim.set_lr(optimizer, lr)
        # forward and backward over this rank's micro-batches; the loss is their mean
        micro = micro_batches(train_data, step, cfg.seed, cfg, run)
        loss = 0.0
        for i, (x, y) in enumerate(micro):
            with distributed.grad_sync(model, run, last=i == len(micro) - 1), run.autocast:
                _, micro_loss = model(x, y)
            (micro_loss * (1.0 / len(micro))).backward()
            loss += micro_loss.item() * (1.0 / len(micro))
        loss = distributed.all_reduce_mean(loss, run)
        # clip; step unless the loss or the gradient is not finite; zero
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if guard.ok(grad_norm, step, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0

        metrics = dict(loss=loss, lr=lr, grad_norm=grad_norm, **guard.logged())
        if peak:
            metrics["mfu"] = flops_per_step / dt / (peak * run.world_size)
        step += 1
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val = metrics["val_loss"] = val_loss(model, val_data, cfg, run)
        log.step(step - 1, cfg.batch_size * cfg.block_size, force="val_loss" in metrics, **metrics)
        stop.checkpoint(run, step, step % cfg.ckpt_interval == 0 or step == cfg.max_steps,
                        ckpt_path, lambda: checkpoint.save(ckpt_path, checkpoint.stage_checkpoint(
                            "pretrain", raw_model, cfg, step, optimizer, enc, guard,
                            val_loss=val)))  # also on SIGTERM
    said = (f"val loss {val:.4f}" if not math.isnan(val)  # nan: no step was left to take
            else f"nothing left to do at step {step} of --max_steps={cfg.max_steps}")
    print0(f"done: {said}; checkpoint {ckpt_path}")
    lock.release()
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
