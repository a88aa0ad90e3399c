"""cai.py end to end on the tiny pipeline: the demonstrations, the critic, the labels and
their agreement figures written (the tiny critic learns little in three steps)."""

import json
import signal

import pytest
import torch

from conftest import copy_world, main_of

import cai
import distributed
from cli import parse_config


def test_cai_end_to_end_on_the_tiny_pipeline(pipeline, tmp_path, capsys):
    data = copy_world(pipeline.data, tmp_path / "world")
    out = tmp_path / "cai"
    main_of(cai, [f"--data_dir={data}", f"--init_from={pipeline.out}/sft", f"--out_dir={out}",
                  "--n_critiques=60", "--n_judgements=30", "--n_sft=30", "--critic_steps=3",
                  "--n_prompts=100", "--max_new_tokens=16"])
    printed = capsys.readouterr().out
    figures = json.loads((out / "agreement.json").read_text())
    assert figures["drafts"] == 16  # every training prompt of the tiny world
    assert set(figures) >= {"revision", "judge", "raters"}
    assert "| AI: the judge |" in printed and (out / "critic" / "ckpt.pt").exists()
    demos = [json.loads(x) for x in (out / "demos.jsonl").read_text().splitlines()]
    assert {d["kind"] for d in demos} == {"critique", "judgement", "answer"}
    # the judge's pairs and the raters' are the same pairs, written when there are two or more
    if figures["judge"]["pairs"] >= 2:
        judged = [json.loads(x) for x in (data / "prefs_cai_judge_train.jsonl").read_text()
                  .splitlines()]
        rated = [json.loads(x) for x in (data / "prefs_cai_raters_train.jsonl").read_text()
                 .splitlines()]
        assert [sorted(r["text"] for r in x["responses"]) for x in judged] == \
               [sorted(r["text"] for r in x["responses"]) for x in rated]


def test_a_critic_stopped_part_way_continues_on_the_next_run(pipeline, tmp_path, capsys):
    data = copy_world(pipeline.data, tmp_path / "world")
    out = tmp_path / "cai"
    args = [f"--data_dir={data}", f"--init_from={pipeline.out}/sft", f"--out_dir={out}",
            "--n_critiques=20", "--n_judgements=10", "--n_sft=10", "--critic_steps=3",
            "--n_prompts=8", "--max_new_tokens=8"]
    main_of(cai, args)
    assert "the critic of these demonstrations is there already" not in capsys.readouterr().out
    ckpt = out / "critic" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "step": 2}, ckpt)  # as a run stopped after its second step leaves it
    main_of(cai, args)
    assert f"resuming {ckpt} at step 2" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    main_of(cai, args)
    assert "the critic of these demonstrations is there already" in capsys.readouterr().out


def test_a_critic_stopped_by_a_signal_says_to_run_cai_again(pipeline, tmp_path, capsys,
                                                             monkeypatch):
    """The critic is sft.py's loop run inside cai.py, which has no --resume flag: the line
    printed on a stop names cai.py's way to continue."""
    def stopped_sft(cfg, resume_hint=None):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        stop = distributed.StopSignal(resume_hint)
        for sig, handler in previous.items():  # its handlers stay out of the test process
            signal.signal(sig, handler)
        stop.signum = signal.SIGTERM  # as if asked to stop during the critic's second step
        stop.exit(2, f"{cfg.out_dir}/ckpt.pt")

    monkeypatch.setattr(cai.sft, "main", stopped_sft)
    data = copy_world(pipeline.data, tmp_path / "world")
    with pytest.raises(SystemExit) as e:
        cai.main(parse_config(cai.Config, [
            f"--data_dir={data}", f"--init_from={pipeline.out}/sft", f"--out_dir={tmp_path}/c",
            "--n_critiques=4", "--n_judgements=4", "--n_sft=4", "--critic_steps=3",
            "--n_prompts=4", "--max_new_tokens=4"]))
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2" in err
    assert "running cai.py again with the same flags continues the critic" in err
    assert "--resume=true" not in err
