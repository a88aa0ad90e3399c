"""PPO's pieces on hand-made numbers, and one rollout of tiny random models checked for
masking: nothing after a response's end token may carry a log-prob, value, reward or
advantage."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ppo
from batch import collate, ptx_windows, response_logprobs, reward_scores
from model import GPT, GPTConfig, ScalarGPT, token_logprobs
from reward_model import RewardMember, RewardModel


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # δ = [0, 0, 0.5] (V after the last token is 0), A_t = Σ δ: 0.5 everywhere; R = A + V
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    adv, _ = ppo.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # δ = [0 + 0.25 − 0.5, −0.25, 0.5]; A2 = 0.5, A1 = −0.25 + 0.5·0.5 = 0,
    # A0 = −0.25 + 0.5·0 = −0.25
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.0, 0.5]]))


def reference_gae(rewards, values, length, gamma, lam):
    """The textbook loop on one unpadded sequence of python floats."""
    adv = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            v_next = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * v_next - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv


def test_gae_matches_plain_loop_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    B, N = 5, 7
    lengths = [7, 1, 4, 3, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (N - n) for n in lengths])
    rewards = torch.randn(B, N, generator=g) * 10  # garbage past the end: must be ignored
    values = torch.randn(B, N, generator=g) * 10
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        want = reference_gae(rewards[i].tolist(), values[i].tolist(), n, 0.9, 0.8)
        assert adv[i, :n].tolist() == pytest.approx(want, abs=1e-5)
        returns = [a + v for a, v in zip(want, values[i, :n].tolist())]
        assert ret[i, :n].tolist() == pytest.approx(returns, abs=1e-5)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_policy_loss_hand_computed():
    # token ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, −1, +1, −1, and a masked token
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 100.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl, ratio = ppo.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per token max(−Aρ, −A·clip(ρ)): max(−1.5, −1.2) = −1.2; max(1.5, 1.2) = 1.5;
    # max(−0.5, −0.8) = −0.5; max(0.5, 0.8) = 0.8  -> mean 0.15
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert clipfrac.item() == pytest.approx(2 / 4)  # tokens 1 and 4 take the clipped branch
    assert ratio.item() == pytest.approx(1.0)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)


def test_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, *_ = ppo.policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]),
                               torch.ones(1, 2), 0.2)
    loss.backward()
    # ρ = 1.5 > 1.2 with A > 0: clipped, no gradient; ρ = 1.1: d(−ρ/2)/dlogp = −1.1/2
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.55])


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, 9.0]])
    returns = torch.tensor([[1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: V = 1 is clipped to 0.2: max((1−1)², (0.2−1)²) = 0.64; token 1: within the clip,
    # (0.1 − 1)² = 0.81; token 2 masked. ½·mean = ½·(0.64 + 0.81)/2
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    # V moved past the clip, but the clipped error is the smaller one: the max keeps the
    # unclipped (1 − 0.5)² and the clip fraction counts the clip only where it binds
    loss, clipfrac = ppo.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]),
                                    torch.tensor([[0.5]]), torch.tensor([[1.0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.25)
    assert clipfrac.item() == 0.0


def test_kl_penalty_on_every_token_and_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, kl = ppo.per_token_rewards(logp, ref, torch.tensor([2.0, -1.0]), mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0],
                                                 [-0.1 - 1.0, 0.0, 0.0, 0.0]]))


def test_whiten_over_masked_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    vals = w[mask > 0]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()
    kept = ppo.whiten(x, mask, shift_mean=False)[mask > 0]  # unit variance, the mean (3) kept
    assert kept.mean().item() == pytest.approx(3.0)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)


def whiten_one_row(rank, init, x, mask, out):
    """A process of a gloo group of two: whitens its own row of x, over both rows."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        out[rank] = ppo.whiten(x[rank:rank + 1], mask[rank:rank + 1], run=SimpleNamespace(ddp=True))
    finally:
        torch.distributed.destroy_process_group()


