"""checkpoint.py: atomic files, checkpoints loaded without running pickled code, and a
stage's model rebuilt from its checkpoint, refusing one of another stage or tokenizer."""

import errno
import os
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import sft
from cli import UserError, user_errors
from data.tokenizer import load_tokenizer
from model import GPT, GPTConfig


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    checkpoint.atomic_write(p, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(p, boom)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]

    def full(f):  # what the file system says when the disk is full
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torn(f):  # what torch.save raises on a full disk: its own error, during the OSError's
        try:
            full(f)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10 vs 8")

    for write in (full, torn):
        with pytest.raises(UserError, match=f"could not write {p}: No space left on device; the "
                                            f"previous file is unchanged"):
            checkpoint.atomic_write(p, write)
        assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    checkpoint.atomic_write(tmp_path / "new" / "g.bin", lambda f: f.write(b"new"))  # makes dirs
    assert (tmp_path / "new" / "g.bin").read_bytes() == b"new"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_roundtrip_and_pickle_refused(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"w": torch.ones(2), "step": 3, "name": "x"})
    assert checkpoint.load(good)["step"] == 3
    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(UserError, match=r"evil.pt: not a loadable checkpoint \(it holds Python "
                                        r"objects beyond tensors"):
        checkpoint.load(evil)
    trunc = tmp_path / "trunc.pt"
    for cut in (50, len(good.read_bytes()) - 30):  # torch's errors differ with where it is cut
        trunc.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(UserError, match=r"trunc.pt: not a loadable checkpoint \(damaged, cut "
                                            r"short, or not written by torch.save; torch says: "):
            checkpoint.load(trunc)
    trunc.write_bytes(b"a text file, not a checkpoint\n")
    with pytest.raises(UserError, match=r"trunc.pt: not a loadable checkpoint \(damaged"):
        checkpoint.load(trunc)
    with pytest.raises(UserError, match=r"missing.pt not found: run `python sft.py` first"):
        checkpoint.load(tmp_path / "missing.pt", made_by="python sft.py")
    with pytest.raises(UserError, match=r"missing.pt not found$"):
        checkpoint.load(tmp_path / "missing.pt")


def test_require_names_the_command(tmp_path):
    assert checkpoint.require(tmp_path, "x") == tmp_path
    with pytest.raises(UserError, match=r"nothing not found: run `python data/prepare.py` first"):
        checkpoint.require(tmp_path / "nothing", "python data/prepare.py")


def test_stage_checkpoint_and_load_model(world, stages, tmp_path):
    """What a stage saves rebuilds its model (eval mode, same weights); a checkpoint of
    the reward model, of another tokenizer, or without a model is refused."""
    enc = load_tokenizer(world / "tokenizer.tiktoken")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=enc.n_vocab, n_layer=1, n_head=1, n_embd=8))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    ck = checkpoint.stage_checkpoint("sft", model, sft.Config(), 5, opt, enc, val_loss=1.5)
    assert ck["stage"] == "sft" and ck["step"] == 5 and ck["tokenizer"] == enc.name
    assert ck["val_loss"] == 1.5 and ck["config"]["max_steps"] == sft.Config().max_steps
    assert ck["model_config"]["n_embd"] == 8 and torch.equal(ck["rng"], torch.get_rng_state())
    path = tmp_path / "sft" / "ckpt.pt"
    checkpoint.save(path, ck)
    loaded, ck2 = checkpoint.load_model(path, "python sft.py", enc)
    assert not loaded.training and ck2["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))
    with pytest.raises(UserError, match="reward-model checkpoint .* not a language model: "
                                        "expected the output of `python sft.py`"):
        checkpoint.load_model(stages / "reward" / "ckpt.pt", "python sft.py", enc)
    checkpoint.save(tmp_path / "other.pt", {**ck, "tokenizer": "world-000000000000"})
    with pytest.raises(UserError, match="trained with tokenizer 'world-000000000000'"):
        checkpoint.load_model(tmp_path / "other.pt", "python sft.py", enc)
    checkpoint.save(tmp_path / "empty.pt", {"stage": "sft"})
    with pytest.raises(UserError, match="not a minRLHF checkpoint"):
        checkpoint.load_model(tmp_path / "empty.pt", "python sft.py", enc)
    small = {**ck, "model_config": {**ck["model_config"], "n_embd": 16, "n_head": 2}}
    checkpoint.save(tmp_path / "small.pt", small)
    with pytest.raises(UserError, match="weights do not fit a GPT"):
        checkpoint.load_model(tmp_path / "small.pt", "python sft.py", enc)


def test_resume_restores_model_optimizer_and_generator(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))[1].backward()
    opt.step()
    state = torch.get_rng_state()
    checkpoint.save(tmp_path / "ckpt.pt", dict(stage="sft", model=model.state_dict(),
                                               optimizer=opt.state_dict(), step=7, rng=state))
    torch.manual_seed(1)
    fresh = GPT(model.config)
    fresh_opt = fresh.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    step, _ = checkpoint.resume(tmp_path / "ckpt.pt", "sft", fresh, fresh_opt)
    assert step == 7 and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert f"resuming {tmp_path / 'ckpt.pt'} at step 7" in capsys.readouterr().out


