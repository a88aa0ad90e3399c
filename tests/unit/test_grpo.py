"""GRPO's pieces on hand-computed numbers (the advantage estimators, the loss
aggregations, the clip-low/clip-high objective, the k3 KL, Dr. GRPO's length effect,
dynamic sampling), the settings it refuses, and a tiny run of the stage."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_user_error_in_process, main_of, read_log

import checkpoint
import grpo
from batch import response_logprobs
from cli import UserError
from model import GPT, GPTConfig
from records import world_tokenizer

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4


def loss_cfg(**kw):
    return SimpleNamespace(**{"clip_low": 0.2, "clip_high": 0.2, "beta": 0.0, "kl_in": "loss",
                              "loss_agg": "token_mean", "max_new_tokens": 4, **kw})


def test_grpo_advantage_divides_by_the_group_std():
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # unbiased std of (1, 0, 0, 1)
    up, down = 0.5 / (std + 1e-4), -0.5 / (std + 1e-4)
    adv = grpo.group_advantages(REWARDS, 4, "grpo")
    assert adv[:4].tolist() == pytest.approx([up, down, down, up], rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4  # a group of equal rewards: no signal


def test_dr_grpo_advantage_is_the_centred_reward():
    adv = grpo.group_advantages(REWARDS, 4, "dr_grpo")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_rloo_advantage_leaves_each_answer_out_of_its_baseline():
    adv = grpo.group_advantages(REWARDS, 4, "rloo")
    # 1 − (0 + 0 + 1)/3 = 2/3; 0 − (1 + 0 + 1)/3 = −2/3; 2 − (2 + 2 + 2)/3 = 0
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], abs=1e-7)
    # = G/(G − 1) times the centred reward
    assert adv.tolist() == pytest.approx((grpo.group_advantages(REWARDS, 4, "dr_grpo") * 4 / 3)
                                         .tolist(), abs=1e-7)


def test_reinforce_advantage_uses_the_batch_mean():
    adv = grpo.group_advantages(REWARDS, 4, "reinforce")  # batch mean 10/8 = 1.25
    assert adv.tolist() == [-0.25, -1.25, -1.25, -0.25, 0.75, 0.75, 0.75, 0.75]


def test_loss_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert grpo.aggregate(x, mask, "seq_mean", 4).item() == pytest.approx((2 + 4) / 2)
    assert grpo.aggregate(x, mask, "constant", 4).item() == pytest.approx(10 / (2 * 4))
    assert grpo.aggregate(x, mask, "token_mean", 4).item() == pytest.approx(10 / 4)
    # Dr. GRPO's constant is the length limit, not the padded width of the batch (4 here)
    assert grpo.aggregate(x, mask, "constant", 6).item() == pytest.approx(10 / (2 * 6))


def test_micro_batches_of_the_aggregations_add_up_to_the_whole_batch():
    """Each row alone, divided by the whole batch's counts (2 answers, 4 tokens)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    for how, want in (("seq_mean", (2 / 2, 4 / 2)), ("constant", (6 / 8, 4 / 8)),
                      ("token_mean", (6 / 4, 4 / 4))):
        parts = [grpo.aggregate(x[i:i + 1], mask[i:i + 1], how, 4, whole=(2, 4)).item()
                 for i in (0, 1)]
        assert parts == pytest.approx(want)
        assert sum(parts) == pytest.approx(grpo.aggregate(x, mask, how, 4).item())


def test_micro_batches_sort_by_length_and_cover_every_answer_once():
    prompts, responses = [[1] * 5, [2], [3] * 3, [4] * 2, [5]], [[6], [7] * 3, [8], [9] * 6, [6]]
    micro = grpo.micro_batches(prompts, responses, 2, 0, "cpu")
    # lengths 6, 4, 4, 8, 2: sorted 4 (2, 2) ... stable for equal lengths
    assert [mb.rows.tolist() for mb in micro] == [[4, 1], [2, 0], [3]]
    assert [mb.tokens.shape for mb in micro] == [(2, 1 + 3), (2, 5 + 1), (1, 2 + 6)]
    assert micro[0].tokens.tolist() == [[5, 6, 0, 0], [2, 7, 7, 7]]
    assert len(grpo.micro_batches(prompts, responses, 0, 0, "cpu")) == 1


