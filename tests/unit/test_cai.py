"""cai.py's pieces: the agreement figures on hand-made pairs, the judge's two orders, a
critic that cannot yet critique."""

import math

import pytest
import torch

import cai
from data import constitution as C
from data import world
from data.tokenizer import encode_response, load_tokenizer
from model import GPT, GPTConfig

TASK = world.Task("smaller", (4, 9), "Which is smaller, 4 or 9?")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_agreement_by_hand():
    """Two rankings: the first's chosen answer is gold-better (and rater-worse: a
    preamble on the rejected one); the second ties on gold."""
    raters = world.RaterConfig()
    ideal, sure = ("4 is smaller.", True), ("Sure! 4 is smaller.", True)
    r1 = cai.ranking(TASK, ideal, sure, raters, "x")
    r2 = cai.ranking(TASK, ("Good question! 4 is smaller.", True),
                     ("Great question! 4 is smaller.", True), raters, "x")
    a = cai.agreement([r1, r2])
    u = [[r["utility"] for r in x["responses"]] for x in (r1, r2)]
    assert a["pairs"] == 2 and a["gold_differs"] == 1 and a["with_gold"] == 1.0
    assert a["with_raters"] == pytest.approx((sigmoid(u[0][0] - u[0][1])
                                              + sigmoid(u[1][0] - u[1][1])) / 2)
    assert a["raters_with_gold"] == pytest.approx(sigmoid(u[0][0] - u[0][1]))
    assert a["raters_with_gold"] < 0.5  # the raters prefer the preamble the gold scorer fines


def test_the_judge_sees_both_orders(world):
    """The judge's margin for (a, b) is minus its margin for (b, a): where an answer
    stands cannot decide."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    torch.manual_seed(0)
    critic = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                           n_embd=16)).eval()
    pairs = [("4 is smaller.", "Sure! 4 is smaller."), ("9 is smaller.", "4 is smaller.")]
    ab = cai.judge(critic, enc, [TASK, TASK], pairs, "cpu")
    ba = cai.judge(critic, enc, [TASK, TASK], [(b, a) for a, b in pairs], "cpu")
    assert all(x is not None and abs(x) > 0 for x in ab)
    assert ab == pytest.approx([-x for x in ba], abs=1e-5)
    long = [("x " * 200, "y")]  # a request beyond the context: no verdict
    assert cai.judge(critic, enc, [TASK], long, "cpu") == [None]


def test_a_critic_that_cannot_critique_leaves_the_drafts(world):
    """Replies without "Revision:" leave each draft as it was and are counted."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    torch.manual_seed(0)
    critic = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                           n_embd=16)).eval()
    constitution = C.load_constitution(C.DEFAULT)
    cfg = cai.Config(max_new_tokens=4)
    drafts = ["Sure! 4 is smaller.", "4 is smaller. I hope this helps!"]
    texts, unread = cai.critique_chain(critic, enc, [TASK, TASK], drafts, constitution, cfg,
                                       "cpu")
    assert texts == drafts and unread == len(drafts) * len(constitution)


def test_the_chain_revises_only_what_a_critique_finds(world, monkeypatch):
    """By each principle in turn: a reply finding the principle followed leaves the text
    (even with a revision after it), a revision replaces it, a reply with neither is
    counted as unread, and so is one cut off before its end token."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    constitution = [("pleasantry", "No pleasantry."), ("sign_off", "No sign-off.")]
    replies = {  # (principle text, draft) -> the critic's reply
        ("No pleasantry.", "Sure! 4 is smaller. Bye."):
            "It opens with one. Revision: 4 is smaller. Bye.",
        ("No sign-off.", "4 is smaller. Bye."): "garbled",
        ("No pleasantry.", "4 is smaller."): f"{C.FOLLOWS} Revision: 5 is smaller.",
        ("No sign-off.", "4 is smaller."): f"{C.FOLLOWS}",
        ("No pleasantry.", "Sure! 9 is larger."): "It opens with one. Revision: 9 is",  # cut
        ("No sign-off.", "Sure! 9 is larger."): f"{C.FOLLOWS}",
    }

    def fake(model, enc_, requests, max_new_tokens, temperature, seed, device, batch_size=64):
        out = []
        for r in requests:
            principle = r.split("Critique: ")[1].split(" Question: ")[0]
            reply = replies[principle, r.split(" Answer: ")[1]]
            out.append(([], encode_response(enc, reply, ended=not reply.endswith(" is"))))
        return out

    monkeypatch.setattr(cai, "sample_responses", fake)
    critic = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                           n_embd=16))
    texts, unread = cai.critique_chain(critic, enc, [TASK, TASK, TASK],
                                       ["Sure! 4 is smaller. Bye.", "4 is smaller.",
                                        "Sure! 9 is larger."],
                                       constitution, cai.Config(max_new_tokens=8), "cpu")
    assert texts == ["4 is smaller. Bye.", "4 is smaller.", "Sure! 9 is larger."]
    assert unread == 2
