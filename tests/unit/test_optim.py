"""optim.py: the learning-rate schedule and the guard that skips non-finite updates."""

import math

import pytest
import torch

import optim
from cli import UserError


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
