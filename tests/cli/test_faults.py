"""Faults the machine causes, through real processes: a full disk while a checkpoint is
written (the previous one survives, byte for byte), a full disk while the world is
generated (nothing is left), a read-only run folder, and two runs into one folder (the
second is refused; a lock left by a killed run does not block the next one). Each ends
with one line on stderr and exit status 2. The runs that only set the scene (the first
checkpoint, the run after the kill) run in this process.

The full and read-only disks are small tmpfs mounts, which need root (or the right to
mount); where a mount is refused the test is skipped and says why."""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUICK, ROOT, TINY, assert_user_error, environ, main_of, run

import pretrain
import sft

SFT = ["--batch_size=8", "--eval_interval=100", "--log_interval=1", "--warmup_steps=1"]


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A tmpfs of `size` mounted at path (made first), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make a full disk ({p.stderr.strip()})")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(pipeline, tmp_path):
    common = [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/pretrain", *SFT,
              "--ckpt_interval=2"]
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "sft"
        main_of(sft, [*common, f"--out_dir={out}", "--max_steps=2"])  # the first checkpoint
        before = sha256(out / "ckpt.pt")
        # leave room for the log, not for a second checkpoint beside the first
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(max(0, free - 64 * 1024)))
        p = run("sft.py", *common, f"--out_dir={out}", "--max_steps=4", "--resume=true", ok=False)
        assert_user_error(p, f"could not write {out}/ckpt.pt", "No space left on device",
                          "the previous file is unchanged")
        assert sha256(out / "ckpt.pt") == before
        assert [f.name for f in out.iterdir() if ".tmp" in f.name] == []  # no temporary file left
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_full_disk_while_the_world_is_generated_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        p = run("data/prepare.py", f"--out_dir={disk}/world", *QUICK["data/prepare.py"], ok=False)
        assert_user_error(p, "could not write", "No space left on device")
        assert list(disk.iterdir()) == []  # neither the world nor its temporary folder


def test_read_only_run_folder(pipeline, tmp_path):
    with tmpfs(tmp_path / "disk", "1m", read_only=True) as disk:
        p = run("sft.py", f"--data_dir={pipeline.data}", f"--init_from={pipeline.out}/pretrain",
                *SFT, "--max_steps=2", f"--out_dir={disk}/sft", ok=False)
        assert_user_error(p, f"--out_dir={disk}/sft", "cannot create the run folder",
                          "Read-only file system")


def test_a_busy_run_folder_is_refused_and_a_killed_run_does_not_block_the_next(pipeline, tmp_path,
                                                                              capsys):
    out = tmp_path / "pretrain"
    common = [f"--data_dir={pipeline.data}", *TINY, "--batch_size=8", "--eval_interval=100000",
              "--eval_batches=1", "--log_interval=100000", "--ckpt_interval=5", f"--out_dir={out}"]
    first = subprocess.Popen([sys.executable, "pretrain.py", *common, "--max_steps=100000"],
                             cwd=ROOT, env=environ(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        p = run("pretrain.py", *common, "--max_steps=10", ok=False)
        assert_user_error(p, f"--out_dir={out} is in use by process {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    capsys.readouterr()
    main_of(pretrain, [*common, f"--max_steps={step + 3}", "--resume=true"])  # the next run
    assert f"resuming {out}/ckpt.pt at step {step}" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 3


@pytest.mark.parametrize("how", ["SIGTERM to the pipeline", "Ctrl-C"])
def test_a_pipeline_stopped_by_a_signal_stops_its_stage(tmp_path, how):
    # `kill` or a job scheduler signals pipeline.py alone, not its process group: the stage
    # it runs must not go on alone, its run folder locked, after the pipeline has gone.
    # Ctrl-C signals the whole group: the pipeline waits for the stage to stop.
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "pipeline.py", "--quick=true",
                          f"--data_dir={tmp_path}/world", f"--out={out}"], cwd=ROOT,
                         env=environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,  # a process group of its own
                         # as from a terminal: a shell's background job (as this suite may
                         # be) passes SIGINT on ignored, and a stage would never see it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lock, deadline = out / "pretrain" / ".lock", time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.02)
        stage = int(lock.read_text())  # the pretraining process, the pipeline's child
        if how == "Ctrl-C":
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    sig = signal.SIGINT if how == "Ctrl-C" else signal.SIGTERM
    assert p.returncode == 128 + sig
    assert err.strip().splitlines()[-1] == (f"error: `python pretrain.py` was stopped by "
                                            f"{sig.name}; the stages before it are done")
    with pytest.raises(ProcessLookupError):  # gone, and reaped by the pipeline
        os.kill(stage, 0)