def test_whiten_over_two_processes_equals_one(tmp_path):
    """The advantages of two processes' rollouts are whitened by the mean and std of both,
    as if one process held them all."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    out = torch.zeros(2, 1, 4).share_memory_()
    torch.multiprocessing.spawn(whiten_one_row, (f"file://{tmp_path}/rendezvous", x, mask, out),
                                nprocs=2)
    torch.testing.assert_close(out[:, 0], ppo.whiten(x, mask))


def test_adaptive_kl_controller():
    # KL twice the target: error clipped to +0.2, scaled by 64 rollouts / 640 horizon -> ×1.02
    for kl, beta in ((8.0, 0.102), (3.6, 0.099), (0.0, 0.098), (4.0, 0.1)):
        step = ppo.adaptive_kl_step(0.1, kl=kl, target=4.0, n_rollouts=64, horizon=640)
        assert step == pytest.approx(beta), kl


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    constant = torch.full_like(returns, 2.0)
    assert ppo.explained_variance(constant, returns, mask) == pytest.approx(0.0, abs=1e-6)
    # off by a constant: R − V does not vary, so all of R's variance is explained (1 − MSE /
    # Var(R) would say 1 − 1/(2/3) = −0.5)
    assert ppo.explained_variance(returns + 1, returns, mask) == pytest.approx(1.0)


def tiny_models(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=16)
    policy, ref = GPT(cfg).eval(), GPT(cfg).eval()
    value, rm_member = ScalarGPT(cfg).eval(), RewardMember(cfg).eval()
    for m in (value, rm_member):  # non-zero heads, so values and scores vary
        torch.nn.init.normal_(m.score.weight, std=1.0)
    return policy, ref, value, RewardModel([rm_member], [[1.0, 0.0]])


def rm_score(rm, pad=0):
    """PPO's score_fn, as main builds it: every rollout of the batch scored in one batch."""
    def score(prompts, responses):
        return reward_scores(rm, list(zip(prompts, responses)), pad, "cpu", len(prompts))
    return score


def test_rollout_masks_everything_after_the_end_token():
    policy, ref, value, rm = tiny_models()
    end, pad = 3, 0
    cfg = SimpleNamespace(max_new_tokens=10, temperature=0.7, compile=False,
                          missing_end_penalty=-5.0, whiten_rewards=False, gamma=1.0, lam=0.95)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [4, 4]]
    g = torch.Generator().manual_seed(3)
    b = ppo.rollout(policy, ref, value, rm_score(rm, pad), prompts, 0.1, cfg,
                    SimpleNamespace(end=end, pad=pad), g, "cpu")
    mask = b["mask"]
    assert b["ended"].any() and not b["ended"].all(), "want both kinds of rows; change the seed"
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        resp = b["responses"][i]
        assert len(resp) == n and (resp[-1] == end) == bool(b["ended"][i])
        assert end not in resp[:-1]
        assert mask[i, :n].all() and not mask[i, n:].any()  # a prefix
        for key in ("logp", "values", "advantages", "returns", "rewards", "kl"):
            assert (b[key][i, n:] == 0).all(), key
        # log-probs of the padded batch equal those of the row alone, at the same temperature
        alone = torch.tensor([p + resp])
        want = token_logprobs(policy(alone)[0], alone, temperature=0.7)[0, len(p) - 1:]
        assert torch.allclose(b["logp"][i, :n], want, atol=1e-5)
        want_ref = token_logprobs(ref(alone)[0], alone, temperature=0.7)[0, len(p) - 1:]
        assert torch.allclose(b["kl"][i, :n], want - want_ref, atol=1e-5)
        # the value before each response token is read where that token is predicted
        assert torch.allclose(b["values"][i, :n], value(alone)[0, len(p) - 1:-1], atol=1e-5)
        # the score lands on the last token only; a response with no end gets the penalty
        with torch.no_grad():
            score = rm(collate([p + resp], [len(p)], pad, "cpu"))[0]
        want_score = score if b["ended"][i] else torch.tensor(-5.0)
        assert b["scores"][i].item() == pytest.approx(want_score.item(), abs=1e-5)
        expect = -0.1 * b["kl"][i, :n]
        expect[-1] += want_score
        assert torch.allclose(b["rewards"][i, :n], expect, atol=1e-5)


STATS = {"loss/policy", "loss/value", "policy/clipfrac", "policy/approxkl", "policy/ratio",
         "policy/entropy", "value/clipfrac"}


