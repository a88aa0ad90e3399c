"""eval.py's measurements on hand-made numbers and tiny random models: win rate, the
best-of-n KL, best-of-n's choice, the log reader, and overopt.py's summary of a curve
(the sampled KL against per-sequence log-probs is in test_batch.py)."""

import json
import math
import random

import pytest
import torch

import eval as evaluation
import overopt
from batch import sample_responses
from data import tokenizer as tok
from data import world
from model import GPT, GPTConfig

TEXT = ("What is 38 + 47? 38 + 47 = 85. Which is larger: 12 or 7? 12 is larger. "
        "Sort: 3 1 2. 1 2 3\n" * 30)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.tiktoken"
    path.write_text(tok.format_ranks(tok.train_bpe(TEXT, 290)))
    return tok.load_tokenizer(path)


def tiny(enc, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32,
                         dropout=0.0)).eval()


def test_best_of_n_kl_closed_form():
    assert evaluation.best_of_n_kl(1) == 0
    assert evaluation.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluation.best_of_n_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def test_win_rate_and_summary_by_hand():
    rows = [dict(gold=1.0, correct=True), dict(gold=0.5, correct=False),
            dict(gold=1.5, correct=False)]
    base = [dict(gold=0.5, correct=False), dict(gold=0.5, correct=False),
            dict(gold=1.0, correct=True)]
    # two wins and a tie; the other way round, two losses and a tie
    assert evaluation.win_rate(rows, base) == pytest.approx((1 + 0.5 + 1) / 3)
    assert evaluation.win_rate(base, rows) == pytest.approx((0 + 0.5 + 0) / 3)
    s = evaluation.summarize([{**r, "proxy": p} for r, p in zip(rows, (1.0, 2.0, 3.0))], base)
    assert s["gold"] == pytest.approx(1.0) and s["correct"] == pytest.approx(1 / 3)
    assert s["proxy"] == 2.0
    assert s["n"] == 3 and "kl" not in s and s["win"] == pytest.approx(2.5 / 3)


class LengthReward(torch.nn.Module):
    """A stand-in reward model that likes long responses: score = response tokens."""

    def forward(self, batch):
        return (batch.lengths - batch.prompt_lengths).float()


def test_best_of_n_keeps_the_reward_models_favourite_of_the_first_n(enc):
    model = tiny(enc, 2)
    tasks = [world.sample_task(random.Random(i), "add", "train") for i in range(3)]
    cfg = evaluation.Config(max_new_tokens=6, batch_size=4, seed=7)
    out = evaluation.best_of_n(model, LengthReward(), enc, tasks, [1, 2, 4], cfg, "cpu")
    # the same samples again: best_of_n draws 4 per prompt from seed + 1
    prompts = [t.prompt for t in tasks for _ in range(4)]
    pairs = sample_responses(model, enc, prompts, 6, 1.0, 8, "cpu", 4)
    lengths = torch.tensor([len(r) for _, r in pairs]).view(3, 4)
    for n, rows in out.items():
        assert [r["proxy"] for r in rows] == lengths[:, :n].max(1).values.float().tolist()
        for i, row in enumerate(rows):
            j = lengths[i, :n].argmax().item()
            assert row["text"] == tok.decode_response(enc, pairs[i * 4 + j][1])[0]
    assert all(a["proxy"] <= b["proxy"] for a, b in zip(out[1], out[4]))


def test_read_log_keeps_the_last_record_of_each_step(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"config": {}}, {"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.0},
             {"config": {}, "start_step": 1}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.0},
             {"final": {}}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [r["loss"] for r in evaluation.read_log(path)] == [3.0, 2.5, 1.0]
    assert evaluation.read_log(tmp_path / "missing.jsonl") == []
    path.write_text("{not json\n")
    assert evaluation.read_log(path) == []


def test_overopt_findings_name_the_peak():
    pts = [dict(seed=1, method=f"PPO β={b}", kl=k, sqrt_kl=math.sqrt(k), proxy=p, gold=g)
           for b, k, p, g in ((1, 0.25, 0.1, 0.9), (0.1, 1.0, 0.5, 1.0),
                              (0, 4.0, 1.5, 0.3))]
    text = overopt.findings(pts)
    assert "proxy goes +0.10 → +1.50" in text and "gold score 0.90 → 0.30" in text
    assert "gold peaks at PPO β=0.1 (1.00, √KL 1.00)" in text


def test_win_rate_counts_ties_half():
    rows = [{"gold": 1.5}, {"gold": 0.5}, {"gold": 1.0}, {"gold": 1.0}]
    base = [{"gold": 1.0}, {"gold": 1.0}, {"gold": 1.0}, {"gold": 0.0}]
    assert evaluation.win_rate(rows, base) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
