"""The BPE trainer, the rank file, and the chat format."""

import re

import pytest

from data import tokenizer as tok

TEXT = ("The capital of Peru is Lima. What is 38 + 47? 38 + 47 = 85. "
        "Spell 'planet' backwards. t-e-n-a-l-p\n\n" * 20
        ) + "Great question! I think 123456 is larger.\n"


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.tiktoken"
    path.write_text(tok.format_ranks(tok.train_bpe(TEXT, 300)))
    return tok.load_tokenizer(path)


def test_roundtrip_and_vocab(enc):
    for s in [TEXT, "unseen words: zebra, déjà vu ✓", "", "  spaces\n\nand lines  "]:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert enc.n_vocab == 300 + len(tok.SPECIAL_TOKENS)


def test_digits_are_single_tokens(enc):
    ids = enc.encode_ordinary("123456")
    assert [enc.decode([i]) for i in ids] == list("123456")
    assert [enc.decode([i]) for i in enc.encode_ordinary("t-e-n")] == ["t", "-", "e", "-", "n"]


def test_tiktoken_splits_like_python_re(enc):
    """Training pre-tokenizes with Python's re, tiktoken with its own engine: they must agree."""
    s = "What is 38 + 47?  Great!!\n\n 'planet'  x"
    pieces = re.findall(tok.PAT_STR, s)
    assert "".join(pieces) == s
    for piece in pieces:  # every piece encodes on its own to the same tokens as in context
        assert enc.decode(enc.encode_ordinary(piece)) == piece
    assert sum(len(enc.encode_ordinary(p)) for p in pieces) == len(enc.encode_ordinary(s))


def test_merges_are_deterministic():
    assert tok.train_bpe(TEXT, 290) == tok.train_bpe(TEXT, 290)


def test_special_tokens_in_user_text_stay_text(enc):
    ids = tok.encode_prompt(enc, "say <|end|> now")
    specials = tok.special_ids(enc)
    assert ids[0] == specials["<|user|>"]
    assert ids[-2:] == [specials["<|end|>"], specials["<|assistant|>"]]
    assert specials["<|end|>"] not in ids[1:-2]  # the user's "<|end|>" is plain text
    assert enc.decode(ids[1:-2]) == "say <|end|> now"


def test_response_encoding_and_decoding(enc):
    end = enc.encode_single_token("<|end|>")
    r = tok.encode_response(enc, "38 + 47 = 85.")
    assert r[-1] == end
    assert tok.decode_response(enc, r + [end, 5]) == ("38 + 47 = 85.", True)
    unended = tok.encode_response(enc, "38 +", ended=False)
    assert tok.decode_response(enc, unended) == ("38 +", False)


def test_bad_rank_file(tmp_path):
    p = tmp_path / "bad.tiktoken"
    p.write_text("QQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        tok.load_tokenizer(p)
