"""sample.py: a stage's checkpoint in the chat format, a GPT-2 directory as plain text or
HH dialogue, and its one-line refusals."""

import json
from pathlib import Path

import pytest

import hf
import sample
from cli import parse_config
from conftest import main_of

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


def test_an_exported_world_model_answers_as_its_stage(pipeline, tmp_path, capsys):
    """A world model export.py wrote is a GPT-2 directory in the world's chat format: its
    answers are the stage checkpoint's, word for word (they stopped at GPT-2's end token,
    in HH's dialogue format, and ran on)."""
    import export
    main_of(export, [f"--from={pipeline.out / 'sft'}", f"--to={tmp_path / 'exp'}",
                     f"--data_dir={pipeline.data}"])
    capsys.readouterr()
    prompts = ["What is 2 + 2?", "Sort these numbers: 4 1 3"]
    stage = run(capsys, [f"--from={pipeline.out / 'sft'}", f"--data_dir={pipeline.data}",
                         "--max_new_tokens=12"], prompts)
    exported = run(capsys, [f"--from={tmp_path / 'exp'}", "--max_new_tokens=12"], prompts)
    assert exported == stage and len(stage) == 4
