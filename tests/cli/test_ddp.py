"""Two CPU processes under torchrun (gloo) against one: the same loss curve, to 1e-4,
with the same global batch. The one-process curves are the pipeline's own runs where
the flags are the same (pretrain, SFT, the reward model), or a run in this process.
The module's torchrun runs start together, two at a time, when its first test starts."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import QUICK, ROOT, close, main_of, read_log, selected, torchrun

import dpo
import sft

# DPO at a learning rate that moves the curve
DPO = ["--batch_size=4", "--max_steps=3", "--eval_interval=100", "--log_interval=1",
       "--warmup_steps=1", "--learning_rate=1e-4", "--kl_prompts=4", "--max_new_tokens=8"]
PPO = ["--batch_size=8", "--minibatch_size=4", "--ppo_epochs=2", "--max_new_tokens=8",
       "--sample_interval=2", "--iterations=2"]


def runs(p):
    """test: (script, flags) of its two-process run, on the pipeline p."""
    return {
        "test_ddp_two_processes_match_one": (
            "pretrain.py", [f"--data_dir={p.data}", *QUICK["pretrain.py"]]),
        "test_sft_same_curve_for_any_split_of_the_batch": (
            "sft.py", [f"--data_dir={p.data}", f"--init_from={p.out}/pretrain", *QUICK["sft.py"]]),
        "test_reward_two_processes_match_one": (
            "reward.py", [*QUICK["reward.py"], f"--data_dir={p.data}", f"--init_from={p.out}/sft"]),
        "test_dpo_two_processes_match_one": (
            "dpo.py", [f"--data_dir={p.data}", f"--init_from={p.out}/sft", *DPO]),
        "test_ppo_two_processes": (
            "ppo.py", [*PPO, f"--data_dir={p.data}", f"--init_from={p.out}/sft",
                       f"--reward_from={p.out}/reward"]),
    }


@pytest.fixture(scope="module")
def two(request, pipeline, tmp_path_factory):
    """{test: future of the output folder of its run under torchrun}."""
    tests = selected(request)
    if "test_sft_validation_loss_is_the_mean_over_every_example" in tests:
        tests.add("test_sft_same_curve_for_any_split_of_the_batch")

    def two_processes(script, args):
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        torchrun(script, *args, f"--out_dir={out}")
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {test: pool.submit(two_processes, script, args)
               for test, (script, args) in runs(pipeline).items() if test in tests}


def assert_same_curve(one, two, keys=("loss",)):
    """The same steps logged, each figure in keys equal to 1e-4 where logged."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for key in keys:
        a, b = [r.get(key) for r in one], [r.get(key) for r in two]
        assert [x is None for x in a] == [x is None for x in b], key
        pairs = [(x, y) for x, y in zip(a, b) if x is not None]
        assert pairs and max(abs(x - y) for x, y in pairs) < 1e-4, (key, a, b)


def test_ddp_two_processes_match_one(pipeline, two):
    """Pretraining: the pipeline's run, and the same run in two processes; the
    validation losses too (each rank scores its share of the same windows)."""
    one = read_log(pipeline.out / "pretrain" / "log.jsonl")
    log = read_log(two["test_ddp_two_processes_match_one"].result() / "log.jsonl")
    assert [r["step"] for r in one] == [0, 4, 5, 8, 11]
    assert_same_curve(one, log, keys=("loss", "val_loss"))
    assert sum("val_loss" in r for r in log) == 2


def test_sft_same_curve_for_any_split_of_the_batch(pipeline, two, tmp_path):
    """SFT batches are ragged; the loss is the mean over the global batch's answer tokens
    however it is split: 1 process (the pipeline's run), 2 micro-steps (here), or 2
    processes under torchrun."""
    one = read_log(pipeline.out / "sft" / "log.jsonl")
    main_of(sft, [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/pretrain",
                  *QUICK["sft.py"], f"--out_dir={tmp_path}/accum", "--grad_accum=2"])
    accum = read_log(tmp_path / "accum" / "log.jsonl")
    log = read_log(two["test_sft_same_curve_for_any_split_of_the_batch"].result() / "log.jsonl")
    assert len(one) == 6
    assert_same_curve(one, accum, keys=("loss", "val_loss"))
    assert_same_curve(one, log, keys=("loss",))


