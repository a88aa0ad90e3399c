"""records.py: JSONL records checked line by line, and preference rankings."""

import json

import pytest

import records
from cli import UserError
from data.tokenizer import encode_prompt, encode_response, load_tokenizer


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "n": 1}\n\n{"prompt": "b"}\n')
    recs = records.read_jsonl(p, {"prompt": str})
    assert [(r["prompt"], r["_line"]) for r in recs] == [("a", 1), ("b", 3)]  # blank lines skipped
    p.write_text('{"prompt": "a", "n": 1}\n\n{"prompt": "b"\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: malformed JSON"):
        records.read_jsonl(p, {"prompt": str})
    p.write_text('{"prompt": "a"}\n{"n": 1}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'prompt'"):
        records.read_jsonl(p, {"prompt": str})
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: field 'prompt' should be str, got int"):
        records.read_jsonl(p, {"prompt": str})
    p.write_text('{"n": true}\n')  # a bool is no int
    with pytest.raises(UserError, match=r"d.jsonl:1: field 'n' should be int, got bool"):
        records.read_jsonl(p, {"n": int})
    p.write_text('[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: expected a JSON object"):
        records.read_jsonl(p, {})
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not UTF-8 text \(byte 13 of the line\)"):
        records.read_jsonl(p, {})
    p.write_text("")
    with pytest.raises(UserError, match="no records"):
        records.read_jsonl(p, {"prompt": str})
    with pytest.raises(UserError, match="prepare.py"):
        records.read_jsonl(tmp_path / "missing.jsonl", {})


def test_ranking_pairs_cover_every_pair_once():
    assert records.ranking_pairs([2, 0, 3, 1]) == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert len(records.ranking_pairs(list(range(5)))) == 10
    assert records.ranking_pairs([1, 0]) == [(1, 0)]


def test_load_rankings_tokens_and_checks(world, tmp_path):
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    rec = dict(prompt="What is 2 + 3?", ranking=[1, 0],
               responses=[dict(text="2 + 3 = 6."), dict(text="2 + 3 = 5", ended=False)])
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    (r,) = records.load_rankings(path, enc, 160)
    p = encode_prompt(enc, rec["prompt"])
    assert r["prompt_len"] == len(p) and r["ranking"] == [1, 0] and r["pairs"] == [(1, 0)]
    assert r["seqs"] == [p + encode_response(enc, "2 + 3 = 6."),
                         p + encode_response(enc, "2 + 3 = 5", ended=False)]
    assert r["rec"]["_line"] == 1
    longest = max(map(len, r["seqs"]))
    with pytest.raises(UserError, match=f"p.jsonl:1: {longest} tokens, longer than the context "
                                        f"of {longest - 1} tokens"):
        records.load_rankings(path, enc, longest - 1)
    for edit, needle in ((dict(responses=[{"text": 5}, {"text": "a"}]), "string field 'text'"),
                         (dict(ranking=[0, 0]), "'ranking' must order all 2 responses")):
        path.write_text(json.dumps({**rec, **edit}) + "\n")
        with pytest.raises(UserError, match=needle):
            records.load_rankings(path, enc, 160)


def test_preference_paths_name_the_command(world, tmp_path):
    assert records.preference_paths(str(world), "prefs", "val") == [
        ("prefs", str(world / "prefs_val.jsonl"))]
    with pytest.raises(UserError, match="prefs_sft_train.jsonl not found: run `python "
                                        "data/label.py` first"):
        records.preference_paths(str(world), "prefs,prefs_sft", "train")
    with pytest.raises(UserError, match="--prefs is empty"):
        records.preference_paths(str(world), ",", "train")
    sets = records.load_preference_sets(str(world), "prefs", "train",
                                        load_tokenizer(world / "tokenizer.tiktoken"), 160)
    assert list(sets) == ["prefs"] and len(sets["prefs"]) == 16
    assert all(len(r["pairs"]) == 6 for r in sets["prefs"])  # K = 4: 4·3/2 pairs


def test_prompt_room_is_the_context_less_the_answer_and_at_least_one_token():
    assert records.prompt_room(160, 32) == 128
    assert records.prompt_room(160, 159) == 1
    for n in (160, 1000):
        with pytest.raises(UserError, match=rf"--max_new_tokens={n} leaves no room for a prompt "
                                            rf"in the model's context of 160 tokens"):
            records.prompt_room(160, n)
