"""The exit path through a real process: --help, and a few representative mistakes (a
flag, a data file, a checkpoint) ending with one line on stderr, exit status 2, no
traceback, nothing written. The full table of bad input runs in-process in
tests/unit/test_bad_input.py."""

import re

from conftest import assert_user_error, copy_world, run

import pretrain
from data import prepare


def test_help_shows_the_docstring_the_script_and_every_flag():
    for module, script, flag, comment in (
            (pretrain, "pretrain.py", "--learning_rate=0.006", "peak learning rate"),
            (prepare, "data/prepare.py", "--n_docs=40000", "pretraining documents")):
        p = run(script, "--help")
        assert p.returncode == 0 and p.stderr == ""
        lines = p.stdout.splitlines()
        # the docstring's first paragraph, on one line; the script as the user typed it
        assert lines[0] == " ".join(module.__doc__.strip().split("\n\n")[0].split())
        assert lines[2] == f"usage: python {script} [--name=value ...]"
        flag_lines = [line for line in lines if line.startswith("  --")]
        assert any(flag in line and comment in line for line in flag_lines), p.stdout
        assert len({re.match(r"  --\S+ +", line).end() for line in flag_lines}) == 1  # one column


def test_bad_flag_through_a_process():
    p = run("pretrain.py", "--max_stepz=3", ok=False)
    assert_user_error(p, "--max_stepz", "unknown flag", "--max_steps")  # (did you mean ...?)


def test_malformed_jsonl_through_a_process(pipeline, tmp_path):
    bad = copy_world(pipeline.data, tmp_path / "bad")
    lines = (bad / "sft_train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-5]  # truncate line 5
    (bad / "sft_train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sft_out"
    p = run("sft.py", f"--data_dir={bad}", f"--init_from={pipeline.out}/pretrain",
            f"--out_dir={out}", ok=False)
    assert_user_error(p, "sft_train.jsonl:5", "malformed JSON")
    assert not out.exists()  # nothing written


def test_checkpoint_of_another_stage_through_a_process(pipeline, tmp_path):
    p = run("ppo.py", f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/reward",
            f"--reward_from={pipeline.out}/reward", f"--out_dir={tmp_path}/o", ok=False)
    assert_user_error(p, "reward-model checkpoint", "not a language model")
    assert not (tmp_path / "o").exists()


def test_compile_without_a_compiler_through_a_process(tmp_path):
    out = tmp_path / "o"
    p = run("sft.py", "--compile=true", f"--out_dir={out}", ok=False,
            env={"CXX": "no-such-compiler"})
    assert_user_error(p, "--compile=true", "no-such-compiler", "run without --compile")
    assert not out.exists()  # refused before anything is written
