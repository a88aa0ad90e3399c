"""The reward model's loss, pairs, pooling, normalisation and diagnostics, on hand-made
numbers (reward.py and reward_model.py); an ensemble's run is in tests/e2e, bad
preference records in test_bad_input.py."""

import math

import pytest
import torch

import reward
from batch import collate
from data import world
from model import GPT, GPTConfig, ScalarGPT
from reward_model import RewardMember, RewardModel, member_scores, pool_scores


def test_bradley_terry_loss_by_hand():
    loss, right = reward.bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]),
                                            torch.tensor([1.0, 0.0, 1.0]))
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    assert loss.tolist() == pytest.approx(expected)
    assert right.tolist() == [1.0, 0.0, 0.0]  # a tie is not a win


def test_collate_indexes_pairs_across_rankings():
    rankings = [dict(seqs=[[1, 2, 3], [1, 2]], prompt_len=1, pairs=[(1, 0)]),
                dict(seqs=[[4, 5], [4, 5, 6, 7], [4]], prompt_len=1, pairs=[(0, 2), (1, 2)])]
    b, chosen, rejected = reward.collate(rankings, pad=0, device="cpu")
    assert b.tokens.tolist() == [[1, 2, 3, 0], [1, 2, 0, 0], [4, 5, 0, 0], [4, 5, 6, 7],
                                 [4, 0, 0, 0]]
    assert b.lengths.tolist() == [3, 2, 2, 4, 1] and b.prompt_lengths.tolist() == [1] * 5
    assert b.mask.sum(1).tolist() == [2, 1, 1, 3, 0]  # response tokens after the 1-token prompt
    assert chosen.tolist() == [1, 2, 3] and rejected.tolist() == [0, 4, 4]


def test_pooling():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 9.0, 9.0]])
    lengths, prompt_lens = torch.tensor([3, 2]), torch.tensor([1, 1])
    assert pool_scores(values, lengths, prompt_lens, "last").tolist() == [3.0, 5.0]
    # the response tokens only
    assert pool_scores(values, lengths, prompt_lens, "mean").tolist() == [2.5, 5.0]
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(values, lengths, prompt_lens, "max")


def test_reward_model_normalises_and_reduces():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=1, n_embd=8)
    members = [RewardMember(cfg) for _ in range(2)]  # the plain head (likelihood=False)
    for m in members:
        torch.nn.init.normal_(m.score.weight)
    tokens = torch.randint(11, (5, 6))
    lengths = [6, 5, 4, 6, 3]
    b = collate([tokens[i, :n].tolist() for i, n in enumerate(lengths)], [2] * 5, 0, "cpu")
    # a member's score: its scalar at each row's last real token
    raw = torch.stack([m(tokens)[torch.arange(5), torch.tensor(lengths) - 1] for m in members])
    norms = [[2.0, -1.0], [0.5, 3.0]]
    expect = raw * torch.tensor([[2.0], [0.5]]) + torch.tensor([[-1.0], [3.0]])
    rm_mean = RewardModel(members, norms, "last", "mean")
    rm_min = RewardModel(members, norms, "last", "min")
    assert torch.allclose(member_scores(members[0], b, "last"), raw[0], atol=1e-5)
    assert torch.allclose(rm_mean(b), expect.mean(0), atol=1e-5)
    assert torch.allclose(rm_min(b), expect.min(0).values, atol=1e-5)
    rm_mean(b).sum().backward()  # gradients flow: callers that only score use no_grad
    assert members[0].score.weight.grad is not None
    with pytest.raises(ValueError, match="reduce"):
        RewardModel(members, norms, "last", "max")


def test_partial_correlation_measures_what_it_claims():
    """A reward that is the gold score plus noise does not follow length beyond gold; one
    that adds a length bonus does, and strongly."""
    g = torch.Generator().manual_seed(0)
    gold = torch.randn(2000, generator=g)
    # longer answers are worse, as in the world
    words = (5 + 3 * torch.rand(2000, generator=g) - 2 * gold).round()
    unbiased = 3 * gold + 0.3 * torch.randn(2000, generator=g)
    biased = unbiased + 0.5 * words
    # the raw correlation is confounded by gold
    assert torch.corrcoef(torch.stack([unbiased, words]))[0, 1] < -0.5
    assert abs(reward.partial_corr(unbiased, words, gold)) < 0.05
    assert reward.partial_corr(biased, words, gold) > 0.8
    # raters without biases: utility = k * gold up to rounding of the stored figures
    rounded = (3 * gold * 1e4).round() / 1e4
    assert reward.partial_corr(rounded, words, (gold * 1e4).round() / 1e4) == 0.0


