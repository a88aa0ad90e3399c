"""Every training stage stopped by SIGTERM, then killed twice by SIGKILL at random
moments, resumed each time, and in the end equal bitwise to an uninterrupted run (on CPU).

The interrupted runs are processes, as a user's are; the module starts them, two stages
at a time, as soon as its first test starts. Each test runs its stage's uninterrupted
run meanwhile, in this process with one torch thread as every stage process here has
(the same figures, bitwise), then compares the two."""

import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import (ROOT, TINY, assert_user_error_in_process, environ, main_of, read_log,
                      run, selected, stage_module)

import ppo


def tensors(x, prefix=""):
    """Every tensor in a checkpoint's nested dicts and lists, by path."""
    if isinstance(x, torch.Tensor):
        return {prefix: x}
    items = (x.items() if isinstance(x, dict) else
             enumerate(x) if isinstance(x, (list, tuple)) else [])
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def interrupted_run(script, common, out, total, kills=2, seed=0):
    """Stop a run with SIGTERM, then kill it `kills` times with SIGKILL, each at a random
    moment after it has written a newer checkpoint than the last stop found, resuming each
    time, and let the last resume finish. After every kill the checkpoint must load; the
    SIGTERM must exit 143 with its one line and a fresh checkpoint. Returns what it did."""
    rng = random.Random(seed)

    def progress(ck):  # (finished reward-model members, step of the one in training)
        return len(ck.get("members", [])), ck["step"] if "model" in ck else 0

    ckpt = out / "ckpt.pt"
    last, done_kills, sigkills = (-1, -1), 0, 0
    for k in range(kills + 1):
        cmd = [sys.executable, script, *common, f"--out_dir={out}", f"--resume={ckpt.exists()}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=environ())
        deadline, seen = time.time() + 120, None
        # wait for a newer checkpoint (read only when the file was replaced), then a random
        # moment
        while proc.poll() is None and time.time() < deadline:
            try:
                st = ckpt.stat()
                stamp = st.st_mtime_ns, st.st_ino
                if stamp != seen and progress(torch.load(ckpt, weights_only=True)) > last:
                    break
                seen = stamp
            except Exception:
                pass  # not there yet, or read while being replaced: tried again
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:
            break  # finished before this kill
        sig = signal.SIGTERM if k == 0 else signal.SIGKILL
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        ck = torch.load(ckpt, weights_only=True)  # never unreadable
        if proc.returncode in (0, -signal.SIGTERM):  # it had finished and was exiting
            assert ck["step"] == total, (proc.returncode, err)
        elif sig == signal.SIGTERM:
            assert proc.returncode == 143, (proc.returncode, err)
            assert err.strip() == (f"stopped by SIGTERM after step {ck['step']}: checkpoint {ckpt} "
                                   f"saved; --resume=true continues"), err
        else:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
            sigkills += 1
        assert progress(ck) >= last
        last, done_kills = progress(ck), done_kills + 1
    assert done_kills == kills + 1, f"the run ended before it was stopped and killed {kills} times"
    run(script, *common, f"--out_dir={out}", "--resume=true")
    return f"{script}: {done_kills} kills ({sigkills} SIGKILL), {done_kills} resumes"


def assert_same_weights(a, b, total, keys):
    """The checkpoints a and b (folders) finished, with bitwise equal tensors under keys."""
    a, b = (torch.load(x / "ckpt.pt", weights_only=True) for x in (a, b))
    assert a["step"] == b["step"] == total
    for key in keys:
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and a[key]
        if not ta:  # plain numbers (the reward members' normalisation)
            assert a[key] == b[key], key
        diff = max([0.0] + [(ta[n].double() - tb[n].double()).abs().max().item() for n in ta])
        assert all(torch.equal(ta[n], tb[n]) for n in ta), (key, diff)


PPO = ["--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--max_new_tokens=8"]


def scenarios(p):
    """stage: (script, flags, total steps, checkpoint keys compared, seed of the kill times),
    on the pipeline p's data and checkpoints."""
    return {
        # with dropout, so the global random generator must be restored too
        "pretrain": ("pretrain.py", [
            f"--data_dir={p.data}", *TINY, "--dropout=0.1", "--batch_size=8", "--max_steps=150",
            "--eval_interval=1000", "--eval_batches=1", "--ckpt_interval=10", "--warmup_steps=2",
            "--log_interval=1000"], 150, ("model",), 0),
        "sft": ("sft.py", [
            f"--data_dir={p.data}", f"--init_from={p.out}/pretrain", "--batch_size=8",
            "--max_steps=240", "--eval_interval=1000", "--log_interval=1000",
            "--ckpt_interval=10", "--warmup_steps=2"], 240, ("model",), 1),
        # two members: a kill may land in either, or between them
        "reward": ("reward.py", [
            f"--data_dir={p.data}", f"--init_from={p.out}/sft", "--batch_size=4",
            "--max_steps=60", "--eval_interval=1000", "--log_interval=1000", "--ckpt_interval=5",
            "--warmup_steps=1", "--norm_prompts=8", "--max_new_tokens=8", "--members=2"],
            60, ("members", "norms"), 2),
        "dpo": ("dpo.py", [
            f"--data_dir={p.data}", f"--init_from={p.out}/sft", "--batch_size=4",
            "--max_steps=140", "--eval_interval=1000", "--log_interval=1000", "--ckpt_interval=5",
            "--warmup_steps=1", "--kl_prompts=4", "--max_new_tokens=8"], 140, ("model",), 3),
        # with the adaptive KL controller, whose β the checkpoint carries
        "ppo": ("ppo.py", [
            *PPO, f"--data_dir={p.data}", f"--init_from={p.out}/sft",
            f"--reward_from={p.out}/reward", "--iterations=40", "--ckpt_interval=3",
            "--sample_interval=0", "--adaptive_kl=true"], 40,
            ("model", "value_model", "optimizer"), 4),
        # dynamic sampling and the pretraining term: both draw from the iteration's generator;
        # the decaying learning rate follows the iteration count the checkpoint carries
        "grpo": ("grpo.py", [
            f"--data_dir={p.data}", f"--init_from={p.out}/sft", f"--reward_from={p.out}/reward",
            "--reward=sum", "--batch_size=8", "--group_size=4", "--max_new_tokens=8",
            "--updates=2", "--dynamic_sampling=true", "--ptx_coef=0.5", "--ptx_len=32",
            "--lr_decay=true", "--iterations=80", "--ckpt_interval=3", "--sample_interval=0"], 80,
            ("model", "optimizer"), 5),
    }


@pytest.fixture(scope="module")
def interrupted(request, pipeline, tmp_path_factory):
    """{stage: (future of interrupted_run, its folder)} for the stages whose tests were
    selected, two stages at a time."""
    tests = selected(request)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for stage, (script, flags, total, _, seed) in scenarios(pipeline).items():
            if f"test_{stage}_resume_after_kills" in tests:
                out = tmp_path_factory.mktemp(f"interrupted_{stage}")
                future = pool.submit(interrupted_run, script, flags, out, total, seed=seed)
                runs[stage] = future, out
        yield runs


def resume_after_kills(stage, pipeline, interrupted, tmp_path):
    """The uninterrupted run, in this process (one torch thread, as the processes have),
    meanwhile the interrupted one goes on; then the same final weights, bitwise."""
    script, flags, total, keys, _ = scenarios(pipeline)[stage]
    main_of(stage_module(script), [*flags, f"--out_dir={tmp_path}"])
    future, out = interrupted[stage]
    print(future.result())
    assert_same_weights(tmp_path, out, total, keys)


def test_pretrain_resume_after_kills(pipeline, interrupted, tmp_path):
    resume_after_kills("pretrain", pipeline, interrupted, tmp_path)


def test_sft_resume_after_kills(pipeline, interrupted, tmp_path):
    resume_after_kills("sft", pipeline, interrupted, tmp_path)


def test_reward_resume_after_kills(pipeline, interrupted, tmp_path):
    resume_after_kills("reward", pipeline, interrupted, tmp_path)


def test_dpo_resume_after_kills(pipeline, interrupted, tmp_path):
    resume_after_kills("dpo", pipeline, interrupted, tmp_path)


def refused_with_other(capsys, stage, pipeline, tmp_path, flag, needles):
    """A resume of the finished run with another value of a flag that defines what it
    optimises: refused in one line, the checkpoint untouched."""
    script, flags, *_ = scenarios(pipeline)[stage]
    if flag == "--reward=verifiable":  # which has no reward model to read
        flags = [f for f in flags if not f.startswith("--reward_from=")]
    saved = (tmp_path / "ckpt.pt").read_bytes()
    assert_user_error_in_process(capsys, stage_module(script), *flags, f"--out_dir={tmp_path}",
                                 "--resume=true", flag, needles=needles)
    assert (tmp_path / "ckpt.pt").read_bytes() == saved


def test_grpo_resume_after_kills(capsys, pipeline, interrupted, tmp_path):
    resume_after_kills("grpo", pipeline, interrupted, tmp_path)
    refused_with_other(capsys, "grpo", pipeline, tmp_path, "--advantage=rloo",
                       ["ckpt.pt: written with --advantage=grpo, not rloo"])


def test_ppo_resume_after_kills(capsys, pipeline, interrupted, tmp_path):
    """The uninterrupted run's log shows β moving by adaptive_kl_step after every iteration."""
    resume_after_kills("ppo", pipeline, interrupted, tmp_path)
    refused_with_other(capsys, "ppo", pipeline, tmp_path, "--reward=verifiable",
                       ["ckpt.pt: written with --reward=model, not verifiable"])
    log = read_log(tmp_path / "log.jsonl")
    cfg = ppo.Config()  # target_kl, kl_horizon and kl_coef at their defaults
    assert log[0]["objective/beta"] == cfg.kl_coef and len(log) == 40
    for r, nxt in zip(log, log[1:]):
        assert nxt["objective/beta"] == pytest.approx(ppo.adaptive_kl_step(
            r["objective/beta"], r["objective/kl"], cfg.target_kl, 8, cfg.kl_horizon), rel=1e-9)
    assert log[-1]["objective/beta"] != log[0]["objective/beta"]  # adaptive β moved
