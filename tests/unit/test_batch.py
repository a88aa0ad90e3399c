"""batch.py: prompt+response rows padded by hand, log-probs against plain sums, and
batched scoring against one batch."""

import pytest
import torch

import batch as B
from cli import UserError
from model import GPT, GPTConfig, token_logprobs


def tiny(seed=0, vocab=20):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()


def test_collate_mask_and_lengths_by_hand():
    b = B.collate([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [2, 1, 3], pad=0, device="cpu")
    assert b.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]]
    assert b.lengths.tolist() == [4, 2, 3] and b.prompt_lengths.tolist() == [2, 1, 3]
    assert b.shortest_prompt == 1 and isinstance(b.shortest_prompt, int)  # on the host
    assert b.mask.tolist() == [[False, False, True, True],  # response tokens 3, 4
                               [False, True, False, False],  # response token 6; then padding
                               [False, False, False, False]]  # a prompt with no response
    assert len(b) == 3 and b.tokens.dtype == torch.long and b.mask.dtype == torch.bool


def test_collate_pairs_and_left_pad_by_hand():
    b = B.collate_pairs([([1, 2], [3]), ([4], [5, 6, 7])], pad=9, device="cpu")
    assert b.tokens.tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]]
    assert b.prompt_lengths.tolist() == [2, 1] and b.lengths.tolist() == [3, 4]
    tokens, mask = B.left_pad([[1, 2, 3], [4]], pad=9, device="cpu")
    assert tokens.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def rollout_rows(prompts, responses, P, N, pad=0):
    """PPO's rollout layout by hand: prompts left-padded to P columns, responses
    right-padded to N."""
    tokens = torch.full((len(prompts), P + N), pad)
    attn = torch.zeros(len(prompts), P + N, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, P - len(p):P], tokens[i, P:P + len(r)] = torch.tensor(p), torch.tensor(r)
        attn[i, P - len(p):P + len(r)] = True
    return tokens, attn, attn[:, P:]


def test_drop_pad_columns_by_hand():
    # a minibatch whose longest prompt (3 tokens) and answer (2) are shorter than the
    # batch's (4 and 3): one column goes on the left, one on the right
    tokens, attn, mask = rollout_rows([[5, 6], [8, 9, 10]], [[7, 3], [11]], P=4, N=3)
    assert tokens.tolist() == [[0, 0, 5, 6, 7, 3, 0], [0, 8, 9, 10, 11, 0, 0]]
    t, a, m, P = B.drop_pad_columns(tokens, attn, mask, 4)
    assert P == 3 and t.tolist() == [[0, 5, 6, 7, 3], [8, 9, 10, 11, 0]]
    assert a.int().tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert m.int().tolist() == [[1, 1], [1, 0]]
    # nothing to drop when the rows use every column
    full = B.drop_pad_columns(t, a, m, P)
    assert full[3] == P and torch.equal(full[0], t) and torch.equal(full[2], m)