def test_sft_validation_loss_is_the_mean_over_every_example(pipeline, two):
    one = read_log(pipeline.out / "sft" / "log.jsonl")
    log = read_log(two["test_sft_same_curve_for_any_split_of_the_batch"].result() / "log.jsonl")
    assert_same_curve(one, log, keys=("val_loss",))


def test_reward_two_processes_match_one(pipeline, two):
    one = read_log(pipeline.out / "reward" / "log.jsonl")
    log = read_log(two["test_reward_two_processes_match_one"].result() / "log.jsonl")
    assert len(one) == 4
    assert_same_curve(one, log, keys=("loss", "val_accuracy"))


def test_dpo_two_processes_match_one(pipeline, two, tmp_path):
    """(Not kto: its reference point z0 is a statistic of each micro-batch.)"""
    main_of(dpo, [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/sft", *DPO,
                  f"--out_dir={tmp_path}/one"])
    one = read_log(tmp_path / "one" / "log.jsonl")
    log = read_log(two["test_dpo_two_processes_match_one"].result() / "log.jsonl")
    assert len(one) == 3
    # the diagnostics too: each rank's, averaged
    assert_same_curve(one, log, keys=("loss", "val/loss", "rewards/margin", "rewards/accuracy"))


def test_ppo_two_processes(two):
    """Each rank samples its own rollouts (its own prompts and seed); the run completes
    and logs the figures of both (golden: the first iterations' losses and KL)."""
    out = two["test_ppo_two_processes"].result()
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1]
    got = [(r["loss/policy"], r["loss/value"], r["objective/kl"]) for r in log]
    assert got == [(close(p, "loss/policy"), close(v), close(kl, "objective/kl"))
                   for p, v, kl in PPO_TWO]
    assert log[0]["objective/kl"] == pytest.approx(0, abs=1e-4)  # both ranks sample from SFT
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


# (loss/policy, loss/value, objective/kl) of the two iterations, means over both ranks
PPO_TWO = [(-0.0025926977396011353, 3.229874700307846, 0.0),
           (-0.0009666047990322113, 3.2104422748088837, -0.00048285722732543945)]


def test_a_folder_refused_to_rank_0_stops_the_other_process_too(pipeline, tmp_path):
    """Rank 0 alone checks --out_dir; the other process stops on its refusal instead of
    waiting in DDP's set-up for a peer that has gone (a gloo traceback)."""
    out = tmp_path / "pretrain"
    (out).mkdir()
    (out / "ckpt.pt").write_bytes((pipeline.out / "pretrain" / "ckpt.pt").read_bytes())
    p = torchrun("sft.py", f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/pretrain",
                 *QUICK["sft.py"], f"--out_dir={out}", ok=False)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert lines and all("holds a run of stage 'pretrain', not 'sft'" in x for x in lines), \
        p.stderr
    assert "[rank" not in p.stderr, p.stderr  # no process's traceback (torchrun's own aside)


def test_a_checkpoint_rank_0_cannot_write_stops_every_process(pipeline, tmp_path):
    """Rank 0 alone writes the checkpoint; when it cannot (here ckpt.pt is a folder), the
    other process stops with the same line instead of dying in its next collective."""
    out = tmp_path / "sft"
    (out / "ckpt.pt").mkdir(parents=True)
    p = torchrun("sft.py", f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/pretrain",
                 "--batch_size=4", "--max_steps=4", "--ckpt_interval=2", "--eval_interval=100",
                 f"--out_dir={out}", ok=False)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 2 and all(f"could not write {out}/ckpt.pt" in x for x in lines), \
        p.stderr
    assert "[rank" not in p.stderr, p.stderr


def test_a_process_whose_peer_has_gone_says_so_in_one_line(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch, torch.distributed as dist\n"
        "from cli import UserError, user_errors\n"
        "with user_errors():\n"
        "    dist.init_process_group('gloo')\n"
        "    if dist.get_rank() == 0:\n"
        "        raise UserError('a mistake only rank 0 saw')\n"
        "    dist.all_reduce(torch.ones(1))\n")
    p = torchrun(script, ok=False)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert sorted(errors) == ["error: a mistake only rank 0 saw",
                              "error: another process of this run stopped first (its own line "
                              "says why)"], p.stderr
    assert "[rank" not in p.stderr, p.stderr
