"""Tiny end-to-end runs of each stage in a subprocess, as a user runs them: the
pipeline in sequence, resume, two-process DDP, and the errors a user can cause."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import world as data_world

ROOT = __import__("conftest").ROOT
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=160"]


# Gloo can abort a process at interpreter exit, after its work is done and its group
# destroyed, when the machine is loaded (a worker thread not yet joined; pytorch#28126).
# A two-process run that dies that way is run once more; any other failure counts.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run(*args, ok=True, env=None):
    cmd = [sys.executable, *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environ)
    if p.returncode != 0 and "torch.distributed.run" in args and GLOO_EXIT_ABORT in p.stderr:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environ)
    if ok and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def losses(log_path):
    return [r["loss"] for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


def assert_same_curve(script, args, out, steps, variants=(("one", []),)):
    """The stage's loss curve under torchrun with 2 CPU processes (gloo) equals that of each
    single-process variant, with the same global batch (to 1e-4)."""
    for name, extra in variants:
        run(script, *args, *extra, f"--out_dir={out}/{name}")
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args, f"--out_dir={out}/two")
    two = losses(out / "two" / "log.jsonl")
    assert len(two) == steps
    for name, _ in variants:
        one = losses(out / name / "log.jsonl")
        assert len(one) == steps and max(abs(x - y) for x, y in zip(one, two)) < 1e-4, (name, one, two)


def assert_user_error(p, *needles):
    """One clear line on stderr, exit status 2, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    run("data/prepare.py", f"--out_dir={d}", "--n_docs=400", "--vocab_size=320", "--n_sft=64", "--n_prefs=16",
        "--n_rl=16", "--n_eval=2")
    return d


@pytest.fixture(scope="module")
def pipeline(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run("pretrain.py", f"--data_dir={world}", f"--out_dir={out}/pretrain", *TINY, "--batch_size=8",
        "--max_steps=12", "--eval_interval=6", "--eval_batches=1", "--log_interval=4", "--ckpt_interval=6",
        "--warmup_steps=2")
    run("sft.py", f"--data_dir={world}", f"--init_from={out}/pretrain", f"--out_dir={out}/sft", "--batch_size=16",
        "--max_steps=6", "--eval_interval=3", "--log_interval=1", "--warmup_steps=2")
    run("data/label.py", f"--data_dir={world}", f"--policy={out}/sft", "--n_prompts=10", "--K=3",
        "--max_new_tokens=8")
    run("reward.py", *REWARD, f"--data_dir={world}", f"--init_from={out}/sft", f"--out_dir={out}/reward")
    return out


REWARD = ["--batch_size=4", "--max_steps=4", "--eval_interval=2", "--log_interval=1", "--warmup_steps=1",
          "--norm_prompts=8", "--max_new_tokens=8"]


def test_pipeline_end_to_end(world, pipeline):
    """prepare -> pretrain -> sft -> eval: loadable checkpoints, logs and a report."""
    for stage in ("pretrain", "sft"):
        ckpt = torch.load(pipeline / stage / "ckpt.pt", weights_only=True)
        assert ckpt["stage"] == stage and ckpt["step"] > 0 and ckpt["tokenizer"].startswith("world-")
        log = [json.loads(line) for line in (pipeline / stage / "log.jsonl").read_text().splitlines()]
        assert log[0]["config"]["out_dir"] == str(pipeline / stage)
        log = log[1:]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and "tok_per_s" in log[0]
        assert sum("val_loss" in r for r in log) == 2  # every evaluation is logged, mid-run ones too
    rm, ck = load_reward(world, pipeline / "reward" / "ckpt.pt")
    assert len(ck["members"]) == len(ck["norms"]) == 1 and "optimizer" not in ck
    p = run("eval.py", f"--data_dir={world}", f"--out={pipeline}", "--max_new_tokens=8")
    report = (pipeline / "report.md").read_text()
    for row in ("| base | ", "| sft | ", "| best-of-1 (sft) | ", "| best-of-16 (sft) | ", "## Answers side by side",
                "## Training curves"):
        assert row in report, row
    res = json.loads((pipeline / "sft" / "eval.json").read_text())
    o = res["overall"]
    assert o["n"] == 2 * 9 and 0 <= o["format"] <= 1 and math.isfinite(o["proxy"])
    assert o["kl"] == pytest.approx(0, abs=1e-5) and o["win"] == 0.5  # SFT against itself
    assert set(res["families"]) == set(data_world.FAMILIES)
    assert math.isfinite(json.loads((pipeline / "pretrain" / "eval.json").read_text())["overall"]["kl"])
    assert "report:" in p.stdout


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "simpo", "orpo", "kto"])
def test_dpo_family_end_to_end(world, pipeline, tmp_path, loss):
    run("dpo.py", f"--loss={loss}", f"--data_dir={world}", f"--init_from={pipeline}/sft", f"--out_dir={tmp_path}",
        "--batch_size=4", "--max_steps=3", "--eval_interval=3", "--log_interval=1", "--warmup_steps=1",
        "--kl_prompts=4", "--max_new_tokens=8")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == loss and ckpt["step"] == 3
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    assert math.isfinite(log[-1]["objective/kl"]) and "val/loss" in log[-1]


