"""formats.py: HH-RLHF, preference, SFT and prompt files into one shape; every malformed
record refused in one line naming file and line."""

import gzip
import json

import pytest

import formats
from cli import UserError

H, A = "\n\nHuman: ", "\n\nAssistant: "
HH = [
    # two turns, then answers that differ: kept
    {"chosen": f"{H}Hi{A}Hello!{H}How do I bake bread?{A}Mix flour, water, yeast.",
     "rejected": f"{H}Hi{A}Hello!{H}How do I bake bread?{A}I can’t help with that."},
    # identical answers: skipped, counted
    {"chosen": f"{H}Why?{A}Because.", "rejected": f"{H}Why?{A}Because."},
    # the dialogues differ before the last turn: skipped, counted
    {"chosen": f"{H}A{A}B{H}C{A}D", "rejected": f"{H}A{A}X{H}C{A}E"},
    # an empty final answer (the assistant's tag and nothing after it): skipped, counted
    {"chosen": f"{H}Why?{A}Because.", "rejected": f"{H}Why?\n\nAssistant:"},
]


def write(path, records, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_hh_pairs_and_counts(tmp_path, gz):
    path = write(tmp_path / ("hh.jsonl.gz" if gz else "hh.jsonl"), HH, gz)
    pairs, counts = formats.load_hh(path)
    assert counts == {"read": 4, "identical": 1, "prompts_differ": 1, "empty_answer": 1}
    assert formats.describe(counts) == ("read 4, skipped 1 identical, 1 prompts differ, "
                                        "1 empty answer")
    prompt, chosen, rejected = pairs[0]
    assert prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "How do I bake bread?"}]
    assert (chosen, rejected) == ("Mix flour, water, yeast.", "I can’t help with that.")


def test_hh_text_round_trip(tmp_path):
    # read, then written back: the chosen dialogue exactly as the file had it
    pairs, _ = formats.load_hh(write(tmp_path / "hh.jsonl", HH))
    prompt, chosen, rejected = pairs[0]
    assert formats.hh_prompt(prompt) + formats.hh_answer(chosen) == HH[0]["chosen"]
    assert formats.hh_prompt(prompt) + formats.hh_answer(rejected) == HH[0]["rejected"]
    system = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert formats.hh_prompt(system) == "Be kind.\n\nHuman: Hi\n\nAssistant:"


def test_preferences_as_strings_and_as_messages(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
        {"prompt": "same", "chosen": "x", "rejected": "x"}])
    pairs, counts = formats.load_preferences(path)
    assert counts == {"read": 3, "identical": 1}
    assert pairs[0] == ([{"role": "user", "content": "2 + 2?"}], "4", "5")
    assert pairs[1][0][0] == {"role": "system", "content": "Be brief."}
    assert pairs[1][1:] == ("Paris.", "Lyon.")


