"""The DPO family's losses on hand-computed numbers, and the cached reference."""

import math

import pytest
import torch

import dpo
from model import GPT, GPTConfig


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


# policy / reference summed log-probs of chosen and rejected: h = (-1 + 2) - (-3 + 2) = 2
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_dpo():
    assert dpo.dpo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx(-logsig(0.5 * 2))


def test_cdpo_is_dpo_with_flipped_labels():
    expect = -0.9 * logsig(1.0) - 0.1 * logsig(-1.0)
    assert dpo.cdpo_loss(PC, PR, RC, RR, beta=0.5, eps=0.1).item() == pytest.approx(expect)
    assert dpo.cdpo_loss(PC, PR, RC, RR, 0.5, 0.0).item() == pytest.approx(dpo.dpo_loss(PC, PR, RC, RR, 0.5).item())


def test_ipo_regresses_the_margin_to_its_target():
    assert dpo.ipo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    assert dpo.ipo_loss(PC, PR, RC, RR, beta=0.25).item() == pytest.approx(0.0)  # margin 2 = 1/(2*0.25)


def test_simpo_uses_mean_log_probs_and_no_reference():
    # chosen: -2 over 4 tokens, rejected: -6 over 3 tokens; beta 2, gamma 1: 2 * (-0.5 + 2) - 1 = 2
    assert dpo.simpo_loss(t(-2.0), t(-6.0), t(4.0), t(3.0), beta=2.0, gamma=1.0).item() == pytest.approx(-logsig(2))


def test_orpo():
    def log_odds(mean):
        return mean - math.log(1 - math.exp(mean))
    ratio = log_odds(-2 / 4) - log_odds(-6 / 3)
    expect = 2 / 4 + 0.1 * -logsig(ratio)
    assert dpo.orpo_loss(t(-2.0), t(-6.0), t(4.0), t(3.0), lam=0.1).item() == pytest.approx(expect)


def test_kto():
    p, r, desirable = t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False])
    loss = dpo.kto_loss(p, r, desirable, beta=0.5, z0=0.2, w_desirable=1.0, w_undesirable=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.tolist() == pytest.approx([1 - sig(0.5 * (1 - 0.2)), 2.0 * (1 - sig(0.5 * (0.2 + 1)))])
    assert dpo.kto_reference_point(p, r).item() == 0.0  # mean log-ratio is 0: clamped at 0
    assert dpo.kto_reference_point(t(-1.0, -1.0), r).item() == pytest.approx(1.0)


def test_cached_reference_equals_recomputed():
    """The loss with reference log-probs computed once equals the loss with the reference
    run on each batch."""
    torch.manual_seed(0)
    cfg_m = GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    policy, ref = GPT(cfg_m), GPT(cfg_m)
    seqs = [([1, 2, 3, 4, 5], 2), ([1, 2, 6], 2), ([7, 8, 9, 10], 3), ([7, 8, 11, 12, 13, 14], 3)]
    pairs = [(0, 1), (2, 3), (3, 2)]
    cached = dpo.reference_logps(ref, seqs, pad=0, device="cpu", batch=3)
    cfg = dpo.Config(loss="dpo", beta=0.3)
    batch = dpo.make_batch((seqs, pairs, cached, [False] * 4), [0, 1, 2], cfg, pad=0, device="cpu")
    loss_cached, diag = dpo.batch_loss(policy, batch, cfg)
    with torch.no_grad():
        fresh = dpo.sequence_logps(ref, batch[0], batch[1])[0]
    loss_fresh, _ = dpo.batch_loss(policy, (batch[0], batch[1], fresh), cfg)
    assert loss_cached.item() == pytest.approx(loss_fresh.item(), abs=1e-6)
    assert 0 <= diag["rewards/accuracy"] <= 1


def test_sequence_logps_count_response_tokens_only():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    tokens, mask = dpo.collate([([1, 2, 3, 4], 2), ([5, 6, 7], 1)], pad=0, device="cpu")
    lp, n = dpo.sequence_logps(m, tokens, mask)
    assert n.tolist() == [2.0, 2.0]
    logits, _ = m(tokens)
    full = torch.log_softmax(logits.double(), -1)
    expect0 = full[0, 1, 3] + full[0, 2, 4]  # tokens 3 and 4 given their prefixes
    assert lp[0].item() == pytest.approx(expect0.item(), abs=1e-5)


def test_win_rate_counts_ties_half():
    import eval as ev
    rows = [{"gold": 1.5}, {"gold": 0.5}, {"gold": 1.0}, {"gold": 1.0}]
    base = [{"gold": 1.0}, {"gold": 1.0}, {"gold": 1.0}, {"gold": 0.0}]
    assert ev.win_rate(rows, base) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_several_preference_sets_load_as_one(tmp_path):
    """--prefs=a,b: the second set's pairs point at its own responses, after the first's."""
    import json

    from data import tokenizer as tok
    path = tmp_path / "t.tiktoken"
    path.write_text(tok.format_ranks(tok.train_bpe("What is 2 + 3? 2 + 3 = 5. Great question! " * 20, 280)))
    enc = tok.load_tokenizer(path)

    def write(name, texts, ranking):
        rec = dict(prompt="What is 2 + 3?", responses=[dict(text=x) for x in texts], ranking=ranking)
        (tmp_path / f"{name}_train.jsonl").write_text(json.dumps(rec) + "\n")

    write("a", ["2 + 3 = 5.", "2 + 3 = 6."], [0, 1])
    write("b", ["5", "Great question! 5", "2 + 3 = 4."], [1, 0, 2])
    seqs, pairs, desirable = dpo.load_sets(str(tmp_path), "a,b", "train", enc, 64)
    assert len(seqs) == 5 and pairs == [(0, 1), (3, 2), (3, 4), (2, 4)]
    assert desirable == [True, False, False, True, False]  # top half of each ranking
    chosen = enc.decode(seqs[3][0][seqs[3][1]:])
    assert chosen.startswith("Great question! 5")
    with pytest.raises(Exception, match="c_train.jsonl not found"):
        dpo.load_sets(str(tmp_path), "a,c", "train", enc, 64)