@pytest.mark.parametrize("loss_agg", grpo.LOSS_AGGS)
def test_micro_batches_give_the_whole_batch_gradient(loss_agg):
    """Answers of ragged lengths: the gradient summed over micro-batches of 3 equals the
    gradient of the whole batch at once, padding and all, for each aggregation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (8, 2), generator=gen).tolist()
    prompts = [torch.randint(1, 16, (p,), generator=gen).tolist() for p, _ in lengths]
    responses = [torch.randint(1, 16, (r,), generator=gen).tolist() for _, r in lengths]
    advantages = torch.randn(8, generator=gen)
    cfg = loss_cfg(loss_agg=loss_agg, beta=0.1, max_new_tokens=8)
    grads, losses = [], []
    for size in (0, 3):
        micro = grpo.micro_batches(prompts, responses, size, 0, "cpu")
        assert len(micro) == (1 if size == 0 else 3)
        whole = (8, sum(mb.mask.sum() for mb in micro))
        model.zero_grad()
        total = 0.0
        for mb in micro:
            logp = response_logprobs(model, mb.tokens, attn_mask=mb.attn, start=mb.P)
            ref = (logp.detach() + 0.1) * mb.mask  # a reference that differs
            loss, _ = grpo.grpo_loss(logp, logp.detach() - 0.05, ref, advantages[mb.rows],
                                     mb.mask, cfg, whole)
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_clip_low_and_clip_high_objective_by_hand():
    """Four one-token answers, ratios 1.5, 0.5, 0.5, 1.5, advantages +1, −1, +1, −1,
    ε_low 0.2, ε_high 0.28: per token −min(ρA, clip(ρ)A)."""
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1)
    loss, stats = grpo.grpo_loss(logp, torch.zeros(4, 1), torch.zeros(4, 1), adv, mask,
                                 loss_cfg(clip_high=0.28))
    # min(1.5, 1.28) = 1.28 (clipped high); min(−0.5, −0.8) = −0.8 (clipped low);
    # min(0.5, 0.8) = 0.5; min(−1.5, −1.28) = −1.5 (the pessimistic side, unclipped)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4)
    assert stats["policy/clipfrac_high"].item() == 0.25
    assert stats["policy/clipfrac_low"].item() == 0.25
    assert stats["policy/ratio"].item() == pytest.approx(1.0)
    loss.backward()
    grad = logp.grad[:, 0].tolist()
    # clipped tokens have no gradient; the others −A·ρ/4
    assert grad == pytest.approx([0.0, 0.0, -0.5 / 4, 1.5 / 4])


def test_k3_kl_by_hand_and_in_the_loss():
    logp, ref = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.25, 0.3]]))
    # d = log(0.25/0.5): e^d − d − 1 = 0.5 + log 2 − 1; equal log-probs give 0
    assert grpo.k3(logp, ref)[0].tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-7)
    assert (grpo.k3(torch.randn(50), torch.randn(50)) >= 0).all()
    mask = torch.tensor([[1.0, 1.0]])
    for kl_in, want in (("loss", 0.1 * (0.5 + math.log(2) - 1) / 2), ("reward", 0.0)):
        loss, stats = grpo.grpo_loss(logp, logp, ref, torch.zeros(1), mask,
                                     loss_cfg(beta=0.1, kl_in=kl_in))
        assert loss.item() == pytest.approx(want, abs=1e-7)
        assert stats["loss/k3"].item() == pytest.approx((0.5 + math.log(2) - 1) / 2, abs=1e-7)


def test_dr_grpo_length_effect_on_a_hand_made_batch():
    """A correct short answer (2 tokens, A = +1) and a wrong long one (6 tokens, A = −1):
    under per-sequence token means each token of the short answer weighs 1/(2·2) and each
    of the long one 1/(2·6), so long wrong answers are punished less per token; under Dr.
    GRPO's constant normaliser (and DAPO's token mean) every token weighs the same."""
    mask = torch.tensor([[1.0] * 2 + [0.0] * 4, [1.0] * 6])
    adv = torch.tensor([1.0, -1.0])
    weights = {}
    for agg in ("seq_mean", "constant", "token_mean"):
        logp = torch.zeros(2, 6, requires_grad=True)
        loss, _ = grpo.grpo_loss(logp, torch.zeros(2, 6), torch.zeros(2, 6), adv, mask,
                                 loss_cfg(loss_agg=agg, max_new_tokens=6))
        loss.backward()
        weights[agg] = (-logp.grad[0, 0].item(), logp.grad[1, 0].item())
        assert (logp.grad * (1 - mask) == 0).all()
    assert weights["seq_mean"] == pytest.approx((1 / 4, 1 / 12))
    assert weights["constant"] == pytest.approx((1 / 12, 1 / 12))
    assert weights["token_mean"] == pytest.approx((1 / 8, 1 / 8))


def fake_draws(*rounds):
    """draw(round) over hand-written score groups, each group named (round, index)."""
    def draw(r):
        return [((r, k), torch.tensor(s, dtype=torch.float)) for k, s in enumerate(rounds[r])]
    return draw


def test_dynamic_sampling_keeps_the_batch_size_and_counts_the_drops():
    draw = fake_draws([[1, 1], [0, 1], [0, 0], [1, 0]], [[1, 1], [1, 0], [0, 1], [0, 0]])
    kept, stats = grpo.fill_groups(draw, 4, 16, dynamic=True, max_rounds=8)
    assert [g for g, _ in kept] == [(0, 1), (0, 3), (1, 1), (1, 2)]
    # 7 groups looked at (the last of round 1 was not needed), 3 of them uniform
    assert stats == {"groups/zero_signal": 3 / 7, "dynamic/dropped": 3, "dynamic/rounds": 2}
    kept, stats = grpo.fill_groups(draw, 4, 16, dynamic=False, max_rounds=8)
    assert [g for g, _ in kept] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert stats == {"groups/zero_signal": 0.5, "dynamic/dropped": 0, "dynamic/rounds": 1}
    # out of rounds: topped up with the dropped groups, still 4
    kept, stats = grpo.fill_groups(draw, 4, 16, dynamic=True, max_rounds=1)
    assert [g for g, _ in kept] == [(0, 1), (0, 3), (0, 0), (0, 2)]
    assert stats["dynamic/dropped"] == 0 and stats["dynamic/rounds"] == 1


def test_dynamic_sampling_refuses_a_prompt_set_without_signal():
    draw = fake_draws(*[[[1, 1], [0, 0]]] * 8)
    with pytest.raises(UserError, match="--dynamic_sampling=true: every one of the 4 groups"):
        grpo.fill_groups(draw, 2, 3, dynamic=True, max_rounds=8)


def test_assemble_puts_every_response_in_column_p():
    tokens, attn, mask, P = grpo.assemble([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], 0, "cpu")
    assert P == 3
    assert tokens.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert attn.tolist() == [[True] * 5 + [False], [False, False] + [True] * 4]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("flags, needles", [
    (["--group_size=1"], ["--group_size=1", "at least 2"]),
    (["--clip_low=-0.1"], ["--clip_low=-0.1", "between 0 and 1"]),
    (["--clip_low=1"], ["--clip_low=1", "below 1"]),
    (["--clip_high=-0.1"], ["--clip_high=-0.1", "at least 0"]),
    (["--batch_size=12"], ["--batch_size=12", "whole groups", "--group_size=8"]),
    (["--advantage=ppo"], ["--advantage=ppo", "expected one of"]),
    (["--loss_agg=sum"], ["--loss_agg=sum", "expected one of"]),
    (["--reward=gold"], ["--reward=gold", "expected one of"]),
    (["--temperature=0"], ["--temperature=0", "must be > 0"]),
], ids=lambda x: x[0].lstrip("-") if x and x[0].startswith("--") else "")
def test_refused_settings(capsys, world, flags, needles):
    assert_user_error_in_process(capsys, grpo, f"--data_dir={world}", *flags, needles=needles)


def test_dynamic_sampling_refused_when_every_group_is_uniform(capsys, pipeline, tmp_path):
    """The tiny SFT model never answers right in 8 tokens: with the verifiable reward every
    group of the tiny world's 16 prompts scores all zeros."""
    assert_user_error_in_process(
        capsys, grpo, f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/sft",
        f"--out_dir={tmp_path}", "--batch_size=16", "--group_size=2", "--max_new_tokens=8",
        "--dynamic_sampling=true", "--iterations=1",
        needles=["--dynamic_sampling=true", "equal scores", "16 prompts"])