def test_update_moves_the_policy_toward_positive_advantages():
    """One PPO update on a batch where one response has advantage +1 and another −1:
    the first gets likelier, the second less likely."""
    policy, ref, value, rm = tiny_models(1)
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=2, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          entropy_coef=0.0, grad_clip=1.0)
    b = ppo.rollout(policy, ref, value, rm_score(rm), [[5, 6], [7, 8]], 0.0, cfg,
                    SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(0), "cpu")
    b["advantages"] = b["mask"] * torch.tensor([[1.0], [-1.0]])
    opt_p = policy.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    opt_v = value.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    before = b["logp"].sum(1)
    stats = ppo.ppo_update(policy, value, opt_p, opt_v, b, cfg, 1e-2, 1e-2,
                           torch.Generator().manual_seed(0), run)
    with torch.no_grad():
        after = response_logprobs(policy, b["tokens"], attn_mask=b["attn"], start=b["P"])
    after = (after * b["mask"]).sum(1)
    assert after[0] > before[0] and after[1] < before[1]
    assert set(stats) == STATS  # no loss/ptx without ptx_data


def test_update_statistics_of_one_step_by_hand():
    """One epoch of one minibatch: the statistics are those of the rollout's own figures,
    the ratio being 1 (the policy has not moved yet): the policy loss is the masked mean of
    −A, nothing is clipped, the entropy is the rollout's, the value loss ½·mean (V − R)²."""
    policy, ref, value, rm = tiny_models(1)
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=1, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          entropy_coef=0.0, grad_clip=1.0)
    b = ppo.rollout(policy, ref, value, rm_score(rm), [[5, 6], [7, 8]], 0.0, cfg,
                    SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(0), "cpu")
    b["advantages"] = ppo.whiten(b["advantages"], b["mask"])
    opt_p = policy.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    opt_v = value.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    stats = ppo.ppo_update(policy, value, opt_p, opt_v, b, cfg, 1e-2, 1e-2,
                           torch.Generator().manual_seed(0), run)
    m = b["mask"]

    def mean(x):
        return ((x * m).sum() / m.sum()).item()

    assert stats["loss/policy"] == pytest.approx(mean(-b["advantages"]), abs=1e-5)
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert stats["policy/clipfrac"] == 0.0 and stats["value/clipfrac"] == 0.0
    assert stats["policy/entropy"] == pytest.approx(mean(b["entropy"]), abs=1e-5)
    assert stats["loss/value"] == pytest.approx(0.5 * mean((b["values"] - b["returns"]) ** 2),
                                                rel=1e-5)


def test_update_on_minibatches_cut_to_their_own_width_equals_the_whole_width(monkeypatch):
    """Each minibatch runs on the columns its own rows use (batch.drop_pad_columns); the
    update is the one on the batch's whole width, to float rounding: the same statistics
    and the same weights after two epochs."""
    cfg = SimpleNamespace(max_new_tokens=8, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=2, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          entropy_coef=0.01, grad_clip=1.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [7], [8, 9], [12, 13, 14, 15, 4, 5, 6]]
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    results = []
    for cut in (True, False):
        if not cut:  # every minibatch at the batch's whole width
            monkeypatch.setattr(ppo, "drop_pad_columns", lambda t, a, m, P: (t, a, m, P))
        policy, ref, value, rm = tiny_models(2)
        b = ppo.rollout(policy, ref, value, rm_score(rm), prompts, 0.1, cfg,
                        SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(1), "cpu")
        lengths = b["mask"].sum(1).tolist()
        opt_p = policy.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        opt_v = value.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        stats = ppo.ppo_update(policy, value, opt_p, opt_v, b, cfg, 1e-2, 1e-2,
                               torch.Generator().manual_seed(0), run)
        results.append((stats, policy.state_dict(), value.state_dict(), lengths))
    (cut_stats, cut_p, cut_v, lengths), (whole_stats, whole_p, whole_v, _) = results
    assert min(lengths) < max(lengths), "want answers of several lengths; change the seed"
    assert cut_stats == pytest.approx(whole_stats, rel=1e-4, abs=1e-6)
    for cut_sd, whole_sd in ((cut_p, whole_p), (cut_v, whole_v)):
        for k in whole_sd:
            assert torch.allclose(cut_sd[k], whole_sd[k], atol=1e-5), k


