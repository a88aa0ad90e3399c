"""The DPO family's losses on hand-computed numbers, the cached reference, and
several preference sets loaded as one."""

import json
import math

import pytest
import torch

import dpo
from batch import collate, sequence_logprobs
from cli import UserError
from data import tokenizer as tok
from model import GPT, GPTConfig


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


# policy / reference summed log-probs of chosen and rejected: h = (-1 + 2) - (-3 + 2) = 2
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
# a reference that does not cancel: h = (-1 + 1.5) - (-3 + 2.5) = 1; with the reference's
# two answers swapped h would be 3, without the reference 2, with it added 3
RC2, RR2 = t(-1.5), t(-2.5)


def test_dpo():
    assert dpo.dpo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx(-logsig(0.5 * 2))
    assert dpo.dpo_loss(PC, PR, RC2, RR2, beta=0.5).item() == pytest.approx(-logsig(0.5 * 1))


def test_cdpo_is_dpo_with_flipped_labels():
    expect = -0.9 * logsig(1.0) - 0.1 * logsig(-1.0)
    assert dpo.cdpo_loss(PC, PR, RC, RR, beta=0.5, eps=0.1).item() == pytest.approx(expect)
    plain = dpo.dpo_loss(PC, PR, RC, RR, 0.5).item()
    assert dpo.cdpo_loss(PC, PR, RC, RR, 0.5, 0.0).item() == pytest.approx(plain)
    expect = -0.9 * logsig(0.5) - 0.1 * logsig(-0.5)  # h = 1
    assert dpo.cdpo_loss(PC, PR, RC2, RR2, beta=0.5, eps=0.1).item() == pytest.approx(expect)


def test_ipo_regresses_the_margin_to_its_target():
    assert dpo.ipo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    # margin 2 = 1/(2*0.25)
    assert dpo.ipo_loss(PC, PR, RC, RR, beta=0.25).item() == pytest.approx(0.0)
    # h = 1: at the target 1/(2*0.5), and 1 short of 1/(2*0.25)
    assert dpo.ipo_loss(PC, PR, RC2, RR2, beta=0.5).item() == pytest.approx(0.0)
    assert dpo.ipo_loss(PC, PR, RC2, RR2, beta=0.25).item() == pytest.approx(1.0)


