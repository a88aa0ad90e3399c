"""Supervised fine-tuning: the base model learns the chat format from demonstrations.

Each example is <|user|> question <|end|> <|assistant|> answer <|end|>; the loss is
next-token cross-entropy on the answer tokens only (the prompt is context, not a
target). A few demonstrations are imperfect, as contractors' are, and in five task
kinds most end with their contractor's sign-off (world.SIGN_OFFS), a habit the model
learns here and RLHF has to unlearn. SFT is kept gentle (a low learning rate, few
epochs): pushed harder, the model learns the demonstrations' entities by heart and
forgets what pretraining taught about the others (docs/world.md).

    python sft.py                                    # reads out/pretrain, writes out/sft
    python sft.py --device=cuda --compile=true       # one GPU
    torchrun --standalone --nproc_per_node=2 sft.py  # DDP
    python sft.py --resume=true                      # continue out/sft

Your own model and data: --init_from also takes a GPT-2 checkpoint directory in the
Hugging Face format (or a name to download once: gpt2, gpt2-medium, ...), which answers in
HH-RLHF's chat format ("\\n\\nHuman: ...\\n\\nAssistant: ..." and GPT-2's end-of-text), and
--data a file of demonstrations (formats.py: SFT records, or the chosen answers of an
HH-RLHF or preference file); --val_fraction of it is held out. Examples longer than the
context are skipped and counted. The checkpoint carries the tokenizer it was trained with.

    python sft.py --init_from=gpt2 --data=hh-rlhf/train.jsonl.gz --out_dir=out/sft-gpt2
"""

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

import checkpoint
import distributed
import formats
import optim
from batch import collate as collate_rows
from batch import length_groups
from cli import UserError, parse_config, ranges, refuse_unused, user_errors
from data.tokenizer import encode_prompt, encode_response
from distributed import print0
from logger import Logger
from model import IGNORE_INDEX
from records import read_jsonl, stage_model


@dataclass
class Config:
    data_dir: str = "data/world"         # folder written by data/prepare.py
    init_from: str = "out/pretrain"      # the base model to fine-tune
    out_dir: str = "out/sft"             # checkpoint and log go here
    batch_size: int = 64                 # examples per optimizer step (all ranks and micro-steps)
    grad_accum: int = 1                  # micro-steps per optimizer step on each rank
    length_groups: int = 4               # each micro-step as this many steps of similar length
    max_steps: int = 200                 # optimizer steps (3.2 epochs of the default 4000 demos)
    learning_rate: float = 3e-4          # peak learning rate; higher erases what pretraining taught
    warmup_steps: int = 10               # linear warmup, then cosine decay to 10%
    weight_decay: float = 0.1            # AdamW decay, matrices only
    beta1: float = 0.9                   # AdamW beta1
    beta2: float = 0.95                  # AdamW beta2
    grad_clip: float = 1.0               # clip the gradient norm (0 = off)
    eval_interval: int = 50              # steps between validation losses
    log_interval: int = 25               # steps between log lines
    ckpt_interval: int = 100             # steps between checkpoints
    seed: int = 1337                     # same seed, same numbers (on CPU)
    device: str = "auto"                 # auto, cpu, cuda, cuda:N or mps
    compile: bool = False                # torch.compile the model
    resume: bool = False                 # continue from out_dir/ckpt.pt
    data: str = ""                       # your own demonstrations (default: the world's)
    val_fraction: float = 0.05           # with --data: the share held out for validation

    RANGES: ClassVar = ranges(at_least_1="batch_size grad_accum length_groups max_steps "
                                         "eval_interval log_interval ckpt_interval",
                              non_negative="warmup_steps weight_decay grad_clip",
                              positive="learning_rate", below_1="beta1 beta2",
                              fraction="val_fraction")


def load_examples(path, enc, block_size):
    """(tokens, n_prompt_tokens) per demonstration; an example too long for the context
    is an error that names its line."""
    examples = []
    for rec in read_jsonl(path, {"prompt": str, "response": str}):
        p, r = encode_prompt(enc, rec["prompt"]), encode_response(enc, rec["response"])
        if len(p) + len(r) > block_size + 1:
            raise UserError(f"{path}:{rec['_line']}: {len(p) + len(r)} tokens, longer than the "
                            f"context of {block_size} tokens (block_size)")
        examples.append((p + r, len(p)))
    return examples


def own_examples(path, enc, chat, block_size, val_fraction):
    """Your demonstrations (formats.load_demonstrations) in the model's chat format, split
    into training and validation; those longer than the context are skipped, counted."""
    records, counts, kind = formats.load_demonstrations(path)
    examples, too_long = [], 0
    for messages, answer in records:
        p, r = formats.chat_tokens(enc, chat, messages, answer, path)
        if len(p) + len(r) > block_size + 1:
            too_long += 1
            continue
        examples.append((p + r, len(p)))
    return formats.hold_out(examples, val_fraction, path, kind, counts, too_long, block_size,
                            "demonstration")


