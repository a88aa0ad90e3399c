"""optim.py: the learning-rate schedule, the guard that skips non-finite updates, Muon."""

import io
import math

import pytest
import torch

import optim
from cli import UserError
from model import GPT, GPTConfig


def test_lr_schedule():
    assert optim.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert optim.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert optim.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    # half-way down the cosine
    assert optim.lr_at(55, 1.0, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert optim.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert optim.lr_at(0, 1.0, 0, 100) == pytest.approx(1.0)  # no warmup: the peak at once


def test_set_lr():
    opt = torch.optim.AdamW([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=1.0)
    optim.set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_non_finite_guard_skips_counts_and_stops(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    guard = optim.NonFiniteGuard(limit=3, ckpt_path=str(ckpt))
    assert guard.ok(1.0, 0, 2.0) and guard.logged() == {}
    assert not guard.ok(math.nan, 1, 2.0)
    assert not guard.ok(1.0, 2, math.inf)  # a non-finite loss counts too
    assert guard.logged() == {"skipped": 2}
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "warning: step 1: non-finite loss or gradient, update skipped (1 so far)",
        "warning: step 2: non-finite loss or gradient, update skipped (2 so far)"]
    assert guard.ok(1.0, 3)  # a good step resets the run of skips, not the count
    assert guard.logged() == {"skipped": 2}
    assert not guard.ok(math.nan, 4) and not guard.ok(math.nan, 5)
    with pytest.raises(UserError) as e:  # the third in a row: stop
        guard.ok(math.nan, 6)
    assert str(e.value) == ("3 non-finite updates in a row, at step 6: stopping; try a lower "
                            "--learning_rate or --grad_clip")
    ckpt.write_bytes(b"x")  # once a checkpoint exists, the message says it is the good one
    with pytest.raises(UserError, match=f"step 7: stopping; {ckpt} holds the last good weights"):
        guard.ok(math.nan, 7)


def test_non_finite_guard_counts_each_models_run_of_skips(capsys):
    """PPO steps the policy and the value model in turn: the value model's good updates do
    not reset the policy's run of skips."""
    guard = optim.NonFiniteGuard(limit=3)
    for step in range(2):
        assert not guard.ok(math.nan, step, model="policy")
        assert guard.ok(1.0, step, model="value model")
    assert capsys.readouterr().out.splitlines()[0] == (
        "warning: step 0: non-finite loss or gradient of the policy, update skipped (1 so far)")
    with pytest.raises(UserError, match="3 non-finite updates in a row, at step 2"):
        guard.ok(math.nan, 2, model="policy")


def odd_quintic(s, steps):
    """orthogonalise on one singular value s (already divided by the norm), by hand."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def test_orthogonalise_moves_each_singular_value_by_the_polynomial():
    # diag(3, 4) has Frobenius norm 5: singular values 0.6 and 0.8 after the division
    one = optim.orthogonalise(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), steps=1)
    assert one[0, 0].item() == pytest.approx(2.0667 - 4.775 * 0.216 + 2.0315 * 0.07776, rel=1e-5)
    assert one[0, 0].item() == pytest.approx(odd_quintic(0.6, 1), rel=1e-5)
    assert one[1, 1].item() == pytest.approx(odd_quintic(0.8, 1), rel=1e-5)
    assert one[0, 1].item() == one[1, 0].item() == 0.0
    # a general matrix, wide and tall: the same singular vectors, every singular value
    # moved into about [0.7, 1.2] (what five rounds of these coefficients give)
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m in (g, g.T):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        out = optim.orthogonalise(m)
        assert out.shape == m.shape and out.dtype == m.dtype
        inner = u.T @ out @ vh.T  # diagonal when the singular vectors are kept
        assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-6)
        expected = torch.tensor([odd_quintic(x, 5) for x in (s / m.norm()).tolist()],
                                dtype=torch.float64)
        assert torch.allclose(torch.diagonal(inner), expected, atol=1e-5)
        assert expected.min() > 0.65 and expected.max() < 1.25


def test_muon_step_by_hand():
    w = torch.nn.Parameter(torch.eye(2))
    opt = optim.Muon([{"params": [w], "muon": True, "weight_decay": 0.5}], lr=0.1, momentum=0.9)
    w.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    opt.step()
    # momentum M = G; the update orthogonalises G + 0.9·M = 1.9·G, the same direction as G;
    # scale 0.2·sqrt(2); decay multiplies W by 1 − 0.1·0.5 first
    scale = 0.1 * 0.2 * 2 ** 0.5
    assert w[0, 0].item() == pytest.approx(0.95 - scale * odd_quintic(0.6, 5), rel=1e-5)
    assert w[1, 1].item() == pytest.approx(0.95 - scale * odd_quintic(0.8, 5), rel=1e-5)
    # second step, gradient along the other diagonal entry only: M = 0.9·G1 + G2 = diag(2.7,
    # 5.6)... G2 + 0.9·M = diag(0 + 2.43, 2 + 5.04)
    before = w.detach().clone()
    w.grad = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    opt.step()
    d = torch.tensor([2.43, 7.04])
    s = (d / d.norm()).tolist()
    expected = before * 0.95 - scale * torch.diag(torch.tensor([odd_quintic(x, 5) for x in s]))
    assert torch.allclose(w.detach(), expected, atol=1e-5)


def test_muon_rest_is_adamw():
    g = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = optim.Muon([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:]}], lr=0.01,
                      betas=(0.8, 0.9))
    torch_adamw = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1},
                                     {"params": b[1:], "weight_decay": 0.0}], lr=0.01,
                                    betas=(0.8, 0.9), eps=1e-8)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        torch_adamw.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6)
    # its state survives a checkpoint's round trip: a copy continues identically
    copy = [torch.nn.Parameter(p.detach().clone()) for p in a]
    again = optim.Muon([{"params": copy[:1], "weight_decay": 0.1}, {"params": copy[1:]}],
                       lr=0.01, betas=(0.8, 0.9))
    saved = io.BytesIO()
    torch.save(ours.state_dict(), saved)
    saved.seek(0)
    again.load_state_dict(torch.load(saved))
    for opt, ps in ((ours, a), (again, copy)):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    for p, q in zip(a, copy):
        assert torch.equal(p, q)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2-D"):
        optim.Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)


def test_muon_optimizer_groups():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                          bias=True))
    opt = optim.muon_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
    hidden, rest, gains = opt.param_groups
    assert [g["muon"] for g in opt.param_groups] == [True, False, False]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    blocks = [p for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    assert {id(p) for p in hidden["params"]} == {id(p) for p in blocks if p.dim() == 2}
    # the tied embedding / output head and the position embedding stay with AdamW
    assert {id(p) for p in rest["params"]} == {id(model.transformer.wte.weight),
                                               id(model.transformer.wpe.weight)}
    assert {id(p) for p in gains["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