def test_simpo_uses_mean_log_probs_and_no_reference():
    # chosen: -2 over 4 tokens, rejected: -6 over 3 tokens; beta 2, gamma 1: 2 * (-0.5 + 2) - 1 = 2
    loss = dpo.simpo_loss(t(-2.0), t(-6.0), t(4.0), t(3.0), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(-logsig(2))


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
    assert loss.tolist() == pytest.approx([1 - sig(0.5 * (1 - 0.2)),
                                           2.0 * (1 - sig(0.5 * (0.2 + 1)))])
    assert dpo.kto_reference_point(p, r).item() == 0.0  # mean log-ratio 0
    assert dpo.kto_reference_point(t(-1.0, -1.0), r).item() == pytest.approx(1.0)
    # a negative mean log-ratio (-1) is clamped at 0; z0 carries no gradient
    below = t(-3.0, -3.0).requires_grad_()
    assert dpo.kto_reference_point(below, r).item() == 0.0
    z0 = dpo.kto_reference_point(t(-1.0, -1.0).requires_grad_(), r)
    assert not z0.requires_grad


def test_cached_reference_equals_recomputed():
    """The loss with reference log-probs computed once equals the loss with the reference
    run on each batch; the logged accuracy is the share of pairs whose implicit reward
    ranks chosen above rejected."""
    torch.manual_seed(0)
    cfg_m = GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    policy, ref = GPT(cfg_m), GPT(cfg_m)
    seqs = [([1, 2, 3, 4, 5], 2), ([1, 2, 6], 2), ([7, 8, 9, 10], 3), ([7, 8, 11, 12, 13, 14], 3)]
    pairs = [(0, 1), (2, 3), (3, 2)]
    cached = dpo.reference_logps(ref, seqs, pad=0, device="cpu", batch=3)
    cfg = dpo.Config(loss="dpo", beta=0.3)
    batch = dpo.make_batch((seqs, pairs, cached, [False] * 4), [0, 1, 2], cfg, pad=0,
                           device="cpu")
    rows = [0, 2, 3, 1, 3, 2]  # the chosen responses first, then the rejected ones
    assert batch[0].tokens.tolist() == collate([seqs[j][0] for j in rows],
                                               [seqs[j][1] for j in rows], 0, "cpu").tokens.tolist()
    assert torch.equal(batch[1], cached[rows])
    loss_cached, diag = dpo.batch_loss(policy, batch, cfg)
    with torch.no_grad():
        fresh = sequence_logprobs(ref, batch[0])[0]
        logp = sequence_logprobs(policy, batch[0])[0]
    loss_fresh, _ = dpo.batch_loss(policy, (batch[0], fresh), cfg)
    assert loss_cached.item() == pytest.approx(loss_fresh.item(), abs=1e-6)
    margin = (logp - fresh)[:3] - (logp - fresh)[3:]
    assert diag["rewards/accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert diag["rewards/margin"] == pytest.approx(0.3 * margin.mean().item(), abs=1e-6)
    assert loss_cached.item() == pytest.approx(
        dpo.dpo_loss(logp[:3], logp[3:], fresh[:3], fresh[3:], 0.3).mean().item(), abs=1e-6)


def test_rpo_adds_the_chosen_answers_nll_per_token():
    # chosen: -2 over 4 tokens -> 0.5 nats a token
    assert dpo.nll_per_token(t(-2.0), t(4.0)).item() == pytest.approx(0.5)
    torch.manual_seed(0)
    cfg_m = GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    policy, ref = GPT(cfg_m), GPT(cfg_m)
    seqs = [([1, 2, 3, 4, 5], 2), ([1, 2, 6], 2), ([7, 8, 9, 10], 3), ([7, 8, 11, 12, 13, 14], 3)]
    cached = dpo.reference_logps(ref, seqs, pad=0, device="cpu")
    data = (seqs, [(0, 1), (2, 3)], cached, [False] * 4)
    losses = {}
    for alpha in (0.0, 0.5):
        cfg = dpo.Config(loss="ipo", beta=0.3, nll_coef=alpha)
        batch = dpo.make_batch(data, [0, 1], cfg, pad=0, device="cpu")
        losses[alpha], diag = dpo.batch_loss(policy, batch, cfg)
    with torch.no_grad():
        logp, n = sequence_logprobs(policy, batch[0])
    nll = (-logp[:2] / n[:2]).mean().item()  # responses 0 and 2: 3 and 1 tokens
    assert n[:2].tolist() == [3, 1]
    assert diag["loss/nll"] == pytest.approx(nll, abs=1e-6)
    assert (losses[0.5] - losses[0.0]).item() == pytest.approx(0.5 * nll, abs=1e-6)


def test_kto_batch_holds_responses_and_labels():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    seqs = [([1, 2, 3], 1), ([4, 5], 1), ([6, 7, 8], 2)]
    cfg = dpo.Config(loss="kto", beta=0.5)
    ref = torch.tensor([-3.0, -2.0, -1.0])
    batch = dpo.make_batch((seqs, [0, 1, 2], ref, [True, False, True]), [2, 0], cfg, 0, "cpu")
    assert batch[0].tokens.tolist() == [[6, 7, 8], [1, 2, 3]]
    assert batch[1].tolist() == [-1.0, -3.0] and batch[2].tolist() == [True, True]
    loss, diag = dpo.batch_loss(policy, batch, cfg)
    with torch.no_grad():
        logp = sequence_logprobs(policy, batch[0])[0]
    z0 = dpo.kto_reference_point(logp, batch[1])
    assert diag["kto/z0"] == pytest.approx(z0.item())
    expect = dpo.kto_loss(logp, batch[1], batch[2], 0.5, z0, 1.0, 1.0).mean()
    assert loss.item() == pytest.approx(expect.item(), abs=1e-6)


def test_sequence_logps_count_response_tokens_only():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    b = collate([[1, 2, 3, 4], [5, 6, 7]], [2, 1], pad=0, device="cpu")
    lp, n = sequence_logprobs(m, b)
    assert n.tolist() == [2.0, 2.0]
    logits, _ = m(b.tokens)
    full = torch.log_softmax(logits.double(), -1)
    expect0 = full[0, 1, 3] + full[0, 2, 4]  # tokens 3 and 4 given their prefixes
    assert lp[0].item() == pytest.approx(expect0.item(), abs=1e-5)


def test_several_preference_sets_load_as_one(tmp_path):
    """--prefs=a,b: the second set's pairs point at its own responses, after the first's."""
    path = tmp_path / "t.tiktoken"
    text = "What is 2 + 3? 2 + 3 = 5. Great question! " * 20
    path.write_text(tok.format_ranks(tok.train_bpe(text, 280)))
    enc = tok.load_tokenizer(path)

    def write(name, texts, ranking):
        rec = dict(prompt="What is 2 + 3?", responses=[dict(text=x) for x in texts],
                   ranking=ranking)
        (tmp_path / f"{name}_train.jsonl").write_text(json.dumps(rec) + "\n")

    write("a", ["2 + 3 = 5.", "2 + 3 = 6."], [0, 1])
    write("b", ["5", "Great question! 5", "2 + 3 = 4."], [1, 0, 2])
    seqs, pairs, desirable = dpo.load_sets(str(tmp_path), "a,b", "train", enc, 64)
    assert len(seqs) == 5 and pairs == [(0, 1), (3, 2), (3, 4), (2, 4)]
    assert desirable == [True, False, False, True, False]  # top half of each ranking
    chosen = enc.decode(seqs[3][0][seqs[3][1]:])
    assert chosen.startswith("Great question! 5")
    with pytest.raises(UserError, match="c_train.jsonl not found"):
        dpo.load_sets(str(tmp_path), "a,c", "train", enc, 64)


def test_simpo_and_orpo_batches_pass_each_answers_own_length():
    """batch_loss hands SimPO and ORPO the chosen answers' lengths with the chosen log-probs
    and the rejected ones' with the rejected: lengths 3 and 1 against 1 and 3 tokens, so
    the two swapped give another loss."""
    torch.manual_seed(0)
    cfg_m = GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    policy = GPT(cfg_m)
    seqs = [([1, 2, 3, 4, 5], 2), ([1, 2, 6], 2), ([7, 8, 9, 10], 3), ([7, 8, 11, 12, 13, 14], 3)]
    data = (seqs, [(0, 1), (2, 3)], torch.zeros(4), [False] * 4)
    for cfg, loss_of in ((dpo.Config(loss="simpo", simpo_beta=2.0, simpo_gamma=0.5),
                          lambda pc, pr, nc, nr: dpo.simpo_loss(pc, pr, nc, nr, 2.0, 0.5)),
                         (dpo.Config(loss="orpo", orpo_lambda=0.3),
                          lambda pc, pr, nc, nr: dpo.orpo_loss(pc, pr, nc, nr, 0.3))):
        batch = dpo.make_batch(data, [0, 1], cfg, pad=0, device="cpu")
        with torch.no_grad():
            loss = dpo.batch_loss(policy, batch, cfg)[0].item()
            logp, n = sequence_logprobs(policy, batch[0])
        assert n.tolist() == [3, 1, 1, 3]  # chosen 0 and 2, then rejected 1 and 3
        assert loss == pytest.approx(loss_of(logp[:2], logp[2:], n[:2], n[2:]).mean().item(),
                                     abs=1e-6)
        swapped = loss_of(logp[:2], logp[2:], n[2:], n[:2]).mean().item()
        assert abs(loss - swapped) > 1e-3, cfg.loss
