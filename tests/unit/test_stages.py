"""Pieces of the training stages that need data but no training: validation windows,
SFT's targets, and how SFT, the reward model and DPO split a ragged global batch."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dpo
import pretrain
import reward
import sft
from batch import sequence_logprobs
from data.tokenizer import load_tokenizer
from records import load_rankings
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
    """However the global batch is split (micro-steps, ranks, length groups), the
    micro-batch losses weighted as sft.micro_batches weighs them add up to the loss of
    the whole batch; the answer tokens of the whole batch are shared out among the ranks."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    pad = enc.encode_single_token("<|endoftext|>")
    examples = sft.load_examples(world / "sft_train.jsonl", enc, 160)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=160, vocab_size=enc.n_vocab, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    cfg = sft.Config(batch_size=16, grad_accum=1, length_groups=1, seed=3)
    one = SimpleNamespace(rank=0, world_size=1, device="cpu")
    ((x, y),), (w,) = sft.micro_batches(examples, 5, cfg, one, pad)
    assert w == 1.0 and len(x) == 16
    with torch.no_grad():
        whole = model(x, y)[1].item()
        for accum, world_size, groups in ((2, 1, 1), (4, 1, 1), (2, 2, 1), (1, 1, 4),
                                          (2, 2, 2)):
            split = sft.Config(batch_size=16, grad_accum=accum, length_groups=groups, seed=3)
            total, weights = 0.0, 0.0
            for r in range(world_size):
                run = SimpleNamespace(rank=r, world_size=world_size, device="cpu")
                batches, ws = sft.micro_batches(examples, 5, split, run, pad)
                assert len(batches) == accum * groups
                if groups > 1:  # each group padded to its own longest answer only
                    assert sum(bx.numel() for bx, _ in batches) < 16 // world_size * x.size(1)
                # DDP averages over the ranks, hence the weights are × world_size
                total += sum(model(bx, by)[1].item() * bw for (bx, by), bw in zip(batches, ws))
                weights += sum(ws)
            assert weights / world_size == pytest.approx(1.0)
            assert total / world_size == pytest.approx(whole, abs=1e-5), (accum, world_size,
                                                                          groups)


SPLITS = ((1, 1, 1), (2, 1, 1), (1, 1, 3), (1, 1, 4), (2, 1, 4), (2, 2, 2))  # accum, ranks, groups


def tiny_model(enc):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=160, vocab_size=enc.n_vocab, n_layer=1, n_head=2,
                         n_embd=16)).eval()


def test_dpo_loss_is_the_mean_over_the_global_batchs_pairs(world):
    """Micro-steps, ranks and length groups: the weighted micro-batch losses add up to the
    whole batch's; a pair's two answers stay together; KTO's micro-batches stay as drawn."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    pad = enc.encode_single_token("<|endoftext|>")
    seqs, pairs, desirable = dpo.load_sets(world, "prefs", "train", enc, 160)
    model = tiny_model(enc)
    ref = torch.zeros(len(seqs))
    data = (seqs, pairs, ref, desirable)
    results = {}
    with torch.no_grad():
        for accum, world_size, groups in SPLITS:
            cfg = dpo.Config(loss="dpo", batch_size=16, grad_accum=accum, length_groups=groups)
            total, n_pairs = 0.0, 0
            for r in range(world_size):
                run = SimpleNamespace(rank=r, world_size=world_size, device="cpu")
                batches, ws = dpo.make_batches(data, 2, cfg, run, pad)
                assert len(batches) == accum * groups and sum(ws) == pytest.approx(1.0)
                for (rows, _), w in zip(batches, ws):
                    # chosen rows first, then their rejected partners, pair by pair
                    B = len(rows) // 2
                    assert rows.prompt_lengths[:B].tolist() == rows.prompt_lengths[B:].tolist()
                    for i, n in enumerate(rows.prompt_lengths[:B].tolist()):
                        assert rows.tokens[i, :n].tolist() == rows.tokens[B + i, :n].tolist()
                    n_pairs += B
                total += sum(dpo.batch_loss(model, b, cfg)[0].item() * w
                             for b, w in zip(batches, ws))
            assert n_pairs == 16
            results[accum, world_size, groups] = total / world_size  # DDP's mean over ranks
    whole = results[1, 1, 1]
    assert results == pytest.approx({k: whole for k in results}, abs=1e-5)
    kto = dpo.Config(loss="kto", batch_size=16, grad_accum=2, length_groups=4)
    run = SimpleNamespace(rank=0, world_size=1, device="cpu")
    items = list(range(len(seqs)))
    batches, ws = dpo.make_batches((seqs, items, ref, desirable), 2, kto, run, pad)
    assert len(batches) == 2 and ws == [0.5, 0.5]


def test_reward_loss_is_the_mean_over_the_global_batchs_pairs(world):
    """The same for the reward model's rankings: every answer of a ranking stays in one
    micro-batch, and the micro-batches weighted by their pairs give the whole batch's loss."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    pad = enc.encode_single_token("<|endoftext|>")
    rankings = load_rankings(world / "prefs_train.jsonl", enc, 160)
    model = tiny_model(enc)
    results = {}
    with torch.no_grad():
        for accum, world_size, groups in SPLITS:
            cfg = reward.Config(batch_size=8, grad_accum=accum, length_groups=groups)
            total = 0.0
            for r in range(world_size):
                run = SimpleNamespace(rank=r, world_size=world_size, device="cpu")
                batches, ws = reward.micro_batches(rankings, 2, 1, cfg, run, pad)
                assert len(batches) == accum * groups
                for (rows, chosen, rejected), w in zip(batches, ws):
                    score = sequence_logprobs(model, rows)[0]  # any score of each row alone
                    total += reward.bradley_terry_loss(score[chosen], score[rejected])[0] \
                        .mean().item() * w
            results[accum, world_size, groups] = total / world_size
    whole = results[1, 1, 1]
    assert results == pytest.approx({k: whole for k in results}, abs=1e-5)