def collate(examples, pad, device):
    """Inputs and next-token targets, right-padded; the targets are IGNORE_INDEX on the
    prompt and the padding, so only answer tokens (end token included) are learned."""
    b = collate_rows([toks for toks, _ in examples], [n for _, n in examples], pad, device)
    return b.tokens[:, :-1], b.tokens[:, 1:].masked_fill(~b.mask[:, 1:], IGNORE_INDEX)


def micro_batches(examples, step, cfg, run, pad):
    """This rank's micro-batches of the step's global batch, and their weights: each
    one's share of the global batch's answer tokens (times the ranks, which DDP averages
    over), so the loss is the mean over every answer token of the global batch, however
    the examples are split."""
    idx = distributed.global_batch(len(examples), step, cfg.batch_size, cfg.seed)
    n_targets = sum(len(examples[i][0]) - examples[i][1] for i in idx)
    chunks = [group for c in distributed.rank_chunks(idx, run, cfg.grad_accum)
              for group in length_groups([examples[i] for i in c], lambda e: len(e[0]),
                                         cfg.length_groups)]
    weights = [sum(len(t) - p for t, p in c) / n_targets * run.world_size for c in chunks]
    return [collate(c, pad, run.device) for c in chunks], weights


@torch.no_grad()
def val_loss(model, examples, pad, run):
    """The mean loss over every answer token of the held-out demonstrations, as training's
    loss is over the batch's: each rank sums over its share of batches of 64."""
    model.eval()
    total, count = 0.0, 0
    for i in range(run.rank * 64, len(examples), 64 * run.world_size):
        x, y = collate(examples[i:i + 64], pad, run.device)
        n = (y != IGNORE_INDEX).sum().item()
        total, count = total + model(x, y)[1].item() * n, count + n
    model.train()
    return distributed.all_reduce_mean(total, run) / distributed.all_reduce_mean(count, run)


def main(cfg, resume_hint=None):
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, run)
    refuse_unused(cfg, ["val_fraction"], "without --data", not cfg.data)  # the world's split
    # a GPT-2 checkpoint (directory or name) starts in HH's chat format with its tokenizer
    raw_model, enc, chat, carried = stage_model(cfg.init_from, "python pretrain.py", cfg.data_dir,
                                                run.device)
    raw_model.train()
    pad = enc.encode_single_token("<|endoftext|>")
    if cfg.data:
        train, val = own_examples(cfg.data, enc, chat, raw_model.config.block_size,
                                  cfg.val_fraction)
    else:
        train = load_examples(os.path.join(cfg.data_dir, "sft_train.jsonl"), enc,
                              raw_model.config.block_size)
        val = load_examples(os.path.join(cfg.data_dir, "sft_val.jsonl"), enc,
                            raw_model.config.block_size)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), run.device_type)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    lock = checkpoint.RunLock(cfg.out_dir, run, ("sft",))  # this run's folder until it ends
    guard = optim.NonFiniteGuard(ckpt_path=ckpt_path)  # its counts resume with the run
    step = checkpoint.resume(ckpt_path, "sft", raw_model, optimizer,
                             guard=guard)[0] if cfg.resume else 0
    model = distributed.wrap(raw_model, run, cfg.compile)
    print0(f"{len(train)} demonstrations, {cfg.max_steps} steps of {cfg.batch_size} "
           f"({cfg.max_steps * cfg.batch_size / len(train):.1f} epochs); "
           f"{run.world_size} process(es) on {run.device}")
    log = Logger(cfg.out_dir, cfg, cfg.max_steps, cfg.log_interval, run.master, start_step=step)
    val_l = val_loss(model, val, pad, run)
    print0(f"validation loss before SFT: {val_l:.4f}")
    stop = distributed.StopSignal(resume_hint)

    max_norm = cfg.grad_clip or math.inf  # 0: no clipping
    while step < cfg.max_steps:
        lr = optim.lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
        optim.set_lr(optimizer, lr)
        # forward and backward over this rank's micro-batches, each weighted by its share
        # of the global batch's answer tokens
        batches, weights = micro_batches(train, step, cfg, run, pad)
        loss = 0.0
        for i, ((x, y), w) in enumerate(zip(batches, weights)):
            with distributed.grad_sync(model, run, last=i == len(batches) - 1), run.autocast:
                _, micro_loss = model(x, y)
            (micro_loss * w).backward()
            loss += micro_loss.item() * w
        loss = distributed.all_reduce_mean(loss, run)
        tokens = sum(x.numel() for x, _ in batches) * run.world_size
        # clip; step unless the loss or the gradient is not finite; zero
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if guard.ok(grad_norm, step, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = dict(loss=loss, lr=lr, grad_norm=grad_norm, **guard.logged())
        step += 1
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_l = metrics["val_loss"] = val_loss(model, val, pad, run)
        log.step(step - 1, tokens, force="val_loss" in metrics, **metrics)
        stop.checkpoint(run, step, step % cfg.ckpt_interval == 0 or step == cfg.max_steps,
                        ckpt_path, lambda: checkpoint.save(ckpt_path, checkpoint.stage_checkpoint(
                            "sft", raw_model, cfg, step, optimizer, enc, guard,
                            val_loss=val_l, **carried)))  # also on SIGTERM
    stop.release()
    print0(f"done: validation loss {val_l:.4f}; checkpoint {ckpt_path}")
    lock.release()
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
