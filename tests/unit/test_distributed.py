"""distributed.py without a process group: how a global batch is shared out over ranks
and micro-steps, and the data order every rank and every resume agree on."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

import cli
import distributed
from cli import UserError


def rank(r, world_size):
    return SimpleNamespace(rank=r, world_size=world_size, ddp=world_size > 1)


def test_micro_batch_size():
    assert distributed.micro_batch_size(16, 2, rank(0, 2)) == 4
    assert distributed.micro_batch_size(16, 1, rank(0, 1)) == 16
    with pytest.raises(UserError, match=r"--batch_size=7 does not split into 1 process\(es\) x 2 "
                                        r"micro-steps"):
        distributed.micro_batch_size(7, 2, rank(0, 1))
    with pytest.raises(UserError, match="--batch_size=8 does not split into 3 process"):
        distributed.micro_batch_size(8, 1, rank(0, 3))


def test_global_batch_is_a_fresh_permutation_every_epoch():
    n, bs = 10, 4
    order = [i for step in range(5) for i in distributed.global_batch(n, step, bs, seed=3)]
    epochs = [order[:10], order[10:20]]  # 5 steps of 4: two epochs
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    assert distributed.global_batch(n, 2, bs, seed=3) == order[8:12]  # from (seed, step) alone
    assert distributed.global_batch(n, 2, bs, seed=4) != order[8:12]


def test_rank_chunks_split_the_global_batch():
    items = list(range(8))
    assert distributed.rank_chunks(items, rank(0, 1), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert distributed.rank_chunks(items, rank(0, 2), 2) == [[0, 1], [2, 3]]
    assert distributed.rank_chunks(items, rank(1, 2), 2) == [[4, 5], [6, 7]]
    assert distributed.rank_chunks(items, rank(1, 2), 1) == [[4, 5, 6, 7]]


def test_all_reduce_mean_and_grad_sync_without_ddp():
    run = rank(0, 1)
    assert distributed.all_reduce_mean(2.5, run) == 2.5
    assert distributed.all_reduce_mean([2.5, 1.0], run) == [2.5, 1.0]
    with distributed.grad_sync(object(), run, last=False):  # a plain context: no no_sync
        pass


def test_run_only_compiles_a_frozen_model_without_a_ddp_wrapper():
    model = torch.nn.Linear(3, 2).requires_grad_(False)
    assert distributed.run_only(model) is model  # no --compile: the model as it is
    assert distributed.run_only(None, compile=True) is None  # no such model (PPO's shared head)
    compiled = distributed.run_only(model, compile=True)
    # the module itself is what torch.compile runs (nothing compiles until a call), and
    # its state dict keeps its own keys
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled._orig_mod is model and list(model.state_dict()) == ["weight", "bias"]


def test_stop_signal_takes_the_signals_and_gives_them_back():
    """While a loop runs, SIGTERM and SIGINT only ask it to stop; after release() they
    reach the handlers from before (Ctrl-C raises KeyboardInterrupt again)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = distributed.StopSignal()
        assert all(signal.getsignal(s) == stop._handle for s in before)
        stop.release()
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_an_error_after_a_stop_signal_is_part_of_stopping(capsys):
    """Ctrl-C reaches the whole process group: a C++ compiler that inductor started dies
    with it, and the compile raises. After the signal, such an error is one line and the
    signal's exit status, and the run's undo list runs, as for a UserError; before any
    signal (or after release()) an error is a bug and propagates."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    undone = []
    try:
        stop = distributed.StopSignal()
        with pytest.raises(RuntimeError, match="a bug"):
            with cli.user_errors():
                raise RuntimeError("a bug")
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only asks the loop to stop
        with pytest.raises(SystemExit) as e:
            with cli.user_errors():
                cli.ON_USER_ERROR.append(lambda: undone.append(1))
                raise RuntimeError("C++ compile failed: the compiler was killed")
        assert e.value.code == 128 + signal.SIGTERM and undone == [1]
        err = capsys.readouterr().err
        assert err == ("stopped by SIGTERM before a checkpoint could be saved (RuntimeError as it "
                       "stopped); the run's last checkpoint, if any, stands\n")
        stop.release()
        with pytest.raises(RuntimeError, match="a bug"):
            with cli.user_errors():
                raise RuntimeError("a bug")
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_setup_on_cpu():
    run = distributed.setup(0, "cpu")
    assert (run.device, run.device_type, run.ddp, run.rank, run.world_size, run.master) == (
        "cpu", "cpu", False, 0, 1, True)
    with pytest.raises(UserError, match="--device=tpu: expected auto, cpu, cuda or mps"):
        distributed.setup(0, "tpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="--device=mps: MPS .* is not available"):
            distributed.setup(0, "mps")
    assert distributed.peak_flops("cpu") is None


def test_compile_without_a_compiler_is_refused_at_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"--compile=true on cpu needs a compiler, and none of "
                                        r"no-such-compiler is on PATH"):
        distributed.setup(0, "cpu", compile=True)
    assert distributed.setup(0, "cpu").device == "cpu"  # without --compile: no compiler asked
    compiler = tmp_path / "my-c++"  # any executable that $CXX names will do
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert distributed.setup(0, "cpu", compile=True).device == "cpu"
    compiler.write_text("#!/bin/sh\nexit 1\n")  # there, but broken: torch would fail later
    with pytest.raises(UserError, match=r"--compile=true on cpu: the compiler .*my-c\+\+ is on "
                                        r"PATH but `.*my-c\+\+ --version` fails"):
        distributed.setup(0, "cpu", compile=True)


def test_on_rank0_runs_the_write_on_rank_0_only_and_passes_its_error_on():
    calls = []
    assert distributed.on_rank0(SimpleNamespace(master=True, ddp=False),
                                lambda: calls.append(0) or "written") == "written"
    assert distributed.on_rank0(SimpleNamespace(master=False, ddp=False),
                                lambda: calls.append(1)) is None
    assert calls == [0]

    def full_disk():
        raise UserError("could not write out/ckpt.pt: No space left on device")
    with pytest.raises(UserError, match="No space left"):
        distributed.on_rank0(SimpleNamespace(master=True, ddp=False), full_disk)
