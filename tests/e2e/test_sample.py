"""sample.py: a stage's checkpoint in the chat format, a GPT-2 directory as plain text or
HH dialogue, and its one-line refusals."""

import json
from pathlib import Path

import pytest

import hf
import sample
from cli import parse_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpt2-tiny"


def run(capsys, flags, prompts):
    sample.main(parse_config(sample.Config, flags), prompts)
    return capsys.readouterr().out.splitlines()


def test_a_stage_answers_each_prompt(pipeline, capsys):
    lines = run(capsys, [f"--from={pipeline.out / 'sft'}", f"--data_dir={pipeline.data}",
                         "--max_new_tokens=4", "--temperature=1", "--num_samples=3"],
                ["What is 2 + 2?", "Spell 'cat' backwards."])
    assert [line for line in lines if line.startswith(">")] == [
        "> What is 2 + 2?", "> Spell 'cat' backwards."]
    assert len(lines) == 2 + 2 * 3  # each prompt, then its three answers


def test_gpt2_greedy_is_transformers_greedy(capsys):
    exp = json.loads((FIXTURE / "expected.json").read_text())
    enc = hf.load_gpt2_tokenizer(str(FIXTURE))
    lines = run(capsys, [f"--from={FIXTURE}", "--format=plain", "--max_new_tokens=10"],
                [enc.decode(exp["prompt_ids"])])
    # (the prompt holds newlines, so the answer is the last line printed)
    assert lines[-1].strip().split("  (no end)")[0] == repr(enc.decode(exp["greedy"]))


@pytest.mark.parametrize("flags, prompts, needle", [
    ([], [], "no prompt"),
    ([], ["What is 2 + 2?", "  "], "prompt 2 of 2 is empty"),
    (["--format=json"], ["x"], "--format=json: expected auto, chat, hh or plain"),
    ([f"--from={FIXTURE}", "--format=chat"], ["x"], "is a GPT-2 checkpoint; use hh or plain"),
])
def test_refusals(capsys, flags, prompts, needle):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        with sample.user_errors():
            sample.main(parse_config(sample.Config, flags), prompts)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_stage_refuses_the_hh_format(pipeline, capsys):
    test_refusals(capsys, [f"--from={pipeline.out / 'sft'}", f"--data_dir={pipeline.data}",
                           "--format=hh"], ["x"],
                  "a stage's checkpoint answers in the chat format")