def test_the_gpu_generator_is_kept_and_restored_when_a_run_has_one(monkeypatch):
    """A run on a GPU draws its dropout from the GPU's generator: the checkpoint keeps its
    state beside the CPU's and a resumed run on a GPU gets it back (a GPU faked here);
    a run that never used a GPU keeps none, and one resumed without a GPU skips it."""
    cuda = {"available": True, "initialized": False, "state": torch.tensor([1, 2, 3],
                                                                            dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda["available"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda["initialized"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: cuda.update(state=s.clone()))
    assert set(checkpoint.rng_states()) == {"rng"}  # CUDA present, never used
    cuda["initialized"] = True
    saved = checkpoint.rng_states()
    assert torch.equal(saved["rng"], torch.get_rng_state())
    assert torch.equal(saved["cuda_rng"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    cuda["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the generator moves on
    torch.rand(3)
    checkpoint.restore_rng(saved)
    assert torch.equal(cuda["state"], saved["cuda_rng"])
    assert torch.equal(torch.get_rng_state(), saved["rng"])
    cuda.update(available=False, state=torch.tensor([7], dtype=torch.uint8))
    checkpoint.restore_rng(saved)  # resumed on a CPU: the GPU's state is not asked for
    assert torch.equal(cuda["state"], torch.tensor([7], dtype=torch.uint8))


def tiny_run(n_layer=1):
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=n_layer, n_head=1, n_embd=8))
    return model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")


@pytest.mark.parametrize("stage", ["ppo", "reward", None])
def test_resume_refuses_another_stages_checkpoint(tmp_path, stage):
    model, opt = tiny_run()
    ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=3)
    checkpoint.save(tmp_path / "ckpt.pt", ckpt if stage is None else {**ckpt, "stage": stage})
    fresh, fresh_opt = tiny_run()
    with pytest.raises(UserError, match=r"ckpt.pt holds a run of stage .*, not 'sft'"):
        checkpoint.resume(tmp_path / "ckpt.pt", "sft", fresh, fresh_opt)


def test_resume_refuses_a_model_of_other_shapes_in_one_line(tmp_path):
    model, opt = tiny_run(n_layer=1)
    checkpoint.save(tmp_path / "ckpt.pt", dict(stage="pretrain", model=model.state_dict(),
                                               optimizer=opt.state_dict(), step=3))
    bigger, bigger_opt = tiny_run(n_layer=2)
    with pytest.raises(UserError, match=r"does not fit this run's model or optimizer \(.*\): "
                                        r"resume with the flags it was started with") as e:
        checkpoint.resume(tmp_path / "ckpt.pt", "pretrain", bigger, bigger_opt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["new", "existed", "checkpointed"])
def test_a_run_stopped_by_a_mistake_removes_only_a_folder_it_made_without_a_checkpoint(
        tmp_path, case, capsys):
    out = tmp_path / "run"
    if case == "existed":
        out.mkdir()
    with pytest.raises(SystemExit) as e, user_errors():
        lock = checkpoint.RunLock(str(out), SimpleNamespace(master=True), ("sft",))
        (out / "log.jsonl").write_text("{}\n")
        if case == "checkpointed":
            (out / "ckpt.pt").write_bytes(b"x")
        raise UserError("--flag=x: a mistake")
    assert e.value.code == 2 and "error: --flag=x: a mistake" in capsys.readouterr().err
    assert out.exists() == (case != "new")
    assert lock.file is None or case != "new"


def test_a_released_run_folder_stays_after_a_later_mistake(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit), user_errors():
        checkpoint.RunLock(str(out), SimpleNamespace(master=True), ("sft",)).release()
        raise UserError("a mistake after the run ended")
    assert (out / ".lock").exists()


def test_a_run_folder_of_the_same_stage_or_a_dpo_loss_may_be_written_over(tmp_path):
    run = SimpleNamespace(master=True)
    for written, stages in (("sft", ("sft",)), ("ipo", ("dpo", "cdpo", "ipo")), (None, ("ppo",))):
        out = tmp_path / f"run_{written}"
        out.mkdir()
        (out / "ckpt.pt").write_bytes(b"not a checkpoint")  # unreadable: nothing to keep
        if written:
            checkpoint.save(out / "ckpt.pt", {"stage": written, "model": {}})
        checkpoint.RunLock(str(out), run, stages).release()
    with pytest.raises(UserError, match=r"--out_dir=.*run_sft holds a run of stage 'sft', not "
                                        r"'ppo': choose another --out_dir"):
        checkpoint.RunLock(str(tmp_path / "run_sft"), run, ("ppo",))
    assert checkpoint.stage_of(tmp_path / "run_sft" / "ckpt.pt") == "sft"
    assert checkpoint.stage_of(tmp_path / "nothing" / "ckpt.pt") is None


def test_resume_refuses_a_changed_defining_flag(tmp_path):
    """checkpoint.resume(same=...): a flag written with another value is refused in one line
    naming it, before anything is restored; a flag the checkpoint does not record (written
    before the flag existed) is not judged."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, dict(stage="grpo", model=model.state_dict(), step=7,
                               optimizer=opt.state_dict(), config=dict(advantage="rloo")))
    other = torch.nn.Linear(2, 2)
    before = other.weight.detach().clone()
    with pytest.raises(UserError, match=r"ckpt.pt: written with --advantage=rloo, not grpo; "
                                        r"resume with --advantage=rloo or start a new --out_dir"):
        checkpoint.resume(path, "grpo", other, torch.optim.AdamW(other.parameters()),
                          same=dict(advantage="grpo"))
    assert torch.equal(other.weight, before)
    step, _ = checkpoint.resume(path, "grpo", other, torch.optim.AdamW(other.parameters()),
                                same=dict(advantage="rloo", loss_agg="constant"))
    assert step == 7 and torch.equal(other.weight, model.weight)