def test_dropped_pad_columns_change_no_log_prob():
    model = tiny(3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    responses = [[12, 13], [14], [15, 16, 17], [18, 19, 12, 13]]
    tokens, attn, mask = rollout_rows(prompts, responses, P=7, N=6)
    with torch.no_grad():
        whole = B.response_logprobs(model, tokens, attn_mask=attn, start=7) * mask
        for rows in ([0, 1], [1, 3], [2]):
            t, a, m, P = B.drop_pad_columns(tokens[rows], attn[rows], mask[rows], 7)
            assert t.size(1) < tokens.size(1)
            part = B.response_logprobs(model, t, attn_mask=a, start=P) * m
            assert torch.allclose(part, whole[rows, :m.size(1)], atol=1e-5)
            assert (whole[rows, m.size(1):] == 0).all()


def test_response_mask():
    m = B.response_mask(5, torch.tensor([1, 3]), torch.tensor([4, 5]))
    assert m.int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert B.response_mask(3, torch.tensor([1])).int().tolist() == [[0, 1, 1]]  # no lengths


def test_response_logprobs_from_start_is_a_slice():
    """start > 1 equals the same columns of start = 1 (left-padded, with the attention
    mask and a temperature), entropies too; with a mask, 0 where it is False."""
    model = tiny()
    tokens, attn = B.left_pad([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]], 0, "cpu")
    with torch.no_grad():
        full, ent = B.response_logprobs(model, tokens, attn_mask=attn, temperature=0.7,
                                        entropy=True)
        part, ent3 = B.response_logprobs(model, tokens, attn_mask=attn, start=3,
                                         temperature=0.7, entropy=True)
        masked = B.response_logprobs(model, tokens, attn, attn_mask=attn, start=2)
        plain = B.response_logprobs(model, tokens, attn_mask=attn, start=2)
        logits = model(tokens, attn_mask=attn)[0]
    assert full.shape == (3, 5) and part.shape == (3, 3)
    torch.testing.assert_close(part, full[:, 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent3, ent[:, 2:], atol=1e-6, rtol=0)
    want = torch.log_softmax(logits / 0.7, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked, plain * attn[:, 2:], atol=0, rtol=0)
    assert masked[1, 0] == 0 and masked[0, 0] != 0  # column 2 is padding in row 1 only


def test_shared_prefix_equals_every_row_run_whole():
    """Answers to one prompt run it once (GPT.shared_prefix_hidden): the log-probs,
    entropies and gradients are those of every row run whole, with prompts of three
    lengths left-padded and answers of several lengths right-padded; the trunk sees the
    3 distinct prompts once, then the 7 rows' own columns."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    of = [0, 0, 1, 2, 2, 2, 1]
    answers = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29], [30, 31, 32, 33], [34], [35, 36]]
    prompt_tokens, prompt_mask = B.left_pad([prompts[i] for i in of], 0, "cpu")
    resp, resp_mask = (x.flip(1) for x in B.left_pad([a[::-1] for a in answers], 0, "cpu"))
    tokens, attn = torch.cat([prompt_tokens, resp], 1), torch.cat([prompt_mask, resp_mask], 1)
    mask, P = resp_mask.float(), prompt_tokens.size(1)
    rows_seen = []
    model.transformer.h[0].register_forward_hook(lambda m, i, o: rows_seen.append(o.size(0)))
    got = {}
    for share in (False, True):
        model.zero_grad()
        logp, ent = B.response_logprobs(model, tokens, attn_mask=attn, start=P, entropy=True,
                                        temperature=0.7, share_prefix=share)
        ((logp * mask).sum() + 0.1 * (ent * mask).sum()).backward()
        got[share] = (logp * mask, ent * mask, [p.grad.clone() for p in model.parameters()])
    assert rows_seen == [7, 3, 7]  # whole rows; then the distinct prompts, the rows' rest
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[True][1], got[False][1], atol=1e-5, rtol=0)
    for a, b in zip(got[True][2], got[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    rows_seen.clear()  # nothing shared: one plain pass
    with torch.no_grad():
        alone = B.response_logprobs(model, tokens[[0, 2, 3]], attn_mask=attn[[0, 2, 3]],
                                    start=P, share_prefix=True)
        plain = B.response_logprobs(model, tokens[[0, 2, 3]], attn_mask=attn[[0, 2, 3]],
                                    start=P)
    assert rows_seen == [3, 3]
    torch.testing.assert_close(alone, plain, atol=0, rtol=0)


def test_pairs_share_their_prompt_in_sequence_logprobs():
    """DPO's layout (right-padded, no attention mask, prompts of two lengths): each pair's
    chosen and rejected rows run their common first columns once; the sums and the
    gradient are those of every row run whole."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16))
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    chosen, rejected = [[12, 13], [14], [15, 16, 17]], [[18], [19, 20, 21], [22, 23]]
    rows = [p + r for p, r in zip(prompts + prompts, chosen + rejected)]
    b = B.collate(rows, [len(p) for p in prompts + prompts], pad=0, device="cpu")
    rows_seen = []
    model.transformer.h[0].register_forward_hook(lambda m, i, o: rows_seen.append(o.size(0)))
    got = []
    for share in (True, False):
        model.zero_grad()
        if share:
            logp = B.sequence_logprobs(model, b)[0]
        else:
            logp = B.response_logprobs(model, b.tokens, b.mask, start=2).sum(-1)
        logp.sum().backward()
        got.append((logp, [p.grad.clone() for p in model.parameters()]))
    assert rows_seen == [3, 6, 6]  # the 3 prompts' first 2 columns, the rows' rest; whole
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-5, rtol=0)
    for a, b_ in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)