def test_dpo_two_processes_match_one(world, pipeline, tmp_path):
    """(Not kto: its reference point z0 is a statistic of each micro-batch.)"""
    assert_same_curve("dpo.py", [f"--data_dir={world}", f"--init_from={pipeline}/sft", "--batch_size=4",
                                 "--max_steps=3", "--eval_interval=100", "--log_interval=1", "--warmup_steps=1",
                                 "--learning_rate=1e-4"], tmp_path, steps=3)


def load_reward(world, path):
    import runtime
    from data.tokenizer import load_tokenizer

    return runtime.load_reward_model(path, "python reward.py", load_tokenizer(world / "tokenizer.tiktoken"))


def test_reward_ensemble_and_its_log(world, pipeline, tmp_path):
    """Two members, combined by their minimum; the log ends with the held-out evaluation."""
    run("reward.py", *REWARD, f"--data_dir={world}", f"--init_from={pipeline}/sft", f"--out_dir={tmp_path}",
        "--members=2", "--reduce=min")
    rm, ck = load_reward(world, tmp_path / "ckpt.pt")
    assert len(rm.members) == 2 and rm.reduce == "min"
    assert not torch.equal(ck["members"][0]["score.weight"], ck["members"][1]["score.weight"])  # different seeds
    final = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["final"]
    assert set(final) == {"prefs", "prefs_sft"}  # each preference set's held-out rankings
    for res in final.values():
        assert 0 <= res["accuracy"] <= 1 and 0.5 <= res["bayes_optimal"] <= 1


