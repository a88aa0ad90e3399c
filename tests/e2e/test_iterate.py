"""Iterative RLHF on the tiny pipeline: a round's stages write their own sets and
checkpoints, a second round starts PPO from the first round's policy with the KL still
to SFT, and a second run, a process of its own, skips what is done.

The first run is iterate.main() in this process with its stage processes run in this
process too (the command each would start, its main() on the same flags): the stages'
own processes are the cli layer's; here the rounds are what is checked."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_user_error_in_process, main_of, read_log, run, stage_module

import cli
import iterate
from data import label

SMALL = ["--n_prompts=8", "--K=3", "--reward_steps=3", "--ppo_iterations=2", "--eval_prompts=12"]


def stages_in_this_process(monkeypatch):
    """iterate's subprocess.call runs `python script flags` as script's main(flags) here;
    returns the scripts run, in order."""
    scripts = []

    def call(cmd):
        assert cmd[0] == sys.executable
        script = Path(cmd[1]).relative_to(ROOT).as_posix()
        scripts.append(script)
        main_of(stage_module(script), cmd[2:])
        return 0

    monkeypatch.setattr(iterate.subprocess, "call", call)
    return scripts


def test_two_rounds_then_a_second_run_skips_them(pipeline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "it"
    args = [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/sft",
            f"--out_dir={out}", "--rounds=2", *SMALL]
    scripts = stages_in_this_process(monkeypatch)
    iterate.main(cli.parse_config(iterate.Config, args))
    stdout = capsys.readouterr().out
    assert scripts == ["data/label.py", "reward.py", "ppo.py", "data/label.py", "reward.py",
                       "ppo.py", "data/label.py"]
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["kl"] == 0  # round 0 is the SFT model against itself
    for r in rounds:
        assert 0 <= r["correct"] <= 1 and 0 <= r["preamble"] <= 1 and 0 <= r["sign_off"] <= 1
        assert 0 <= r["rm_accuracy_on_policy"] <= 1
    # each round's set is in the copy of the world, not in the world itself
    assert {f"prefs_round{k}_{s}.jsonl" for k in (1, 2, 3) for s in ("train", "val")} <= {
        f.name for f in (out / "world").iterdir()}
    assert not list(pipeline.data.glob("prefs_round*"))
    # round 2 trained its reward model on every set so far and started PPO from round 1's
    # policy: its first rollout differs from the SFT reference it is penalised against
    assert json.loads((out / "reward_r2" / "log.jsonl").read_text().splitlines()[0])[
        "config"]["prefs"] == "prefs,prefs_round1,prefs_round2"
    ppo2 = read_log(out / "ppo_r2" / "log.jsonl")
    ppo1 = read_log(out / "ppo_r1" / "log.jsonl")
    assert ppo1[0]["objective/kl"] == pytest.approx(0, abs=1e-4)  # round 1 starts at SFT
    assert abs(ppo2[0]["objective/kl"]) > 1e-3
    ck = torch.load(out / "ppo_r2" / "ckpt.pt", weights_only=True)
    assert ck["config"]["init_from"] == str(out / "ppo_r1")
    assert ck["config"]["ref_from"] == f"{pipeline.out}/sft"
    assert "| round | gold |" in stdout
    monkeypatch.undo()
    again = run("iterate.py", *args)
    assert again.stdout.count("done already") == 7  # 3 labellings, 2 reward models, 2 PPO runs
    assert json.loads((out / "rounds.json").read_text())["rounds"] == rounds
    # the folder's rounds are reused only by a run of the same settings; another stage's
    # folder (or any other that is not empty) is not written into
    assert_user_error_in_process(capsys, iterate, *args, "--kl_coef=0.2",
                                 needles=[f"{out} holds an iterate.py run made with "
                                          "--kl_coef=0.05"])
    other = tmp_path / "ppo"
    other.mkdir()
    (other / "ckpt.pt").write_bytes(b"a PPO run")
    assert_user_error_in_process(capsys, iterate, *args[:2], f"--out_dir={other}", *SMALL,
                                 needles=[f"{other} is not empty and no iterate.py run is in it"])
    assert [f.name for f in other.iterdir()] == ["ckpt.pt"]


def test_label_names_its_set_and_refuses_a_name_that_is_not_one(capsys, pipeline, stages,
                                                                 tmp_path):
    assert_user_error_in_process(capsys, label, f"--data_dir={pipeline.data}",
                                 f"--policy={stages}/sft", "--name=../escape",
                                 needles=["--name='../escape'"])


def test_a_stage_stopped_half_way_continues_from_its_checkpoint(tmp_path):
    """iterate.progress: no checkpoint, or a damaged one, runs the stage from the start;
    a finished one is skipped; one that is not finished is resumed (--resume=true)."""
    import checkpoint
    import iterate
    done_at_3 = lambda ck: ck["step"] == 3  # noqa: E731
    assert iterate.progress(tmp_path, done_at_3) == (False, [])
    (tmp_path / "ckpt.pt").write_bytes(b"damaged")
    assert iterate.progress(tmp_path, done_at_3) == (False, [])
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 2})
    assert iterate.progress(tmp_path, done_at_3) == (False, ["--resume=true"])
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 3})
    assert iterate.progress(tmp_path, done_at_3)[0] is True


@pytest.mark.parametrize("code, status", [(2, 2), (-9, 1)])
def test_a_failing_stage_stops_the_rounds_with_its_status(pipeline, tmp_path, monkeypatch, capsys,
                                                          code, status):
    """The reward model's process fails (a user error, or a kill): iterate stops there
    with its exit status (a signal's as 1) and says which command failed."""
    calls = []

    def call(cmd):
        calls.append(Path(cmd[1]).name)
        return code if cmd[1].endswith("reward.py") else 0

    monkeypatch.setattr(iterate.subprocess, "call", call)
    with pytest.raises(SystemExit) as e:
        iterate.main(cli.parse_config(iterate.Config, [
            f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/sft",
            f"--out_dir={tmp_path}/it", *SMALL]))
    assert e.value.code == status and calls == ["label.py", "reward.py"]
    assert capsys.readouterr().err == f"error: `python reward.py` failed (exit {code})\n"