def test_sequence_logprobs_by_hand():
    model = tiny()
    b = B.collate([[1, 2, 3, 4], [5, 6, 7]], [2, 1], pad=0, device="cpu")
    with torch.no_grad():
        lp, n = B.sequence_logprobs(model, b)
        full = torch.log_softmax(model(b.tokens)[0].double(), -1)
    assert n.tolist() == [2.0, 2.0]
    assert lp[0].item() == pytest.approx((full[0, 1, 3] + full[0, 2, 4]).item(), abs=1e-5)
    assert lp[1].item() == pytest.approx((full[1, 0, 6] + full[1, 1, 7]).item(), abs=1e-5)


def test_reward_scores_in_chunks_equal_one_batch():
    """Any chunking gives the scores of one batch; the scorer sees Batches."""
    torch.manual_seed(0)
    pairs = [([1, 2], [3, 4, 5]), ([6], [7]), ([8, 9, 10], [11, 12]), ([1], [2, 3, 4, 5, 6])]
    model = tiny()
    seen = []

    def score(b):  # a scorer that depends on padding only through real tokens
        seen.append(len(b))
        return B.sequence_logprobs(model, b)[0]

    whole = B.reward_scores(score, pairs, pad=0, device="cpu", batch_size=64)
    chunks = B.reward_scores(score, pairs, pad=0, device="cpu", batch_size=3)
    assert seen == [4, 3, 1] and whole.shape == (4,) and whole.dtype == torch.float32
    torch.testing.assert_close(chunks, whole, atol=1e-5, rtol=0)
    alone = torch.cat([B.reward_scores(score, [p], 0, "cpu") for p in pairs])
    torch.testing.assert_close(alone, whole, atol=1e-5, rtol=0)
    assert not whole.requires_grad  # inference only


def test_sequence_kl_matches_each_sequence_alone():
    """Right-padded batch, ragged responses: each row's Σ log π/π_ref equals the sum over
    that sequence alone, unpadded, over its response tokens only; a model against itself
    gives 0."""
    a, b = tiny(0, 64), tiny(1, 64)
    pairs = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12, 13]), ([5, 6, 7, 8, 9], [14])]
    got = B.sequence_kl(a, b, pairs, 63, "cpu", batch_size=2)
    for (p, r), k in zip(pairs, got):
        x = torch.tensor([p + r])
        with torch.no_grad():
            diff = token_logprobs(a(x)[0], x) - token_logprobs(b(x)[0], x)
        assert k == pytest.approx(diff[0, len(p) - 1:].sum().item(), abs=1e-5)
    assert B.sequence_kl(a, a, pairs, 63, "cpu") == pytest.approx([0, 0, 0], abs=1e-6)


def test_token_windows():
    data = torch.arange(100).numpy().astype("uint16")
    x, y = B.token_windows(data, torch.tensor([0, 10, 50]), 4, "cpu")
    assert x.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13], [50, 51, 52, 53]]
    assert y.tolist() == (x + 1).tolist() and x.dtype == torch.long


def test_sample_responses(world):
    from data.tokenizer import encode_prompt, load_tokenizer

    enc = load_tokenizer(world / "tokenizer.tiktoken")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=enc.n_vocab, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    prompts = ["What is 2 + 3?", "Sort: 3 1 2", "Hi"]
    a = B.sample_responses(model, enc, prompts, 6, 1.0, 5, "cpu", batch_size=2)
    assert [p for p, _ in a] == [encode_prompt(enc, p) for p in prompts]
    assert all(1 <= len(r) <= 6 for _, r in a)
    assert a == B.sample_responses(model, enc, prompts, 6, 1.0, 5, "cpu", batch_size=2)
    greedy = B.sample_responses(model, enc, prompts, 6, 0.0, 5, "cpu")
    assert greedy == B.sample_responses(model, enc, prompts, 6, 0.0, 6, "cpu")  # seed: no matter
    with pytest.raises(UserError, match=r"--max_new_tokens=30 exceeds the context of 32 tokens"):
        B.sample_responses(model, enc, prompts, 30, 1.0, 5, "cpu")


