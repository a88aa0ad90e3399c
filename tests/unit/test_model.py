import math

import pytest
import torch
import torch.nn.functional as F

import generation

from generation import KVCache, sample_next_token
from model import (IGNORE_INDEX, GPT, GPTConfig, ScalarGPT, attention_mask, token_entropy,
                   token_logprobs)

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def make_model(seed=0, **overrides):
    """A tiny GPT with large random weights. The standard 0.02 init plus weight tying makes a
    fresh model greedily repeat its last token forever; bigger weights give varied outputs,
    so that comparisons between generation paths actually test something."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def left_pad(seqs, pad=0):
    T = max(map(len, seqs))
    idx = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[False] * (T - len(s)) + [True] * len(s) for s in seqs])
    return idx, mask


def test_left_padded_forward_is_finite_everywhere():
    # a pad query has no real key before it; it must still attend to itself, or its softmax
    # row is empty and NaN would reach logits (and any loss computed over them)
    model = make_model()
    idx, mask = left_pad(PROMPTS)
    logits, _ = model(idx, attn_mask=mask)
    assert torch.isfinite(logits).all()
    allowed = attention_mask(mask, idx.size(1))  # (B, 1, T, T)
    assert allowed.shape == (len(PROMPTS), 1, idx.size(1), idx.size(1))
    assert allowed.any(dim=-1).all()
    # real queries see exactly the real keys at or before them
    B, T = idx.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = mask[:, :, None] & mask[:, None, :] & causal  # (B, T, T)
    assert torch.equal(allowed[:, 0][mask], real[mask])


def test_generation_is_not_trivial():
    # guards the other tests: a model that just repeats one token would make them vacuous
    tokens, _ = make_model().generate(PROMPTS, 16, temperature=0)
    assert all(len(set(row.tolist())) > 2 for row in tokens)


def test_kv_cache_greedy_matches_recompute():
    model = make_model()
    a, a_mask = model.generate(PROMPTS, 20, temperature=0, use_cache=True)
    b, b_mask = model.generate(PROMPTS, 20, temperature=0, use_cache=False)
    assert a.shape == (len(PROMPTS), 20)
    assert torch.equal(a, b) and torch.equal(a_mask, b_mask) and a_mask.all()


def test_kv_cache_logits_match_full_forward():
    # prefill a left-padded batch, then decode one token at a time through the cache; every
    # step's logits must equal the full forward pass over the whole sequence
    model = make_model()
    idx, mask = left_pad(PROMPTS)
    B, P = idx.shape
    cont = torch.randint(0, CFG["vocab_size"], (B, 6))
    full_idx = torch.cat([idx, cont], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(cont, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref, _ = model(full_idx, attn_mask=full_mask)  # (B, P+6, V)
        cache = KVCache(CFG["n_layer"], B, full_idx.size(1), device="cpu")
        steps = [model(idx, attn_mask=mask, cache=cache)[0]]
        for t in range(cont.size(1)):
            steps.append(model(cont[:, t:t + 1], cache=cache)[0])
    got = torch.cat(steps, dim=1)
    real = full_mask  # pad positions are garbage by design; compare real tokens only
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert cache.length == full_idx.size(1)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=5), dict(top_p=0.8),
                                    dict(temperature=0.7, top_k=10, top_p=0.9)])
def test_seeded_sampling_same_with_and_without_cache(kwargs):
    model = make_model()
    out = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        out.append(model.generate(PROMPTS, 16, generator=gen, use_cache=use_cache, **kwargs)[0])
    assert torch.equal(out[0], out[1])
    gen = torch.Generator().manual_seed(124)  # and the seed matters
    assert not torch.equal(out[0], model.generate(PROMPTS, 16, generator=gen, **kwargs)[0])


def test_a_prompt_asked_several_times_runs_its_prompt_pass_once():
    """GRPO's groups: rows that repeat a prompt share its prompt pass (the trunk sees the 3
    distinct prompts, then one row per answer at each step); the sampled answers, with an
    end token that rows reach at different steps, are those of the reference path that
    recomputes every row whole."""
    model = make_model()
    prompts = [PROMPTS[i] for i in (0, 0, 1, 0, 3, 1)]
    rows_seen = []
    model.transformer.h[0].register_forward_hook(lambda m, i, o: rows_seen.append(o.size(0)))
    out = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        out.append(model.generate(prompts, 16, generator=gen, use_cache=use_cache,
                                  stop_token=5, pad_token=0))
        rows_seen.append(None)
    assert rows_seen[0] == 3 and rows_seen[1] == 6  # the prompt pass, then the first step
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert len({tuple(r.tolist()) for r in out[0][0][[0, 1, 3]]}) == 3  # each its own draw
    assert not out[0][1].all()  # some row ended early


def test_left_padded_batch_matches_each_prompt_alone():
    model = make_model()
    batch, _ = model.generate(PROMPTS, 12, temperature=0)
    for i, p in enumerate(PROMPTS):
        alone, _ = model.generate([p], 12, temperature=0)
        assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model()
    greedy, _ = model.generate(PROMPTS, 10, temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(PROMPTS, 10, top_k=1, generator=gen)[0], greedy)
    assert torch.equal(model.generate(PROMPTS, 10, top_p=1e-6, generator=gen)[0], greedy)
    # a tiny temperature sharpens the distribution onto the argmax
    assert torch.equal(model.generate(PROMPTS, 10, temperature=1e-4, generator=gen)[0], greedy)


def test_sample_next_token_filters():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_k=2 and top_p=0.6 both keep tokens {0, 1}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    for kw in (dict(top_k=2), dict(top_p=0.6)):
        tok = sample_next_token(logits, generator=gen, **kw)
        assert set(tok.tolist()) == {0, 1}
    tok = sample_next_token(logits, generator=gen)
    assert set(tok.tolist()) == {0, 1, 2, 3}
    frac0 = (tok == 0).float().mean().item()
    assert abs(frac0 - 0.5) < 0.05


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    # the nucleus (Holtzman et al. 2020): the most probable tokens until their mass reaches
    # top_p, the boundary included. Probabilities 0.5, 0.25, 0.125, 0.125 (exact in
    # float32): top_p 0.75 is reached by {0, 1} exactly, so token 2 is out; a hair more
    # takes it in; 0.5 is token 0 alone
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log().expand(4000, 4)
    for top_p, kept in ((0.5, {0}), (0.74, {0, 1}), (0.75, {0, 1}), (0.76, {0, 1, 2}),
                        (1.0, {0, 1, 2, 3})):
        tok = sample_next_token(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert set(tok.tolist()) == kept, top_p
    # the kept tokens' probabilities renormalised: 2/3 and 1/3 at top_p 0.75
    tok = sample_next_token(logits, top_p=0.75, generator=torch.Generator().manual_seed(1))
    assert abs((tok == 0).float().mean().item() - 2 / 3) < 0.03


def test_sampled_frequencies_match_the_softmax():
    # inverse-CDF sampling: each token's share over many draws is its probability
    # (0.1, 0.2, 0, 0.3, 0.4 by construction); a zero-probability token is never drawn
    probs = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4])
    logits = probs.clamp(min=1e-30).log().expand(100_000, 5)
    tok = sample_next_token(logits, generator=torch.Generator().manual_seed(1))
    share = torch.bincount(tok, minlength=5).float() / tok.numel()
    assert share[2] == 0
    assert (share - probs).abs().max() < 0.005  # over 3 standard errors (at most 0.0015)
    # the same seed, the same tokens; temperature flattens as expected
    assert torch.equal(tok, sample_next_token(logits, generator=torch.Generator().manual_seed(1)))
    hot = sample_next_token(logits, temperature=1e6, generator=torch.Generator().manual_seed(2))
    hot_share = torch.bincount(hot, minlength=5).float() / hot.numel()
    assert (hot_share - 0.2).abs().max() < 0.01  # logits ÷ 1e6 are all ≈ 0: uniform


def test_token_logprobs_padding_invariance():
    model = make_model()
    torch.manual_seed(1)
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (5, 9, 12)]
    with torch.no_grad():
        alone = [token_logprobs(model(torch.tensor([s]))[0], torch.tensor([s]))[0] for s in seqs]
        # right padding: no mask needed, real positions come first
        T = max(map(len, seqs))
        right = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        rmask = torch.tensor([[True] * len(s) + [False] * (T - len(s)) for s in seqs])
        lp_right = token_logprobs(model(right)[0], right, rmask)
        # left padding: needs the attention mask (and positions derived from it)
        left, lmask = left_pad(seqs)
        lp_left = token_logprobs(model(left, attn_mask=lmask)[0], left, lmask)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        torch.testing.assert_close(lp_right[i, :n], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(lp_left[i, T - 1 - n:], alone[i], atol=1e-5, rtol=0)
        pad = T - len(s)
        assert (lp_right[i, n:] == 0).all()  # predicted token is padding
        # entry pad-1 predicts the first real token from pads only: meaningless but not masked
        assert (lp_left[i, :max(pad - 1, 0)] == 0).all()


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])  # (1, 3, 3)
    tokens = torch.tensor([[0, 2, 1]])

    def logp(row, j, temp=1.0):  # written out: log(exp(z_j/t) / sum_k exp(z_k/t))
        return math.log(math.exp(row[j] / temp) / sum(math.exp(z / temp) for z in row))

    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    expected = torch.tensor([[logp([0, 1, 2], 2), logp([1, 1, 1], 1)]])
    torch.testing.assert_close(out, expected)
    out = token_logprobs(logits, tokens, temperature=2.0)
    expected = torch.tensor([[logp([0, 1, 2], 2, 2.0), logp([1, 1, 1], 1, 2.0)]])
    torch.testing.assert_close(out, expected)
    # mask[:, 1:] False -> that predicted token's logprob is zeroed
    out = token_logprobs(logits, tokens, mask=torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[logp([0, 1, 2], 2), 0.0]]))
    # bf16 logits still give float32 results
    assert token_logprobs(logits.bfloat16(), tokens).dtype == torch.float32


def test_token_entropy():
    uniform = torch.zeros(2, 5, 7)
    ent = token_entropy(uniform)
    assert ent.shape == (2, 4) and ent.dtype == torch.float32
    torch.testing.assert_close(ent, torch.full((2, 4), math.log(7)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(token_entropy(peaked), torch.zeros(1, 1), atol=1e-6, rtol=0)
    masked = token_entropy(uniform, mask=torch.tensor([[True, True, False, True, False]] * 2))
    assert masked[0].tolist() == pytest.approx([math.log(7), 0.0, math.log(7), 0.0])
    # at temperature 2, logits (0, ln 9) are the probabilities 1/4 and 3/4 (3 = e^(ln 9 / 2))
    two = torch.tensor([[[0.0, math.log(9)], [0.0, 0.0]]])
    by_hand = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert token_entropy(two, temperature=2.0).item() == pytest.approx(by_hand)
    # token_logprobs gives the same entropies from its own log-softmax, beside the same log-probs
    logits, tokens = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    mask = torch.rand(3, 6) > 0.3
    logp, both_ent = token_logprobs(logits, tokens, mask, temperature=0.7, entropy=True)
    assert torch.equal(logp, token_logprobs(logits, tokens, mask, temperature=0.7))
    assert torch.equal(both_ent, token_entropy(logits, mask, temperature=0.7))


def test_stop_token_rows_stop_independently_and_early_exit():
    model = make_model()
    p0 = PROMPTS[1]
    ref, _ = model.generate([p0], 16, temperature=0)
    ref = ref[0].tolist()
    # row 1 is row 0 three tokens further on, so greedy row 1 continues with ref[3:]
    stop = ref[3]
    j0, j1 = ref.index(stop), 0  # step at which each row emits the stop token
    assert j0 != j1, "pick another seed: the rows should stop at different steps"
    for use_cache in (True, False):
        tokens, mask = model.generate([p0, p0 + ref[:3]], 16, temperature=0, stop_token=stop,
                                      pad_token=63, use_cache=use_cache)
        assert tokens.shape == (2, max(j0, j1) + 1)  # ended early: every row stopped
        assert tokens[0, :j0 + 1].tolist() == ref[:j0 + 1]
        assert tokens[1, :j1 + 1].tolist() == ref[3:3 + j1 + 1]
        assert (tokens[1, j1 + 1:] == 63).all()
        assert mask[0].tolist() == [True] * (j0 + 1)
        assert mask[1].tolist() == [True] * (j1 + 1) + [False] * (j0 - j1)


def test_checking_for_the_stop_token_every_few_steps_changes_nothing(monkeypatch):
    # as on a GPU, where each check makes the host wait: the steps after every row stopped
    # emit padding only and are cut, so tokens and masks equal the check at every step
    model = make_model()
    ref, _ = model.generate(PROMPTS, 16, temperature=0)
    stop = ref[0, 2].item()
    runs = []
    for every in (1, 8):
        monkeypatch.setitem(generation.STOP_CHECK_EVERY, "cpu", every)
        gen = torch.Generator().manual_seed(3)
        runs.append(model.generate(PROMPTS, 16, stop_token=stop, pad_token=0, generator=gen))
    (a, a_mask), (b, b_mask) = runs
    # every row stopped by step 14: checking every 8 steps ran two steps more, then cut them
    assert a.size(1) == 14 and a_mask[:, -1].any()
    assert torch.equal(a, b) and torch.equal(a_mask, b_mask)


def test_dropping_ended_rows_changes_no_answer(monkeypatch):
    # rows that have emitted the stop token leave the batch (and the cache), so later steps
    # run on fewer rows; each row still draws its own random numbers, so every answer is
    # the one it would be with the ended rows kept in, sampled or greedy, cache or not
    model = make_model()
    prompts = [p[:k] for p in PROMPTS for k in range(1, min(len(p), 4) + 1)]  # 12 rows
    # the stop token: the one most rows give early on, so that rows end at different steps
    early = [set(row[:6]) for row in model.generate(prompts, 12, temperature=0)[0].tolist()]
    stop = max(range(CFG["vocab_size"]), key=lambda t: sum(t in e for e in early))
    batch_sizes = []
    model.transformer.wte.register_forward_hook(lambda m, i, o: batch_sizes.append(o.size(0)))
    for kwargs in (dict(temperature=0), dict(temperature=1.0), dict(top_k=5, top_p=0.9)):
        for use_cache in (True, False):
            runs = []
            for drop_at in (0.75, 0.0):  # 0: ended rows are never dropped
                monkeypatch.setattr(generation, "DROP_ENDED_AT", drop_at)
                batch_sizes.clear()
                gen = torch.Generator().manual_seed(5)
                runs.append(model.generate(prompts, 12, stop_token=stop, pad_token=0,
                                           generator=gen, use_cache=use_cache, **kwargs))
                sizes = sorted(set(batch_sizes), reverse=True)
                assert sizes[0] == len(prompts)
                assert (len(sizes) > 1) == (drop_at > 0), sizes  # some steps ran fewer rows
            (a, a_mask), (b, b_mask) = runs
            assert a_mask.any(dim=1).all() and not a_mask.all()  # rows of different lengths
            assert torch.equal(a, b) and torch.equal(a_mask, b_mask)


def test_decode_step_logits_match_the_full_forward():
    # GPT.decode attends over the cache's whole buffers (unfilled positions masked), so that
    # every step has the same shapes; its logits equal the full forward's at every position
    model = make_model()
    idx, mask = left_pad(PROMPTS)
    B, P = idx.shape
    cont = torch.randint(0, CFG["vocab_size"], (B, 5), generator=torch.Generator().manual_seed(0))
    full_mask = torch.cat([mask, torch.ones_like(cont, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref, _ = model(torch.cat([idx, cont], dim=1), attn_mask=full_mask)
        cache = KVCache(CFG["n_layer"], B, P + 5, device="cpu")
        model.hidden(idx, attn_mask=mask, cache=cache)
        for t in range(5):  # one position reserved at a time, then three at once
            if t < 2:
                cache.next_slots()
            elif t == 2:
                cache.next_slots(3)
            torch.testing.assert_close(model.decode(cont[:, t], cache), ref[:, P + t],
                                       atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KVCache is full"):
            cache.next_slots()


def test_several_steps_in_one_call_equal_one_at_a_time():
    # decode_steps(k) runs k steps in the k positions reserved at once, as a compiled call
    # does on a CPU; eager here: the same tokens, answer flags and ended rows as k calls of
    # one step, with a row that ends in the middle of the call
    model = make_model()
    idx, mask = left_pad(PROMPTS)
    B, P = idx.shape
    u = torch.rand(3, B, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(per_call, stop):
        cache = KVCache(CFG["n_layer"], B, P + 3, device="cpu")
        tok, finished, toks, lives = idx[:, -1], torch.zeros(B, dtype=torch.bool), [], []
        with torch.no_grad():
            model.hidden(idx, attn_mask=mask, cache=cache)
            for i in range(0, 3, per_call):
                cache.next_slots(per_call)
                t, live, finished, _ = generation.decode_steps(
                    model, tok, cache, per_call, u[i:i + per_call], finished, 1.0, 0, 1.0,
                    stop_token=stop, pad_token=0)
                toks.append(t)
                lives.append(live)
                tok = t[:, -1]
        return torch.cat(toks, dim=1), torch.cat(lives, dim=1), finished

    stop = int(run(1, None)[0][0, 0])  # row 0 ends at the call's first step
    (a, a_live, a_end), (b, b_live, b_end) = run(3, stop), run(1, stop)
    assert a_end[0] and a_live[0].tolist() == [True, False, False] and (a[0, 1:] == 0).all()
    assert not a_live.all()
    assert torch.equal(a, b) and torch.equal(a_live, b_live) and torch.equal(a_end, b_end)


def test_generated_logprobs_are_those_of_a_forward_pass():
    """generate(logprobs=True): each generated token's log-probability and entropy, read
    from the draw's own logits, are token_logprobs' and token_entropy's of a forward pass
    over the prompt and answer at the same temperature, unfiltered by top-k; 0 after a
    row's end; rows that end leave the batch and the rest keep their figures."""
    model = make_model()
    prompts = [p[:k] for p in PROMPTS for k in range(1, min(len(p), 3) + 1)]
    early = [set(row[:5]) for row in model.generate(prompts, 10, temperature=0)[0].tolist()]
    stop = max(range(CFG["vocab_size"]), key=lambda t: sum(t in e for e in early))
    kw = dict(temperature=0.7, top_k=20, stop_token=stop, pad_token=0)
    tokens, mask, logp, ent = model.generate(
        prompts, 10, generator=torch.Generator().manual_seed(2), logprobs=True, **kw)
    plain = model.generate(prompts, 10, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(plain[0], tokens) and torch.equal(plain[1], mask)  # the same draws
    assert mask.any(dim=1).all() and not mask.all()  # rows ended at different steps
    assert ((logp < 0) == mask).all() and ((ent > 0) == mask).all()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            n = int(mask[i].sum())
            row = torch.tensor([p + tokens[i, :n].tolist()])
            logits = model(row)[0]
            torch.testing.assert_close(logp[i, :n], token_logprobs(
                logits, row, temperature=0.7)[0, len(p) - 1:], atol=1e-5, rtol=0)
            torch.testing.assert_close(ent[i, :n], token_entropy(
                logits, temperature=0.7)[0, len(p) - 1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logprobs=True needs temperature > 0"):
        model.generate(prompts, 2, temperature=0, logprobs=True)


def test_compiled_generation_gives_the_same_answers():
    # generate(compile=True): the prompt pass and the steps after it through torch.compile,
    # four steps a call on a CPU, then one at a time for the last three; one compilation
    # for every batch size, so rows that end and leave the batch between calls recompile
    # nothing; the sampled answers equal the eager ones (one compilation takes seconds, so
    # greedy decoding, the same step with argmax for the draw, is left to the eager tests)
    model = make_model()
    prompts = [p[:k] for p in PROMPTS for k in range(1, min(len(p), 4) + 1)]  # 12 rows
    early = [set(row[:6]) for row in model.generate(prompts, 12, temperature=0)[0].tolist()]
    stop = max(range(CFG["vocab_size"]), key=lambda t: sum(t in e for e in early))
    # (with logprobs, the form PPO's rollout compiles; the draw is the same either way)
    (a, a_mask, a_logp, a_ent), (b, b_mask, b_logp, b_ent) = [
        model.generate(prompts, 12, stop_token=stop, pad_token=0, compile=compiled,
                       generator=torch.Generator().manual_seed(5), logprobs=True)
        for compiled in (False, True)]
    assert a_mask.any(dim=1).all() and not a_mask.all()  # rows ended at different steps
    assert torch.equal(a, b) and torch.equal(a_mask, b_mask)
    torch.testing.assert_close(b_logp, a_logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(b_ent, a_ent, atol=1e-4, rtol=0)
    assert generation.STEPS_PER_CALL["cpu"] == 4  # 11 steps after the prompt pass: 4, 4, 1, 1, 1
    assert generation.compiled_generation("cpu", GPT) is generation.compiled_generation("cpu", GPT)


def test_compiled_decode_with_the_draw_apart_gives_the_same_answers(monkeypatch):
    # the GPU's form of the compiled steps: GPT.decode compiled, the prompt pass and the
    # draw run as they are (inductor cannot build the draw's float64 scan over a
    # GPT-2-sized vocabulary on a GPU), one step a call; here on a CPU, by handing generate
    # that form
    model = make_model()
    prompt_pass, gpu_form = generation.compiled_generation("cuda", GPT)
    assert prompt_pass is GPT.hidden and gpu_form.func is generation.decode_steps
    monkeypatch.setattr(generation, "compiled_generation",
                        lambda device_type, cls: (prompt_pass, gpu_form))
    monkeypatch.setitem(generation.STEPS_PER_CALL, "cpu", 1)
    (a, a_mask), (b, b_mask) = [
        model.generate(PROMPTS, 8, compile=compiled, generator=torch.Generator().manual_seed(3))
        for compiled in (False, True)]
    assert torch.equal(a, b) and torch.equal(a_mask, b_mask)


def test_stop_token_row_that_never_stops_runs_full_length():
    model = make_model()
    ref, _ = model.generate(PROMPTS, 10, temperature=0)
    stop = ref[0, 2].item()
    tokens, mask = model.generate(PROMPTS, 10, temperature=0, stop_token=stop, pad_token=0)
    assert tokens.shape == ref.shape  # some row never emits stop (checked below)
    never = [i for i in range(len(PROMPTS)) if stop not in ref[i].tolist()]
    assert never, "pick another stop token: every row stops"
    for i in range(len(PROMPTS)):
        row = ref[i].tolist()
        n = row.index(stop) + 1 if stop in row else len(row)
        assert tokens[i, :n].tolist() == row[:n] and (tokens[i, n:] == 0).all()
        assert mask[i].tolist() == [True] * n + [False] * (len(row) - n)


def test_generate_argument_errors():
    model = make_model()  # block_size 64
    with pytest.raises(ValueError, match="block_size") as err:
        model.generate([[1] * 50, [2]], 20)
    assert "50" in str(err.value) and "20" in str(err.value) and "64" in str(err.value)
    model.generate([[1] * 44], 20)  # exactly fills the context: fine
    with pytest.raises(ValueError):
        model.generate([], 5)
    with pytest.raises(ValueError):
        model.generate([[1, 2], []], 5)
    # a stop token that is not a token id would never match: refused, not run to the end
    with pytest.raises(TypeError, match="stop_token"):
        model.generate([[1, 2]], 5, stop_token=object())


def test_generate_restores_training_mode():
    model = make_model(dropout=0.1).train()
    model.generate(PROMPTS, 3)
    assert model.training


def test_configure_optimizers_groups():
    model = make_model(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = list(model.parameters())  # yields the tied wte/lm_head tensor once
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(params)
    assert grouped.count(id(model.lm_head.weight)) == 1
    assert model.lm_head.weight is model.transformer.wte.weight


def test_num_params_and_flops():
    model = make_model()
    C, V, L, T = 32, 64, 2, 64
    per_layer = 2 * C + 12 * C * C  # two LayerNorm gains (no bias) + attention + MLP
    expected = V * C + L * per_layer + C  # tied embedding, blocks, final LayerNorm
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C
    assert model.flops_per_token(T) == 6 * expected + 12 * L * 2 * 16 * T


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_embd.*n_head"):
        GPTConfig(n_embd=30, n_head=4)


def test_forward_loss_matches_manual_cross_entropy():
    model = make_model()
    idx = torch.randint(0, 64, (3, 10))
    targets = torch.randint(0, 64, (3, 10))
    targets[0, :4] = IGNORE_INDEX
    targets[2, 7:] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 64)
    keep = targets != IGNORE_INDEX
    manual = -F.log_softmax(logits.double(), -1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss.double(), manual, atol=1e-5, rtol=1e-5)
    assert model(idx)[1] is None


def test_logits_from_skips_the_first_positions_only():
    # the vocabulary projection of positions >= k, and the loss of their targets alone
    model = make_model()
    idx = torch.randint(0, 64, (3, 10))
    targets = torch.randint(0, 64, (3, 10))
    full, _ = model(idx)
    part, loss = model(idx, targets, logits_from=4)
    assert part.shape == (3, 6, 64)
    torch.testing.assert_close(part, full[:, 4:], atol=1e-5, rtol=1e-5)
    manual = F.cross_entropy(full[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    # what the log-probs of a response read is the same either way
    torch.testing.assert_close(token_logprobs(part, idx[:, 4:]),
                               token_logprobs(full, idx)[:, 4:], atol=1e-5, rtol=1e-5)


def test_keep_from_runs_the_last_block_on_the_kept_columns_only():
    """hidden(keep_from=k): the hidden states, and the gradients through them, of
    hidden()[:, k:], with and without a padding mask and through a cache; the last
    block's MLP sees only the kept columns, the blocks before it every column."""
    model = make_model(n_layer=3)
    idx, mask = left_pad(PROMPTS + [[16, 17, 18, 19, 20, 21, 22]])
    mlp_rows = []
    for block in model.transformer.h:
        block.mlp.register_forward_hook(lambda m, i, o: mlp_rows.append(o.size(1)))
    for attn_mask in (None, mask):
        got = []
        for k in (0, 5):
            model.zero_grad()
            mlp_rows.clear()
            h = model.hidden(idx, attn_mask=attn_mask, keep_from=k)
            h = h[:, 5 - k:]  # the same columns both ways
            (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
            got.append((h.detach(), [p.grad.clone() for p in model.parameters()]))
            assert mlp_rows == [7, 7, 7 - k]
        torch.testing.assert_close(got[1][0], got[0][0], atol=1e-5, rtol=0)
        for a, b in zip(got[1][1], got[0][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # a cache holds every column's keys and values either way
        caches = [KVCache(3, idx.size(0), 10, "cpu") for _ in range(2)]
        last = [model.hidden(idx, attn_mask=mask, cache=c, keep_from=k)[:, -1]
                for c, k in zip(caches, (0, 6))]
        torch.testing.assert_close(last[1], last[0], atol=1e-5, rtol=0)
        for layer in range(3):
            torch.testing.assert_close(caches[1].keys[layer], caches[0].keys[layer], atol=0, rtol=0)
    with pytest.raises(ValueError, match="keep_from=7"):
        model.hidden(idx, keep_from=7)


def test_scalar_gpt():
    lm = make_model()
    rm = ScalarGPT.from_lm(lm)
    idx, mask = left_pad(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(rm.hidden(idx, attn_mask=mask), lm.hidden(idx, attn_mask=mask),
                                   atol=0, rtol=0)
        out = rm(idx, attn_mask=mask)
    assert out.shape == idx.shape and out.dtype == torch.float32
    assert (out == 0).all()  # zero-initialised head: no preference before training
    # the trunk is a copy, not shared
    assert rm.transformer.wte.weight.data_ptr() != lm.transformer.wte.weight.data_ptr()
    # a language-model state dict loads with only the score head missing
    fresh = ScalarGPT(lm.config)
    missing, unexpected = fresh.load_state_dict(lm.state_dict(), strict=False)
    assert sorted(missing) == ["score.bias", "score.weight"] and unexpected == []
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    # scores reach the trunk: gradients flow once the head is non-zero
    with torch.no_grad():
        fresh.score.weight.normal_()
    fresh(idx).sum().backward()
    assert fresh.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