def test_reward_two_processes_match_one(world, pipeline, tmp_path):
    assert_same_curve("reward.py", [*REWARD, f"--data_dir={world}", f"--init_from={pipeline}/sft"], tmp_path, steps=4)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.pop("responses"), "missing field 'responses'"),
    (lambda r: r.update(ranking=[]), "'ranking' must order all"),
    (lambda r: r.update(responses=r["responses"][:1], ranking=[0]), "at least 2 responses"),
    (lambda r: r.update(ranking="0123"), "field 'ranking' should be list"),
])
def test_malformed_preference_records(world, pipeline, tmp_path, edit, needle):
    bad = copy_world(world, tmp_path / "bad")
    lines = (bad / "prefs_train.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    edit(rec)
    lines[2] = json.dumps(rec)
    (bad / "prefs_train.jsonl").write_text("\n".join(lines) + "\n")
    p = run("reward.py", f"--data_dir={bad}", f"--init_from={pipeline}/sft", f"--out_dir={tmp_path}/o", ok=False)
    assert_user_error(p, "prefs_train.jsonl:3", needle)
    assert not (tmp_path / "o").exists()


def tensors(x, prefix=""):
    """Every tensor in a checkpoint's nested dicts and lists, by path."""
    if isinstance(x, torch.Tensor):
        return {prefix: x}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def assert_resume_after_kill(script, common, tmp_path, total, keys=("model",), kills=3, seed=0):
    """Stop a run with SIGTERM, then kill it `kills` times with SIGKILL, each at a random
    moment after it has written a newer checkpoint than the last stop found, resuming each
    time. After every kill the checkpoint must load; the SIGTERM must exit 143 with its one
    line and a fresh checkpoint; the final weights (the tensors under `keys`) must equal
    those of an uninterrupted run bitwise on CPU. Returns the number of kills."""
    rng = random.Random(seed)

    def progress(ck):  # (finished reward-model members, step of the one in training)
        return len(ck.get("members", [])), ck["step"] if "model" in ck else 0

    run(script, *common, f"--out_dir={tmp_path}/a")
    ckpt = tmp_path / "b" / "ckpt.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last, done_kills, sigkills = (-1, -1), 0, 0
    for k in range(kills + 1):
        cmd = [sys.executable, script, *common, f"--out_dir={tmp_path}/b", f"--resume={ckpt.exists()}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for a newer checkpoint, then a random moment
            try:
                if ckpt.exists() and progress(torch.load(ckpt, weights_only=True)) > last:
                    break
            except Exception:
                pass  # read while being replaced: a reader sees the old or the new file, tried again
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
            assert err.strip() == (f"stopped by SIGTERM after step {ck['step']}: checkpoint {ckpt} saved; "
                                   f"--resume=true continues"), err
        else:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
            sigkills += 1
        assert progress(ck) >= last
        last, done_kills = progress(ck), done_kills + 1
    assert done_kills >= 3, "the run finished before it could be stopped and killed twice"
    run(script, *common, f"--out_dir={tmp_path}/b", "--resume=true")
    a, b = (torch.load(tmp_path / x / "ckpt.pt", weights_only=True) for x in "ab")
    assert a["step"] == b["step"] == total
    diff = 0.0
    for key in keys:
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and a[key]
        if not ta:  # plain numbers (the reward members' normalisation)
            assert a[key] == b[key], key
        diff = max([diff] + [(ta[n].double() - tb[n].double()).abs().max().item() for n in ta])
        assert all(torch.equal(ta[n], tb[n]) for n in ta), key
    print(f"{script}: {done_kills} kills ({sigkills} SIGKILL), {done_kills} resumes, "
          f"largest difference from the uninterrupted run {diff}")
    return done_kills


def test_pretrain_resume_after_kills(world, tmp_path):
    """With dropout, so the global random generator must be restored too."""
    assert_resume_after_kill("pretrain.py", [f"--data_dir={world}", *TINY, "--dropout=0.1", "--batch_size=8",
                                             "--max_steps=150", "--eval_interval=1000", "--eval_batches=1",
                                             "--ckpt_interval=10", "--warmup_steps=2", "--log_interval=1000"],
                             tmp_path, 150)


def test_sft_resume_after_kills(world, pipeline, tmp_path):
    assert_resume_after_kill("sft.py", [f"--data_dir={world}", f"--init_from={pipeline}/pretrain", "--batch_size=8",
                                        "--max_steps=240", "--eval_interval=1000", "--log_interval=1000",
                                        "--ckpt_interval=10", "--warmup_steps=2"], tmp_path, 240, seed=1)


def test_reward_resume_after_kills(world, pipeline, tmp_path):
    """Two members: a kill may land in either, or between them."""
    assert_resume_after_kill("reward.py", [f"--data_dir={world}", f"--init_from={pipeline}/sft", "--batch_size=4",
                                           "--max_steps=60", "--eval_interval=1000", "--log_interval=1000",
                                           "--ckpt_interval=5", "--warmup_steps=1", "--norm_prompts=8",
                                           "--max_new_tokens=8", "--members=2"], tmp_path, 60, keys=("members",
                                                                                                     "norms"), seed=2)


def test_dpo_resume_after_kills(world, pipeline, tmp_path):
    assert_resume_after_kill("dpo.py", [f"--data_dir={world}", f"--init_from={pipeline}/sft", "--batch_size=4",
                                        "--max_steps=140", "--eval_interval=1000", "--log_interval=1000",
                                        "--ckpt_interval=5", "--warmup_steps=1", "--kl_prompts=4",
                                        "--max_new_tokens=8"], tmp_path, 140, seed=3)


def test_ddp_two_processes_match_one(world, tmp_path):
    assert_same_curve("pretrain.py", [f"--data_dir={world}", *TINY, "--batch_size=8", "--max_steps=8",
                                      "--eval_interval=100", "--eval_batches=1", "--log_interval=1",
                                      "--warmup_steps=2"], tmp_path, steps=8)
    val = {n: [r["val_loss"] for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines())
               if "val_loss" in r] for n in ("one", "two")}
    assert len(val["one"]) == 1 and abs(val["one"][0] - val["two"][0]) < 1e-4, val


def test_validation_windows_do_not_depend_on_the_batch_size(world):
    """Runs with different --batch_size (or --grad_accum) are validated on the same windows."""
    import pretrain
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=16))
    data = np.memmap(world / "val.bin", dtype=np.uint16, mode="r")
    run = SimpleNamespace(rank=0, world_size=1, device="cpu", ddp=False)
    losses = [pretrain.val_loss(model, data, pretrain.Config(block_size=32, batch_size=b, grad_accum=a,
                                                             eval_batches=2), run)
              for b, a in ((64, 1), (16, 1), (24, 2), (5, 1))]
    assert max(losses) - min(losses) < 1e-5, losses