def test_tiny_run_logs_and_writes_a_loadable_checkpoint(pipeline, tmp_path):
    common = [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/sft",
              f"--reward_from={pipeline.out}/reward", "--batch_size=8", "--group_size=4",
              "--max_new_tokens=8", "--sample_interval=0", "--iterations=3"]
    main_of(grpo, [*common, f"--out_dir={tmp_path}/a", "--reward=sum", "--updates=2",
                   "--dynamic_sampling=true", "--lr_decay=true"])
    log = read_log(tmp_path / "a" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2]
    # --lr_decay: 5e-5 × (1 − it/3), the last iteration's step a third of the first's
    assert [r["policy/lr"] for r in log] == pytest.approx([5e-5, 5e-5 * 2 / 3, 5e-5 / 3])
    for r in log:
        # the reward model's scores are never all equal: nothing dropped, one draw
        assert r["groups/zero_signal"] == 0 and r["dynamic/dropped"] == 0
        assert r["dynamic/rounds"] == 1
        assert 0 <= r["gold/correct"] <= 1 and 0 <= r["rollout/ended"] <= 1
        assert 1 <= r["rollout/length"] <= 8 and r["objective/kl"] == pytest.approx(0, abs=1)
        assert r["policy/ratio"] == pytest.approx(1, abs=0.05) and r["loss/k3"] >= 0
    assert log[0]["objective/kl"] == pytest.approx(0, abs=1e-5)  # the policy starts as SFT
    enc = world_tokenizer(pipeline.data)
    model, ckpt = checkpoint.load_model(tmp_path / "a" / "ckpt.pt", "python grpo.py", enc)
    assert ckpt["stage"] == "grpo" and ckpt["step"] == 3 and ckpt["reward_model"] is not None
    # the other choices, one short run: the verifiable reward of the tiny model is 0
    no_rm = [f for f in common if not f.startswith("--reward_from=")]  # verifiable: no model
    main_of(grpo, [*no_rm, f"--out_dir={tmp_path}/b", "--advantage=rloo", "--loss_agg=constant",
                   "--kl_in=reward", "--clip_high=0.28", "--ptx_coef=0.5", "--ptx_len=32",
                   "--iterations=2", "--dynamic_sampling=false"])
    log = read_log(tmp_path / "b" / "log.jsonl")
    assert len(log) == 2 and log[0]["groups/zero_signal"] == 1.0 and "loss/ptx" in log[0]
    assert [r["policy/lr"] for r in log] == [5e-5, 5e-5]  # constant without --lr_decay
    assert log[0]["objective/score"] == 0.0 and log[0]["gold/correct"] == 0.0
