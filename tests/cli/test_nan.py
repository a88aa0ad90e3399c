"""The non-finite guard, with NaNs injected from outside the library by
tests/inject_nan.py (it wraps torch.nn.utils.clip_grad_norm_, which every stage calls
once per optimizer step: PPO twice per minibatch, the policy then the value model).
The module's runs start together, two at a time, when its first test starts."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import assert_user_error, run, selected

PPO = ["--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--max_new_tokens=8",
       "--sample_interval=2"]


def with_nans(steps, script, *args, ok=True):
    """`python script.py args` with a NaN put into the gradient at the given optimizer
    steps (clip_grad_norm_ calls of the process, counted from 0)."""
    return run("tests/inject_nan.py", ",".join(map(str, steps)), script, *args, ok=ok)


def skips_two_updates(pipeline, tmp_path, script):
    """A NaN put into the gradient at two optimizer steps: both updates are skipped, counted
    and logged; the run completes with finite weights."""
    args = ([f"--init_from={pipeline.out}/pretrain", "--batch_size=8", "--max_steps=6",
             "--eval_interval=100", "--log_interval=1", "--warmup_steps=1"]
            if script == "sft.py" else
            [*PPO, f"--init_from={pipeline.out}/sft", f"--reward_from={pipeline.out}/reward",
             "--iterations=2", "--ppo_epochs=1", "--sample_interval=0"])
    p = with_nans([2, 3], script, f"--data_dir={pipeline.data}", f"--out_dir={tmp_path}", *args)
    assert len(re.findall(r"non-finite loss or gradient( of the \w+( model)?)?, update skipped",
                          p.stdout)) == 2
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert log[-1]["skipped"] == 2
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def stops_and_resumes(pipeline, tmp_path):
    """Ten NaNs in a row stop the run with one line, keeping the last good checkpoint;
    the run resumes from it."""
    common = [f"--data_dir={pipeline.data}", f"--out_dir={tmp_path}",
              f"--init_from={pipeline.out}/pretrain", "--batch_size=8", "--eval_interval=100",
              "--log_interval=1", "--warmup_steps=1"]
    p = with_nans(range(5, 30), "sft.py", *common, "--max_steps=30", "--ckpt_interval=2",
                  ok=False)
    assert_user_error(p, "10 non-finite updates in a row, at step 14",
                      "ckpt.pt holds the last good weights")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 14 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # the save after step 13 counts the 9 updates skipped so far, all in a row
    assert ckpt["guard"] == {"skipped": 9, "in_a_row": {"": 9}}
    # the saves during the skipped steps hold the weights of step 5, unchanged: resuming works,
    # and the resumed run counts on from the checkpoint's skips
    run("sft.py", *common, "--max_steps=16", "--resume=true")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 16 and ckpt["guard"] == {"skipped": 9, "in_a_row": {"": 0}}
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log if r.get("step") in (14, 15)] == [9, 9]


@pytest.fixture(scope="module")
def nan_runs(request, pipeline, tmp_path_factory):
    tests = selected(request)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        if "test_too_many_nans_in_a_row_stop_the_run_and_keep_the_last_checkpoint" in tests:
            runs["too many"] = pool.submit(stops_and_resumes, pipeline,
                                           tmp_path_factory.mktemp("stop"))
        if "test_injected_nan_skips_the_update" in tests:
            for script in ("sft.py", "ppo.py"):
                runs[script] = pool.submit(skips_two_updates, pipeline,
                                           tmp_path_factory.mktemp("nan"), script)
        yield runs


@pytest.mark.parametrize("script", ["sft.py", "ppo.py"])
def test_injected_nan_skips_the_update(nan_runs, script):
    nan_runs[script].result()


def test_too_many_nans_in_a_row_stop_the_run_and_keep_the_last_checkpoint(nan_runs):
    nan_runs["too many"].result()


CLIP_THREE_TIMES = """
import sys
import torch
w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
norms = []
for _ in range(3):
    w[1].grad = torch.full((1,), 3.0)  # w[0] has no gradient
    norms.append(torch.nn.utils.clip_grad_norm_(iter(w), 10.0).item())
print(sys.argv[1:], [n != n for n in norms], w[1].grad.tolist())
"""


def test_the_injector_counts_clip_calls(tmp_path):
    """tests/inject_nan.py itself, on a script that clips three times: on the calls named,
    a NaN in the first gradient that is not None; the original clip always."""
    (tmp_path / "clip.py").write_text(CLIP_THREE_TIMES)
    p = run("tests/inject_nan.py", "1", tmp_path / "clip.py", "--x=1")
    assert p.stdout.strip() == "['--x=1'] [False, True, False] [3.0]"
