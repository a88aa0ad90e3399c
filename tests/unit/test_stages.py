"""Pieces of the training stages that need data but no training: validation windows,
SFT's targets and its split of a ragged global batch."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretrain
import sft
from data.tokenizer import load_tokenizer
from model import IGNORE_INDEX, GPT, GPTConfig


def test_validation_windows_do_not_depend_on_the_batch_size(world):
    """Runs with different --batch_size (or --grad_accum) are validated on the same windows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=16))
    data = np.memmap(world / "val.bin", dtype=np.uint16, mode="r")
    run = SimpleNamespace(rank=0, world_size=1, device="cpu", ddp=False)
    losses = [pretrain.val_loss(model, data, pretrain.Config(block_size=32, batch_size=b,
                                                             grad_accum=a, eval_batches=2), run)
              for b, a in ((64, 1), (16, 1), (24, 2), (5, 1))]
    assert max(losses) - min(losses) < 1e-5, losses
    assert model.training  # val_loss puts the model back in training mode


def test_sft_targets_are_the_answer_tokens():
    x, y = sft.collate([([1, 2, 3, 4], 2), ([5, 6, 7], 1)], pad=0, device="cpu")
    assert x.tolist() == [[1, 2, 3], [5, 6, 7]]
    # the prompt [1, 2] / [5] predicts nothing; padding neither
    assert y.tolist() == [[IGNORE_INDEX, 3, 4], [6, 7, IGNORE_INDEX]]


def test_sft_loss_is_the_mean_over_the_global_batchs_answer_tokens(world):
    """However the global batch is split (micro-steps, ranks), the micro-batch losses
    weighted as sft.micro_batches weighs them add up to the loss of the whole batch;
    the answer tokens of the whole batch are shared out among the ranks."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    pad = enc.encode_single_token("<|endoftext|>")
    examples = sft.load_examples(world / "sft_train.jsonl", enc, 160)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=160, vocab_size=enc.n_vocab, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    cfg = sft.Config(batch_size=16, grad_accum=1, seed=3)
    one = SimpleNamespace(rank=0, world_size=1, device="cpu")
    ((x, y),), (w,) = sft.micro_batches(examples, 5, cfg, one, pad)
    assert w == 1.0 and len(x) == 16
    with torch.no_grad():
        whole = model(x, y)[1].item()
        for accum, world_size in ((2, 1), (4, 1), (2, 2)):
            split = sft.Config(batch_size=16, grad_accum=accum, seed=3)
            total, weights = 0.0, 0.0
            for r in range(world_size):
                run = SimpleNamespace(rank=r, world_size=world_size, device="cpu")
                batches, ws = sft.micro_batches(examples, 5, split, run, pad)
                assert len(batches) == accum
                # DDP averages over the ranks, hence the weights are × world_size
                total += sum(model(bx, by)[1].item() * bw for (bx, by), bw in zip(batches, ws))
                weights += sum(ws)
            assert weights / world_size == pytest.approx(1.0)
            assert total / world_size == pytest.approx(whole, abs=1e-5), (accum, world_size)
