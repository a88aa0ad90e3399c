"""pipeline.py's own loop, with the stage processes faked: the commands in order, the
time of each and the total, and a failing or stopped stage's exit status passed on. (The
stage processes for real, stopped by signals: tests/cli/test_faults.py.)"""

import sys

import pytest
from conftest import QUICK, ROOT

import cli
import pipeline

SCRIPTS = ["data/prepare.py", "pretrain.py", "sft.py", "data/label.py", "reward.py", "ppo.py",
           "dpo.py", "eval.py"]


def test_commands_in_order_with_the_quick_sizes():
    cfg = cli.parse_config(pipeline.Config, ["--quick=true", "--data_dir=w", "--out=o",
                                             "--device=cpu"])
    commands = pipeline.commands(cfg)
    assert [script for script, _ in commands] == SCRIPTS
    for script, flags in commands:
        assert flags[-len(QUICK[script]):] == QUICK[script], script
        assert ("--device=cpu" in flags) == (script != "data/prepare.py"), script
    flags = dict(commands)
    assert flags["data/prepare.py"][0] == "--out_dir=w"
    assert {"--data_dir=w", "--init_from=o/sft", "--reward_from=o/reward",
            "--out_dir=o/ppo"} <= set(flags["ppo.py"])
    plain = pipeline.commands(cli.parse_config(pipeline.Config, []))
    assert all(not any(f in QUICK[s] for f in flags) for s, flags in plain)  # no --quick sizes
    assert not any("--device" in f for _, flags in plain for f in flags)  # auto: not passed


def fake_stages(monkeypatch, codes=None):
    """run_stage records each stage's command and returns its exit status."""
    calls = []

    def run_stage(cmd):
        calls.append(cmd)
        return (codes or {}).get(cmd[1], 0)

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    return calls


def test_main_runs_every_stage_and_times_them(monkeypatch, capsys):
    calls = fake_stages(monkeypatch)
    pipeline.main(cli.parse_config(pipeline.Config, ["--quick=true", "--out=o"]))
    assert [c[0] for c in calls] == [sys.executable] * len(SCRIPTS)
    assert [c[1] for c in calls] == [str(ROOT / s) for s in SCRIPTS]
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out if line.startswith("$ python ")] == SCRIPTS
    table = out[-len(SCRIPTS) - 1:]
    assert [line.split()[0] for line in table[:-1]] == SCRIPTS
    assert table[-1].startswith("total: ") and table[-1].endswith(
        "for the whole pipeline; report: o/report.md")


@pytest.mark.parametrize("code, status, message", [
    (2, 2, ""),  # a user error: the stage said what is wrong, in one line
    (1, 1, "error: `python sft.py` failed (exit 1); the stages before it are done\n"),
    (-9, 137, "error: `python sft.py` was stopped by SIGKILL; the stages before it are done\n"),
    (143, 143, "error: `python sft.py` was stopped by SIGTERM; the stages before it are done\n"),
    (130, 130, "error: `python sft.py` was stopped by SIGINT; the stages before it are done\n"),
    (137, 137, "error: `python sft.py` failed (exit 137); the stages before it are done\n"),
])
def test_a_failing_stage_stops_the_pipeline(monkeypatch, capsys, code, status, message):
    calls = fake_stages(monkeypatch, {str(ROOT / "sft.py"): code})
    with pytest.raises(SystemExit) as e:
        pipeline.main(cli.parse_config(pipeline.Config, []))
    assert e.value.code == status and capsys.readouterr().err == message
    assert [c[1] for c in calls] == [str(ROOT / s) for s in SCRIPTS[:3]]


@pytest.mark.parametrize("flag, needle", [
    ("--out", "--out={} is a file, not a folder"),
    ("--data_dir", "--data_dir={} is a file, not a folder"),
    ("--device", "--device=tpu: expected auto, cpu, cuda or mps"),
])
def test_what_would_stop_a_later_stage_is_refused_before_the_first(monkeypatch, tmp_path, capsys,
                                                                    flag, needle):
    calls = fake_stages(monkeypatch)
    (tmp_path / "f").write_text("")
    value = "tpu" if flag == "--device" else str(tmp_path / "f")
    with pytest.raises(SystemExit) as e, cli.user_errors():
        pipeline.main(cli.parse_config(pipeline.Config, [f"{flag}={value}"]))
    assert e.value.code == 2 and needle.format(value) in capsys.readouterr().err
    assert calls == []