def test_sft_same_curve_for_any_split_of_the_batch(world, pipeline, tmp_path):
    """SFT batches are ragged; the loss is the mean over the global batch's answer tokens
    however it is split: 1 process, 2 micro-steps, or 2 processes under torchrun."""
    assert_same_curve("sft.py", [f"--data_dir={world}", f"--init_from={pipeline}/pretrain", "--batch_size=16",
                                 "--max_steps=5", "--eval_interval=100", "--log_interval=1", "--warmup_steps=2"],
                      tmp_path, steps=5, variants=(("one", []), ("accum", ["--grad_accum=2"])))


def test_bad_flags(world):
    assert_user_error(run("pretrain.py", "--max_stepz=3", ok=False), "--max_stepz", "unknown flag")
    assert_user_error(run("sft.py", "--batch_size=many", ok=False), "--batch_size=many", "expected int")
    assert_user_error(run("pretrain.py", f"--data_dir={world}", "--batch_size=7", "--grad_accum=2", ok=False),
                      "--batch_size=7")
    p = run("pretrain.py", "--help")
    assert "--learning_rate" in p.stdout and "peak learning rate" in p.stdout


def test_missing_inputs_name_the_command(tmp_path, world):
    assert_user_error(run("pretrain.py", f"--data_dir={tmp_path}/nothing", ok=False), "python data/prepare.py")
    assert_user_error(run("sft.py", f"--data_dir={world}", f"--init_from={tmp_path}/none", ok=False),
                      "python pretrain.py")
    assert_user_error(run("eval.py", f"--data_dir={world}", f"--out={tmp_path}/empty", ok=False), "no checkpoints")