def test_ptx_windows_are_next_token_pairs_from_the_stream():
    data = np.arange(1000, dtype=np.uint16)
    x, y = ptx_windows(data, 3, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert (y == x + 1).all() and (x[:, 1:] == x[:, :-1] + 1).all()


def test_entropy_bonus_alone_raises_the_policys_entropy():
    """With every advantage 0 the clipped loss has no gradient: with --entropy_coef > 0 the
    update only adds entropy (the bonus is subtracted from the loss), so the policy's
    entropy on the rollouts rises; at 0 the policy stays put."""
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=2, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          grad_clip=1.0)
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    change = {}
    for coef in (0.0, 1.0):
        policy, ref, value, rm = tiny_models(3)
        cfg.entropy_coef = coef
        b = ppo.rollout(policy, ref, value, rm_score(rm), [[5, 6], [7, 8]], 0.0, cfg,
                        SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(0), "cpu")
        b["advantages"] = torch.zeros_like(b["advantages"])
        opt_p = policy.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        opt_v = value.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        ppo.ppo_update(policy, value, opt_p, opt_v, b, cfg, 1e-2, 1e-2,
                       torch.Generator().manual_seed(0), run)
        with torch.no_grad():
            entropy = response_logprobs(policy, b["tokens"], attn_mask=b["attn"], start=b["P"],
                                        entropy=True)[1]
        change[coef] = (ppo.masked_mean(entropy, b["mask"])
                        - ppo.masked_mean(b["entropy"], b["mask"])).item()
    assert change[0.0] == pytest.approx(0.0, abs=1e-6)
    assert change[1.0] > 1e-3


def test_ptx_term_alone_moves_the_policy_toward_the_pretraining_text():
    """With every advantage 0 the clipped loss has no gradient: the policy stays put
    without PPO-ptx and learns the pretraining stream with it."""
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=2, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          entropy_coef=0.0, grad_clip=1.0, ptx_coef=1.0, ptx_batch=2, ptx_len=8)
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    text = np.tile(np.array([4, 9, 2, 7, 11], dtype=np.uint16), 40)  # a pattern to learn
    x = torch.from_numpy(text[:30].astype(np.int64))[None]
    y = torch.from_numpy(text[1:31].astype(np.int64))[None]
    losses = {}
    for ptx_data in (None, text):
        policy, ref, value, rm = tiny_models(2)
        b = ppo.rollout(policy, ref, value, rm_score(rm), [[5, 6], [7, 8]], 0.0, cfg,
                        SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(0), "cpu")
        b["advantages"] = torch.zeros_like(b["advantages"])
        opt_p = policy.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        opt_v = value.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        before = policy(x, y)[1].item()
        stats = ppo.ppo_update(policy, value, opt_p, opt_v, b, cfg, 1e-2, 1e-2,
                               torch.Generator().manual_seed(0), run, ptx_data=ptx_data)
        losses[ptx_data is None] = (before, policy(x, y)[1].item(), stats)
    before, after, stats = losses[True]
    assert after == pytest.approx(before, abs=1e-6) and "loss/ptx" not in stats
    before, after, stats = losses[False]
    assert after < before - 0.1 and 0 < stats["loss/ptx"] < before


def test_shared_value_head_reads_the_same_positions_as_separate_models():
    """--value_head=shared: one forward pass gives the policy's log-probs and entropies
    exactly as response_logprobs does, and values read where each response token is
    predicted; padded rows equal the rows alone."""
    policy, ref, _, rm = tiny_models(2)
    shared = ppo.SharedValueHead(policy)
    torch.nn.init.normal_(shared.head.weight, std=1.0)
    cfg = SimpleNamespace(max_new_tokens=8, temperature=0.7, compile=False,
                          missing_end_penalty=-5.0, whiten_rewards=False, gamma=1.0, lam=0.95)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    b = ppo.rollout(shared, ref, None, rm_score(rm), prompts, 0.1, cfg,
                    SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(3), "cpu")
    with torch.no_grad():
        logp, ent = response_logprobs(policy, b["tokens"], attn_mask=b["attn"], start=b["P"],
                                      temperature=0.7, entropy=True)
        assert torch.allclose(b["logp"], logp * b["mask"], atol=1e-6)
        assert torch.allclose(b["entropy"], ent, atol=1e-6)
        for i, p in enumerate(prompts):
            n = int(b["mask"][i].sum())
            alone = torch.tensor([p + b["responses"][i]])
            h = policy.hidden(alone)
            want = shared.head(h)[0, len(p) - 1:-1, 0]
            assert torch.allclose(b["values"][i, :n], want, atol=1e-5)
            assert (b["values"][i, n:] == 0).all()


