"""bench/profile_stages.py on the tiny world: a stage's main() runs under the profiler with
its flags, each part is timed where the stage does that work, the parts add up to the
whole, and every wrapped function is put back afterwards. Nothing here is timed."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, in_process

import model
import sft

ROOT = Path(__file__).resolve().parents[2]


def load_profiler():
    path = ROOT / "bench" / "profile_stages.py"
    spec = importlib.util.spec_from_file_location("bench_profile_stages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_part_of_an_sft_run_is_timed_and_the_parts_add_up(world, stages, tmp_path):
    prof = load_profiler()
    originals = (torch.Tensor.backward, model.GPT.forward, model.GPT.generate,
                 torch.nn.utils.clip_grad_norm_)
    with in_process():
        rec = prof.run_stage("sft.py", [f"--data_dir={world}", f"--init_from={stages}/pretrain",
                                        f"--out_dir={tmp_path}/sft", *QUICK["sft.py"]],
                             t_start=time.time())
    assert (tmp_path / "sft" / "ckpt.pt").exists()  # the stage really ran
    assert (torch.Tensor.backward, model.GPT.forward, model.GPT.generate,
            torch.nn.utils.clip_grad_norm_) == originals
    parts, calls = rec["parts"], rec["calls"]
    assert list(parts) == list(prof.PARTS)
    # 6 steps of one micro-batch, run as 4 length groups: 24 forwards and backwards; 6
    # optimizer calls (clip, step, zero_grad) after making the optimizer; validation
    # before the first step and at steps 3 and 6, its forwards inside it
    assert calls["forward"] == calls["backward"] == 6 * sft.Config.length_groups == 24
    assert calls["optimizer"] == 1 + 3 * 6
    assert calls["evaluation"] == 3
    assert calls["checkpoints"] >= 2  # the pretrained model loaded, the SFT model saved
    assert "generation" not in calls
    assert all(parts[p] > 0 for p in ("forward", "backward", "optimizer", "evaluation",
                                      "checkpoints", "data"))
    assert sum(parts.values()) == pytest.approx(rec["total_s"], abs=1e-2)
    assert parts["other"] >= -1e-2


def test_generation_and_no_grad_forwards_of_an_rl_stage(world, stages, tmp_path):
    prof = load_profiler()
    with in_process():
        rec = prof.run_stage("grpo.py", [f"--data_dir={world}", f"--init_from={stages}/sft",
                                         f"--out_dir={tmp_path}/grpo", "--iterations=2",
                                         "--batch_size=4", "--group_size=2",
                                         "--max_new_tokens=4", "--dynamic_sampling=false"],
                             t_start=time.time())
    calls = rec["calls"]
    assert calls["generation"] >= 2  # one batch of answers an iteration
    assert calls["no-grad fwd"] >= 2  # the frozen reference, each iteration
    assert calls["backward"] >= 2


def test_an_unknown_script_is_refused_in_one_line(capsys):
    prof = load_profiler()
    with pytest.raises(SystemExit) as e:
        prof.main(["nope.py"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: nope.py: not a stage script of this repository (e.g. sft.py, "
                   "data/label.py, or pipeline)"]