def test_likelihood_term_by_hand():
    """r = head(h_last) + Σ over response tokens of gate(h_{t-1})·log p(y_t), against the
    language model's own log-softmax, token by token; right padding changes nothing."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=1, n_embd=8)
    lm = GPT(cfg).eval()
    rm = RewardMember.from_lm(lm, likelihood=True).eval()
    with torch.no_grad():
        for p in (rm.score.weight, rm.gate.weight):
            p.normal_()
    seqs, plens = [[1, 2, 3, 4, 5, 6], [7, 8, 9]], [2, 1]
    expect = []
    with torch.no_grad():
        for s, P in zip(seqs, plens):
            x = torch.tensor([s])
            h = rm.hidden(x)[0]
            # the trunk is the LM's, so are its log-probs
            logp = torch.log_softmax(lm(x)[0][0].double(), -1)
            total = rm.score(h[-1]).item()
            for t in range(P, len(s)):
                total += rm.gate(h[t - 1]).item() * logp[t - 1, s[t]].item()
            expect.append(total)
        tokens = torch.tensor([seqs[0], seqs[1] + [0, 0, 0]])
        lengths, prompt_lens = torch.tensor([6, 3]), torch.tensor(plens)
        got = pool_scores(rm(tokens, prompt_lengths=prompt_lens), lengths, prompt_lens, "last")
        alone = pool_scores(rm(tokens[1:, :3], prompt_lengths=prompt_lens[1:]), lengths[1:],
                            prompt_lens[1:], "last")
        batch = collate(seqs, plens, 0, "cpu")
        # a Batch: the same call, the shortest prompt's length read from the host
        assert batch.shortest_prompt == min(plens)
        assert torch.equal(member_scores(rm, batch, "last"), got)
        given = rm(tokens, prompt_lengths=prompt_lens, shortest=min(plens))
        assert torch.equal(given, rm(tokens, prompt_lengths=prompt_lens))
    assert got.tolist() == pytest.approx(expect, abs=1e-5)
    # padded or not, the same reward (float32 sums of a few terms of size ~5: 1e-5)
    assert alone.item() == pytest.approx(got[1].item(), abs=1e-5)
    # a fresh gate starts as 0.3 × log-likelihood, and the value model leaves it behind
    assert RewardMember(cfg, likelihood=True).gate.bias.item() == pytest.approx(0.3)
    assert RewardMember(cfg).gate is None
    assert not any(k.startswith("gate.") for k in rm.trunk_and_head())
    ScalarGPT(cfg).load_state_dict(rm.trunk_and_head())  # strict: exactly a value model's weights
    with pytest.raises(ValueError, match="prompt_lengths"):
        rm(tokens)


def test_evaluate_against_the_raters_by_hand():
    """Expected accuracy (the raters' probability of the order the model prefers) and the
    Bayes-optimal accuracy, overall and per family, on two made-up rankings; the accuracy
    on pairs whose answers differ in correctness, by the gold scorer's check (a right
    answer said verbosely scores below a wrong one said plainly, and is still right)."""
    add = world.Task("add", (38, 47), "What is 38 + 47?")
    capital = world.Task("capital", ("Peru",), "What is the capital of Peru?")

    def response(task, text, utility, style="ideal"):
        return dict(text=text, ended=True, gold=world.gold(task, text, True), utility=utility,
                    style=style)

    verbose = "You asked: What is 38 + 47? I think 38 + 47 = 85. Please double-check this."
    rankings = [  # the sequences only set the batch shape; the scores come from `fixed`
        dict(seqs=[[1, 2], [1, 3], [1, 4]], prompt_len=1, pairs=[(0, 1), (0, 2), (1, 2)],
             rec=dict(family="arithmetic", task=add.to_dict(), responses=[
                 response(add, "38 + 47 = 85.", 2.0), response(add, verbose, 1.0, "verbose"),
                 response(add, "38 + 47 = 84.", 0.0, "wrong")])),
        dict(seqs=[[5, 6], [5, 7]], prompt_len=1, pairs=[(1, 0)],
             rec=dict(family="facts", task=capital.to_dict(), responses=[
                 response(capital, "The capital of Peru is Lima.", 0.5),
                 response(capital, "The capital of Peru is Quito.", 0.5, "wrong")])),
    ]
    assert rankings[0]["rec"]["responses"][1]["gold"] < rankings[0]["rec"]["responses"][2]["gold"]
    # prefers b over a, a over c, b over c; ties d and e
    scores = torch.tensor([0.0, 1.0, -1.0, 3.0, 3.0])

    def fixed(batch):  # a Batch of every response of the rankings, in order
        assert batch.tokens.tolist() == [[1, 2], [1, 3], [1, 4], [5, 6], [5, 7]]
        return scores[:len(batch)]

    res = reward.evaluate(fixed, rankings, pad=0, device="cpu")
    s = 1 / (1 + math.exp(-1.0))  # σ(1): the raters' P(a over b), P(b over c)
    s2 = 1 / (1 + math.exp(-2.0))  # σ(2): P(a over c)
    # sampled labels: pairs (a,b) wrong, (a,c) right, (b,c) right, (e,d) tie (not a win)
    assert res["accuracy"] == pytest.approx(2 / 4) and res["pairs"] == 4
    arith_expected = [1 - s, s2, s]
    arith_bayes = [s, s2, s]
    arith = res["by_family"]["arithmetic"]
    assert arith["expected_accuracy"] == pytest.approx(sum(arith_expected) / 3)
    assert arith["bayes_optimal"] == pytest.approx(sum(arith_bayes) / 3)
    assert res["by_family"]["facts"] == dict(pairs=1, expected_accuracy=pytest.approx(0.5),
                                             bayes_optimal=pytest.approx(0.5))
    assert res["expected_accuracy"] == pytest.approx((sum(arith_expected) + 0.5) / 4)
    assert res["bayes_optimal"] == pytest.approx((sum(arith_bayes) + 0.5) / 4)
    # correctness differs in (a,c), (b,c) and (e,d): right, right, a tie; (a,b) both right
    assert res["accuracy_correctness_differs"] == pytest.approx(2 / 3)
    assert res["accuracy_style_only"] == 0.0
    assert res["correctness_differs_by_family"] == {"arithmetic": 1.0, "facts": 0.0}


def test_ceiling_fit_recovers_the_raters_when_it_sees_their_features():
    """bench/reward_ceiling.py: a Bradley-Terry fit on the features the raters' utility is
    made of reaches the Bayes-optimal accuracy; one that misses a feature falls short."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "reward_ceiling.py"
    spec = importlib.util.spec_from_file_location("reward_ceiling", path)
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)

    g = torch.Generator().manual_seed(0)
    n = 4000
    rows = [dict(words=float(w), preamble=float(p), correct=float(c)) for w, p, c in
            zip(torch.randint(2, 12, (n,), generator=g), torch.rand(n, generator=g) < 0.3,
                torch.rand(n, generator=g) < 0.5)]
    utility = torch.tensor([3.0 * r["correct"] + 0.12 * r["words"] + 1.5 * r["preamble"]
                            for r in rows], dtype=torch.float64)
    pairs = []
    for a in range(0, n, 2):  # each pair in the order the raters drew
        b = a + 1
        won = torch.rand(1, generator=g).item() < torch.sigmoid(utility[a] - utility[b]).item()
        pairs.append((a, b) if won else (b, a))
    family = ["x"] * len(pairs)
    train = [(rows[: n // 2], utility[: n // 2], pairs[: n // 4], family[: n // 4])]
    held = (rows[n // 2:], utility[n // 2:], [(a - n // 2, b - n // 2) for a, b in pairs[n // 4:]],
            family[n // 4:])

    def accuracy(names):
        w = ceiling.fit(train, names)
        scores = ceiling.matrix(held[0], names) @ w
        return ceiling.expected_accuracy(scores, held[1], held[2], held[3])["all"]

    full, bayes = accuracy(["words", "preamble", "correct"])
    # the Bayes-optimal accuracy of the held-out pairs, from the raters' utilities
    p = [torch.sigmoid(held[1][a] - held[1][b]).item() for a, b in held[2]]
    assert bayes == pytest.approx(sum(max(x, 1 - x) for x in p) / len(p), abs=1e-9)
    assert full == pytest.approx(bayes, abs=0.005)
    assert accuracy(["words", "preamble"])[0] < bayes - 0.1  # without correctness


def test_answers_to_one_prompt_share_it():
    """A ranking's answers run their prompt once (reward_model.RewardMember with
    prompt_lengths): the same scores, under both poolings, and the same gradients as each
    answer scored alone."""
    from generation import distinct_prefixes

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    rm = RewardMember.from_lm(GPT(cfg), likelihood=True).eval()
    with torch.no_grad():
        for p in (rm.score.weight, rm.gate.weight):
            p.normal_()
    a, b = [1, 2, 3], [4, 5, 6, 7]  # two prompts; three answers to a, two to b
    seqs = [a + [8, 9], a + [9], a + [10, 8, 1, 2], b + [3], b + [5, 5, 5]]
    plens = [3, 3, 3, 4, 4]
    batch = collate(seqs, plens, 0, "cpu")
    # the batch's shortest prompt is 3 tokens; both rankings' rows share theirs
    assert distinct_prefixes(batch.tokens, torch.ones_like(batch.tokens, dtype=torch.bool),
                             3)[0].numel() == 2
    for pooling in ("last", "mean"):
        rm.zero_grad()
        together = member_scores(rm, batch, pooling)
        together.sum().backward()
        grads = [p.grad.clone() for p in rm.parameters()]
        rm.zero_grad()
        alone = torch.cat([member_scores(rm, collate([s], [n], 0, "cpu"), pooling)
                           for s, n in zip(seqs, plens)])
        alone.sum().backward()
        assert torch.allclose(together, alone, atol=1e-5)
        for g, p in zip(grads, rm.parameters()):
            assert torch.allclose(g, p.grad, atol=1e-5)