def test_sft_and_prompts(tmp_path):
    sft = write(tmp_path / "s.jsonl", [
        {"prompt": "Hi", "response": "Hello."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    examples, counts = formats.load_sft(sft)
    assert counts == {"read": 2}
    assert examples == [([{"role": "user", "content": "Hi"}], "Hello."),
                        ([{"role": "user", "content": "Hi"}], "Yo")]
    prompts, _ = formats.load_rl_prompts(write(tmp_path / "r.jsonl", [{"prompt": "Go"}]))
    assert prompts == [[{"role": "user", "content": "Go"}]]


def test_rl_prompts_from_a_comparison_file(tmp_path):
    """PPO and GRPO read the prompts of an HH-RLHF or preference file, each prompt once."""
    extra = {"chosen": f"{H}Hi{A}Hello!{H}How do I bake bread?{A}Knead it.",
             "rejected": f"{H}Hi{A}Hello!{H}How do I bake bread?{A}No."}
    prompts, counts = formats.load_rl_prompts(write(tmp_path / "hh.jsonl", HH + [extra]))
    assert prompts == [[{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "How do I bake bread?"}]]
    assert counts["read"] == 5 and counts["repeated_prompts"] == 1
    assert formats.describe(counts) == ("read 5, skipped 1 identical, 1 prompts differ, "
                                        "1 empty answer, 1 repeated prompts")
    pref = write(tmp_path / "p.jsonl", [{"prompt": "Go", "chosen": "a", "rejected": "b"},
                                        {"prompt": "Stop", "chosen": "a", "rejected": "b"}])
    assert formats.load_rl_prompts(pref)[0] == [[{"role": "user", "content": "Go"}],
                                                [{"role": "user", "content": "Stop"}]]


BAD = [  # (loader, file content as bytes, the message)
    ("load_hh", b'{"chosen": "x"\n', "hh.jsonl:1: malformed JSON"),
    ("load_hh", b'[1, 2]\n', "hh.jsonl:1: expected a JSON object, got list"),
    ("load_hh", b'\n{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n',
     "hh.jsonl:2: missing field 'rejected'"),
    ("load_hh", b'{"chosen": 3, "rejected": "x"}\n',
     "hh.jsonl:1: field 'chosen' should be str, got int"),
    ("load_hh", b'{"chosen": "Hi there", "rejected": "x"}\n',
     "does not start with '\\n\\nHuman:'"),
    ("load_hh", b'{"chosen": "\\n\\nHuman: a", "rejected": "\\n\\nHuman: a"}\n',
     "does not end with an '\\n\\nAssistant:' turn"),
    ("load_hh", b'{"chosen": "\\n\\nHuman: a\\n\\nHuman: b\\n\\nAssistant: c", '
     b'"rejected": "x"}\n', "two user turns in a row"),
    ("load_hh", b'\xff\xfe\n', "hh.jsonl:1: not UTF-8 text"),
    ("load_preferences", b'{"prompt": "", "chosen": "a", "rejected": "b"}\n',
     "field 'prompt' is empty"),
    ("load_preferences", b'{"prompt": [], "chosen": "a", "rejected": "b"}\n',
     "field 'prompt' should be a non-empty list of messages"),
    ("load_preferences", b'{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", '
     b'"rejected": "b"}\n', "prompt[0] has role 'bot'"),
    ("load_preferences", b'{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}\n',
     "prompt[0] should be"),
    ("load_preferences", b'{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], '
     b'"rejected": "b"}\n', "field 'chosen' should hold one assistant message"),
    ("load_preferences", b'{"prompt": "q", "chosen": "a", "rejected": "  "}\n',
     "field 'rejected' is empty"),
    ("load_sft", b'{"messages": [{"role": "user", "content": "a"}]}\n',
     "field 'messages' should end with the assistant's answer"),
    ("load_sft", b'{"prompt": "q"}\n', "missing field 'response'"),
    ("load_rl_prompts", b'{"prompt": 7}\n', "field 'prompt' should be str or list, got int"),
    ("load_rl_prompts", b'\n\n', "no usable records (read 0)"),
]


@pytest.mark.parametrize("loader, content, message", BAD)
def test_malformed_records_one_line(tmp_path, loader, content, message):
    path = tmp_path / "hh.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        getattr(formats, loader)(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_damaged_gzip(tmp_path):
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in HH * 50))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: truncated gzip file \(it ends after line"):
        formats.load_hh(cut)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="bad.jsonl.gz: damaged gzip file"):
        formats.load_hh(bad)
    with pytest.raises(UserError, match="nowhere.jsonl not found"):
        formats.load_hh(tmp_path / "nowhere.jsonl")


def test_hold_out_keeps_at_least_one_item_on_each_side(capsys):
    items = list(range(10))
    assert formats.hold_out(items, 0.0, "f.jsonl", "sft", {"read": 10}, 0, 64, "demo") == (
        items[:9], items[9:])  # one held out even at 0
    assert formats.hold_out(items, 0.9, "f.jsonl", "sft", {"read": 10}, 0, 64, "demo") == (
        items[:1], items[1:])
    for fraction in (0.99, 1.0):
        with pytest.raises(UserError, match=rf"--val_fraction={fraction} holds out all 10 usable "
                                            rf"demos of f.jsonl, leaving none to train on"):
            formats.hold_out(items, fraction, "f.jsonl", "sft", {"read": 10}, 0, 64, "demo")