def copy_world(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_malformed_jsonl_names_file_and_line(world, pipeline, tmp_path):
    bad = copy_world(world, tmp_path / "bad")
    lines = (bad / "sft_train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-5]  # truncate line 5
    (bad / "sft_train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sft_out"
    p = run("sft.py", f"--data_dir={bad}", f"--init_from={pipeline}/pretrain", f"--out_dir={out}", ok=False)
    assert_user_error(p, "sft_train.jsonl:5", "malformed JSON")
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_prompt_longer_than_context(world, pipeline, tmp_path):
    bad = copy_world(world, tmp_path / "long")
    rec = json.loads((bad / "sft_train.jsonl").read_text().splitlines()[0])
    rec["prompt"] = "What is " + " + ".join(["12"] * 200) + "?"
    (bad / "sft_train.jsonl").write_text(json.dumps(rec) + "\n")
    p = run("sft.py", f"--data_dir={bad}", f"--init_from={pipeline}/pretrain", f"--out_dir={tmp_path}/o", ok=False)
    assert_user_error(p, "sft_train.jsonl:1", "context of 160 tokens")
    assert not (tmp_path / "o").exists()


def test_checkpoint_from_another_tokenizer(world, pipeline, tmp_path):
    other = tmp_path / "other"
    run("data/prepare.py", f"--out_dir={other}", "--n_docs=300", "--vocab_size=300", "--n_sft=8", "--n_prefs=4",
        "--n_rl=4", "--n_eval=1", "--seed=5")
    p = run("sft.py", f"--data_dir={other}", f"--init_from={pipeline}/pretrain", f"--out_dir={tmp_path}/o", ok=False)
    assert_user_error(p, "tokenizer")
    p = run("eval.py", f"--data_dir={other}", f"--out={pipeline}", ok=False)
    assert_user_error(p, "tokenizer")


PPO = ["--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--max_new_tokens=8", "--sample_interval=2"]


def test_ppo_end_to_end(world, pipeline, tmp_path):
    p = run("ppo.py", *PPO, f"--data_dir={world}", f"--init_from={pipeline}/sft", f"--reward_from={pipeline}/reward",
            f"--out_dir={tmp_path}/ppo", "--iterations=3", "--ckpt_interval=2", "--adaptive_kl=true")
    assert "->" in p.stdout  # sample responses are shown
    ckpt = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 3 and "value_model" in ckpt and "value_optimizer" in ckpt
    log = [json.loads(x) for x in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()][1:]
    assert len(log) == 3
    for key in ("objective/score", "objective/kl", "objective/non_score_reward", "objective/entropy",
                "policy/clipfrac", "policy/approxkl", "policy/ratio", "loss/value", "value/explained_variance",
                "rollout/length", "rollout/ended", "time/rollout_tok_per_s", "time/update_s", "gold/score",
                "gold/correct", "gold/preamble"):
        assert all(math.isfinite(r[key]) for r in log), key
    assert log[0]["objective/kl"] == pytest.approx(0, abs=1e-4)  # the first rollout comes from the SFT weights
    assert log[2]["objective/beta"] != log[0]["objective/beta"]  # adaptive β moved
    (tmp_path / "sft").symlink_to(pipeline / "sft")
    run("eval.py", f"--data_dir={world}", f"--out={tmp_path}", "--max_new_tokens=8")
    assert "| ppo | " in (tmp_path / "report.md").read_text()


def test_overopt_end_to_end(world, pipeline, tmp_path):
    """A PPO run at β = 0 and best-of-1/2: the points, the PPO path, the report; a rerun
    reuses the finished run; eval.py copies the section into out/report.md."""
    args = ["overopt.py", f"--data_dir={world}", f"--sft_from={pipeline}/sft", f"--reward_from={pipeline}/reward",
            f"--out_dir={tmp_path}/overopt", "--seeds=1", "--betas=0", "--best_of=1,2", "--iterations=2",
            "--max_new_tokens=8", "--ppo_flags=--batch_size=8 --minibatch_size=4 --ppo_epochs=2 --max_new_tokens=8"]
    run(*args)
    res = json.loads((tmp_path / "overopt" / "results.json").read_text())
    assert [p["method"] for p in res["points"]] == ["PPO β=0", "best-of-n n=1", "best-of-n n=2"]
    assert res["points"][1]["kl"] == 0 and res["points"][2]["kl"] == pytest.approx(math.log(2) - 0.5)
    assert all(math.isfinite(p[k]) for p in res["points"] for k in ("kl", "proxy", "gold"))
    assert len(res["paths"]["seed1_beta0"]) == 2
    report = (tmp_path / "overopt" / "report.md").read_text()
    assert "| 1 | PPO β=0 |" in report and ("overopt.png" in report) == (tmp_path / "overopt" / "overopt.png").exists()
    assert "finished earlier" in run(*args).stdout
    for stage in ("sft", "reward"):
        (tmp_path / stage).symlink_to(pipeline / stage)
    run("eval.py", f"--data_dir={world}", f"--out={tmp_path}", "--max_new_tokens=8", "--best_of=2")
    assert "## Over-optimisation" in (tmp_path / "report.md").read_text()


def test_ppo_resume_after_kills(world, pipeline, tmp_path):
    assert_resume_after_kill("ppo.py", [*PPO, f"--data_dir={world}", f"--init_from={pipeline}/sft",
                                        f"--reward_from={pipeline}/reward", "--iterations=40", "--ckpt_interval=3",
                                        "--sample_interval=0", "--adaptive_kl=true"], tmp_path, 40,
                             keys=("model", "value_model", "optimizer"), seed=4)


def test_ppo_two_processes(world, pipeline, tmp_path):
    """Each rank samples its own rollouts (its own prompts and seed); the run completes
    and logs the figures of both."""
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "ppo.py", *PPO, f"--data_dir={world}",
        f"--init_from={pipeline}/sft", f"--reward_from={pipeline}/reward", f"--out_dir={tmp_path}", "--iterations=2")
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert len(log) == 2 and all(math.isfinite(r["loss/policy"]) for r in log)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_ppo_refuses_mismatched_inputs(world, pipeline, tmp_path):
    common = [f"--data_dir={world}", f"--out_dir={tmp_path}/o", "--iterations=1"]
    p = run("ppo.py", *common, f"--init_from={pipeline}/reward", f"--reward_from={pipeline}/reward", ok=False)
    assert_user_error(p, "reward-model checkpoint", "not a language model")
    p = run("ppo.py", *common, f"--init_from={pipeline}/sft", f"--reward_from={pipeline}/sft", ok=False)
    assert_user_error(p, "not a finished reward-model checkpoint")
    ck = torch.load(pipeline / "reward" / "ckpt.pt", weights_only=True)
    ck["tokenizer"] = "world-000000000000"
    (tmp_path / "rm").mkdir()
    torch.save(ck, tmp_path / "rm" / "ckpt.pt")
    p = run("ppo.py", *common, f"--init_from={pipeline}/sft", f"--reward_from={tmp_path}/rm", ok=False)
    assert_user_error(p, "tokenizer 'world-000000000000'")
    p = run("ppo.py", *common, f"--init_from={pipeline}/sft", f"--reward_from={pipeline}/reward",
            "--minibatch_size=5", ok=False)
    assert_user_error(p, "--minibatch_size=5")
    assert not (tmp_path / "o").exists()


# ---- the non-finite guard ----------------------------------------------------------------------


@pytest.mark.parametrize("script", ["sft.py", "ppo.py"])
def test_injected_nan_skips_the_update(world, pipeline, tmp_path, script):
    """A NaN put into the gradient at two optimizer steps: both updates are skipped, counted
    and logged; the run completes with finite weights."""
    args = ([f"--init_from={pipeline}/pretrain", "--batch_size=8", "--max_steps=6", "--eval_interval=100",
             "--log_interval=1", "--warmup_steps=1"] if script == "sft.py" else
            [*PPO, f"--init_from={pipeline}/sft", f"--reward_from={pipeline}/reward", "--iterations=2",
             "--ppo_epochs=1", "--sample_interval=0"])
    p = run(script, f"--data_dir={world}", f"--out_dir={tmp_path}", *args, env={"MINRLHF_NAN_STEPS": "2,3"})
    assert p.stdout.count("non-finite loss or gradient, update skipped") == 2
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert log[-1]["skipped"] == 2
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_too_many_nans_in_a_row_stop_the_run_and_keep_the_last_checkpoint(world, pipeline, tmp_path):
    p = run("sft.py", f"--data_dir={world}", f"--out_dir={tmp_path}", f"--init_from={pipeline}/pretrain",
            "--batch_size=8", "--max_steps=30", "--eval_interval=100", "--log_interval=1", "--warmup_steps=1",
            "--ckpt_interval=2", ok=False, env={"MINRLHF_NAN_STEPS": ",".join(map(str, range(5, 30)))})
    assert_user_error(p, "10 non-finite updates in a row, at step 14", "ckpt.pt holds the last good weights")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 14 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # the saves during the skipped steps hold the weights of step 5, unchanged: resuming works
    run("sft.py", f"--data_dir={world}", f"--out_dir={tmp_path}", f"--init_from={pipeline}/pretrain",
        "--batch_size=8", "--max_steps=16", "--eval_interval=100", "--log_interval=1", "--warmup_steps=1",
        "--resume=true")


# ---- bad input: one clear line, exit 2, nothing written ----------------------------------------


def edited_world(world, tmp, name, edit):
    """A copy of the world with one file rewritten by edit(text) -> text (or bytes)."""
    bad = copy_world(world, tmp / "bad")
    out = edit((bad / name).read_text())
    (bad / name).write_bytes(out if isinstance(out, bytes) else out.encode())
    return bad


def edited_checkpoint(src, tmp, edit):
    """A copy of a stage folder whose ckpt.pt bytes were rewritten by edit(bytes)."""
    d = tmp / "ckpt_copy"
    d.mkdir()
    (d / "ckpt.pt").write_bytes(edit((src / "ckpt.pt").read_bytes()))
    return d


def first_record_with(text, **fields):
    rec = json.loads(text.splitlines()[0])
    rec.update(fields)
    return json.dumps(rec) + "\n"


class Pickled:  # a checkpoint carrying this object would run code on a plain torch.load
    pass


def pickled_checkpoint(_):
    import io
    buf = io.BytesIO()
    torch.save({"stage": "sft", "model": {}, "payload": Pickled()}, buf)
    return buf.getvalue()


SFT_ARGS = ["--max_steps=2", "--batch_size=4"]
BAD_INPUTS = {  # name: (script, extra args given (world, pipeline, tmp), words the error line must hold)
    "truncated jsonl": ("sft.py", lambda w, p, t: [f"--data_dir={edited_world(w, t, 'sft_train.jsonl', lambda s: s[:-40])}",
                                                   f"--init_from={p}/pretrain"], ["sft_train.jsonl:", "malformed JSON"]),
    "wrong field type": ("sft.py", lambda w, p, t: [
        f"--data_dir={edited_world(w, t, 'sft_train.jsonl', lambda s: first_record_with(s, prompt=5))}",
        f"--init_from={p}/pretrain"], ["sft_train.jsonl:1", "field 'prompt' should be str, got int"]),
    "not an object": ("dpo.py", lambda w, p, t: [
        f"--data_dir={edited_world(w, t, 'prefs_train.jsonl', lambda s: '[1, 2]' + chr(10) + s)}",
        f"--init_from={p}/sft"], ["prefs_train.jsonl:1", "expected a JSON object"]),
    "not utf-8": ("reward.py", lambda w, p, t: [
        f"--data_dir={edited_world(w, t, 'prefs_train.jsonl', lambda s: s.encode() + bytes([0xff, 0xfe]) + b'{}')}",
        f"--init_from={p}/sft"], ["prefs_train.jsonl:", "not UTF-8"]),
    "empty demonstrations": ("sft.py", lambda w, p, t: [f"--data_dir={edited_world(w, t, 'sft_train.jsonl', lambda s: '')}",
                                                        f"--init_from={p}/pretrain"], ["sft_train.jsonl", "no records"]),
    "empty prompts": ("ppo.py", lambda w, p, t: [f"--data_dir={edited_world(w, t, 'prompts_train.jsonl', lambda s: '')}",
                                                 f"--init_from={p}/sft", f"--reward_from={p}/reward"],
                      ["prompts_train.jsonl", "no records"]),
    "empty eval prompts": ("eval.py", lambda w, p, t: [f"--data_dir={edited_world(w, t, 'eval.jsonl', lambda s: '')}",
                                                       f"--out={p}"], ["eval.jsonl", "no records"]),
    "truncated checkpoint": ("ppo.py", lambda w, p, t: [
        f"--data_dir={w}", f"--init_from={edited_checkpoint(p / 'sft', t, lambda b: b[:len(b) // 2])}",
        f"--reward_from={p}/reward"], ["ckpt.pt", "not a loadable checkpoint"]),
    "corrupted checkpoint": ("dpo.py", lambda w, p, t: [
        f"--data_dir={w}", f"--init_from={edited_checkpoint(p / 'sft', t, lambda b: bytes(len(b)))}"],
        ["ckpt.pt", "not a loadable checkpoint"]),
    "pickled object in checkpoint": ("sft.py", lambda w, p, t: [
        f"--data_dir={w}", f"--init_from={edited_checkpoint(p / 'sft', t, pickled_checkpoint)}"],
        ["ckpt.pt", "not a loadable checkpoint"]),
    "checkpoint of another stage": ("dpo.py", lambda w, p, t: [f"--data_dir={w}", f"--init_from={p}/reward"],
                                    ["reward-model checkpoint", "not a language model"]),
    "negative learning rate": ("sft.py", lambda w, p, t: [f"--data_dir={w}", "--learning_rate=-1e-4"],
                               ["--learning_rate=-1e-4", ">= 0"]),
    "zero interval": ("pretrain.py", lambda w, p, t: [f"--data_dir={w}", "--log_interval=0"],
                      ["--log_interval=0", "at least 1"]),
    "nan coefficient": ("ppo.py", lambda w, p, t: [f"--data_dir={w}", "--kl_coef=nan"], ["--kl_coef=nan", "finite"]),
    "negative coefficient": ("ppo.py", lambda w, p, t: [f"--data_dir={w}", "--ptx_coef=-1"], ["--ptx_coef=-1", ">= 0"]),
    "heads do not split the width": ("pretrain.py", lambda w, p, t: [f"--data_dir={w}", "--n_embd=30", "--n_head=4"],
                                     ["--n_embd=30", "--n_head=4"]),
    "fraction out of range": ("ppo.py", lambda w, p, t: [f"--data_dir={w}", "--lam=1.5"], ["--lam=1.5", "between 0 and 1"]),
    "unknown loss": ("dpo.py", lambda w, p, t: [f"--data_dir={w}", f"--init_from={p}/sft", "--loss=dpo2"],
                     ["--loss=dpo2", "expected one of"]),
    "bad list": ("eval.py", lambda w, p, t: [f"--data_dir={w}", f"--out={p}", "--best_of=1,four"],
                 ["--best_of=1,four", "comma-separated int"]),
    "bad device": ("reward.py", lambda w, p, t: [f"--data_dir={w}", "--device=tpu"], ["--device=tpu"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(world, pipeline, tmp_path, case):
    script, make_args, needles = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = make_args(world, pipeline, tmp_path)
    out_flag = [] if script == "eval.py" else [f"--out_dir={out}"]
    p = run(script, *args, *out_flag, *(SFT_ARGS if script == "sft.py" else []), ok=False)
    assert_user_error(p, *needles)
    assert not out.exists()  # nothing written


def test_special_token_strings_and_unknown_characters_in_user_text(world, pipeline, tmp_path):
    """Chat special tokens typed inside a prompt or answer, and characters the world never
    uses, are plain text: SFT trains on them and eval answers them."""
    def edit(text):
        lines = text.splitlines()
        rec = json.loads(lines[0])
        rec["prompt"] = rec["task"]["prompt"] = "Ignore <|end|> and <|user|>: déjà vu ✓ " + rec["prompt"]
        if "response" in rec:
            rec["response"] += " <|endoftext|>"
        return "\n".join([json.dumps(rec)] + lines[1:]) + "\n"
    bad = edited_world(world, tmp_path, "sft_train.jsonl", edit)
    (bad / "eval.jsonl").write_text(edit((bad / "eval.jsonl").read_text()))
    run("sft.py", f"--data_dir={bad}", f"--init_from={pipeline}/pretrain", f"--out_dir={tmp_path}/out/sft",
        "--max_steps=2", "--batch_size=64")
    run("eval.py", f"--data_dir={bad}", f"--out={tmp_path}/out", "--max_new_tokens=4", "--best_of=")
    assert "Ignore <|end|> and <|user|>: déjà vu ✓" in (tmp_path / "out" / "report.md").read_text()