def test_shared_value_head_one_loss_one_step_by_hand():
    """One update with the shared head under plain SGD: every weight moves by −lr times
    the gradient of policy loss + vf_coef · value loss, computed here by hand on a copy;
    the head at value_lr, the trunk at the policy's rate. PPO-ptx's call returns the
    next-token loss alone."""
    import copy
    policy, ref, _, rm = tiny_models(1)
    shared = ppo.SharedValueHead(policy)
    cfg = SimpleNamespace(max_new_tokens=6, temperature=1.0, compile=False,
                          missing_end_penalty=-1.0, whiten_rewards=False, gamma=1.0, lam=0.95,
                          ppo_epochs=1, minibatch_size=2, clip_range=0.2, clip_range_value=0.2,
                          entropy_coef=0.0, grad_clip=0.0, vf_coef=0.5)
    b = ppo.rollout(shared, ref, None, rm_score(rm), [[5, 6], [7, 8]], 0.0, cfg,
                    SimpleNamespace(end=3, pad=0), torch.Generator().manual_seed(0), "cpu")
    b["advantages"] = ppo.whiten(b["advantages"], b["mask"])
    assert (b["values"] == 0).all()  # the head starts at zero
    hand = copy.deepcopy(shared)
    logp, _, values = ppo.policy_and_values(hand, b["tokens"], b["attn"], b["P"], 1.0)
    m = b["mask"]
    pg = ppo.policy_loss(logp, b["logp"], b["advantages"], m, 0.2)[0]
    vf = ppo.value_loss(values, b["values"], b["returns"], m, 0.2)[0]
    (pg + 0.5 * vf).backward()
    opt = torch.optim.SGD([{"params": list(policy.parameters())},
                           {"params": list(shared.head.parameters())}], lr=0.0)
    run = SimpleNamespace(world_size=1, autocast=torch.autocast("cpu", enabled=False))
    stats = ppo.ppo_update(shared, None, opt, None, b, cfg, 1e-2, 1e-1,
                           torch.Generator().manual_seed(0), run)
    assert stats["loss/value"] == pytest.approx(0.5 * ((b["returns"] ** 2 * m).sum()
                                                       / m.sum()).item(), rel=1e-5)
    for (name, p), q in zip(shared.named_parameters(), hand.parameters()):
        lr = 1e-1 if name.startswith("head.") else 1e-2
        assert torch.allclose(p.detach(), q.detach() - lr * q.grad, atol=1e-6), name
    assert shared.head.weight.abs().sum() > 0  # the head learned from the value loss
    x = torch.tensor([[5, 6, 7, 8]])
    y = torch.tensor([[6, 7, 8, 9]])
    assert shared(x, y)[1].item() == pytest.approx(policy(x, y)[1].item(), rel=1e-6)


def test_frozen_models_in_bf16_stay_close_to_fp32():
    """--frozen_dtype=bf16: the reference's and reward model's weights in bfloat16, no
    gradients; their log-probs and scores stay within bf16's precision of fp32's."""
    from model import freeze
    policy, ref, _, rm = tiny_models(3)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [4, 4, 11, 12, 3, 0]])
    with torch.no_grad():
        want = response_logprobs(ref, tokens, start=2)
        want_score = rm(collate([[5, 6, 7, 8]], [2], 0, "cpu"))
        freeze(ref, "bf16"), freeze(rm.members, "bf16")
        got = response_logprobs(ref, tokens, start=2)
        got_score = rm(collate([[5, 6, 7, 8]], [2], 0, "cpu"))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad
               for m in (ref, rm.members) for p in m.parameters())
    assert got.dtype == torch.float32 and got_score.dtype == torch.float32
    assert torch.allclose(got, want, atol=0.05) and not torch.equal(got, want)
    assert torch.allclose(got_score, want_score, atol=0.05)