def test_rows_per_pass_keeps_logits_within_the_budget():
    """The world's passes keep their size; GPT-2's long rows are split by the budget."""
    assert B.rows_per_pass(128, 1028, 128) == 128  # the world: 0.13M logits a row
    assert B.rows_per_pass(302, 50257, 128) == B.LOGIT_BUDGET // (302 * 50257) == 17
    assert B.rows_per_pass(1024, 50257, 128, budget=1000) == 1  # never 0
    assert B.rows_per_pass(10, 10, 3) == 3


def test_length_groups_by_hand():
    items = ["aaaa", "b", "ccc", "dd", "e", "ffffff", "gg"]
    # sorted by length, stable: b e dd gg ccc aaaa ffffff; cut at 7k/3 = 0, 2, 4, 7
    assert B.length_groups(items, len, 3) == [["b", "e"], ["dd", "gg"], ["ccc", "aaaa", "ffffff"]]
    assert B.length_groups(items, len, 1) == [items]  # as drawn, unsorted
    assert B.length_groups(items[:2], len, 4) == [["b"], ["aaaa"]]  # no empty group


def test_reward_scores_in_passes_of_similar_length_come_back_in_order():
    """More pairs than a pass holds: sorted by length for the passes, the scores come back
    in the pairs' order, equal to scoring each pair alone."""
    model = tiny()
    gen = torch.Generator().manual_seed(2)
    pairs = [(torch.randint(1, 20, (p,), generator=gen).tolist(),
              torch.randint(1, 20, (r,), generator=gen).tolist())
             for p, r in torch.randint(1, 12, (9, 2), generator=gen).tolist()]
    score = lambda rows: B.sequence_logprobs(model, rows)[0]  # noqa: E731
    with torch.no_grad():
        alone = torch.cat([B.reward_scores(score, [pair], 0, "cpu") for pair in pairs])
        for size in (2, 4, 9, 64):
            torch.testing.assert_close(B.reward_scores(score, pairs, 0, "cpu", size), alone,
                                       rtol=1e-5, atol=1e-5)


def test_gold_figures_and_show_samples_by_hand(world, capsys):
    from data import world as W
    from data.tokenizer import encode_response, load_tokenizer

    enc = load_tokenizer(world / "tokenizer.tiktoken")
    task = W.Task("add", (2, 3), "What is 2 + 3?")
    right = encode_response(enc, "2 + 3 = 5.")
    friendly_wrong = encode_response(enc, "Great question! 2 + 3 = 6.")
    unended = encode_response(enc, "2 + 3 = 5.", ended=False)  # runs on: not an answer
    figures = B.gold_figures(enc, [task] * 3, [right, friendly_wrong, unended])
    assert figures["gold/correct"] == [1.0, 0.0, 0.0]
    assert figures["gold/preamble"] == [0.0, 1.0, 0.0]
    assert figures["gold/score"] == [W.gold(task, "2 + 3 = 5.", True),
                                     W.gold(task, "Great question! 2 + 3 = 6.", True),
                                     W.gold(task, "2 + 3 = 5.", False)]
    assert figures["gold/score"][0] > figures["gold/score"][1]
    assert B.gold_figures(enc, None, [right]) == {}  # your own prompts: no gold scorer
    B.show_samples(enc, ["What is 2 + 3?", "again", "and again"], [right, unended, right],
                   [1.0, -0.25, 0.5], enc.encode_single_token("<|end|>"), n=2)
    assert capsys.readouterr().out.splitlines() == [
        "    'What is 2 + 3?' -> '2 + 3 = 5.'  score +1.00",
        "    'again' -> '2 + 3 = 5.' (no end token)  score -0.25"]
