"""Shared by the three layers of tests:

- tests/unit/: pure functions on hand-computed numbers, and flags and bad input run
  in-process (a stage's main() inside cli.user_errors());
- tests/cli/: what needs a process of its own: kills and resumes, DDP under torchrun,
  injected NaNs, --help, a few errors through a real exit;
- tests/e2e/: the pipeline in sequence on a tiny world, its report, overopt.py and a
  golden trajectory.

The session builds the tiny world once and trains the tiny pipeline once (every stage
of `pipeline.py --quick`, in this process: seconds). The unit layer runs first, the
process-heavy cli layer last.
"""

import contextlib
import dataclasses
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import pipeline as pipeline_script  # noqa: E402

QUICK = pipeline_script.QUICK  # the tiny sizes of every stage, as `pipeline.py --quick` runs them
MODEL_FLAGS = ("--n_layer", "--n_head", "--n_embd", "--block_size")
TINY = [f for f in QUICK["pretrain.py"] if f.split("=")[0] in MODEL_FLAGS]
LAYERS = {"unit": 0, "e2e": 1, "cli": 2}  # the order the layers run in

# A two-process run can fail for reasons of the machine, not of the code: gloo can abort
# a process at interpreter exit, after its work is done and its group destroyed, when the
# machine is loaded (a worker thread not yet joined; pytorch#28126); and the free port
# torchrun --standalone picks for the processes' store can be taken by another process
# before the store binds it (two runs start at once here; pytorch#126510). A run that
# dies either way is run once more; any other failure counts.
TORCHRUN_RETRY = ("terminate called without an active exception", "address already in use")


def pytest_collection_modifyitems(session, config, items):
    """The layers in order: unit, e2e, cli (fast first)."""
    items[:] = sorted(items, key=lambda item: LAYERS.get(Path(str(item.fspath)).parent.name, 3))


# ---- processes -----------------------------------------------------------------------------


def environ(env=None):
    """The environment of every stage started by a test: one thread per process (two
    cores hold two processes at once), plus `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def run(*args, ok=True, env=None, timeout=300):
    """`python *args` in the repository root, as a user runs it; returns the finished
    process (stdout, stderr as text). ok=True: a failure raises with both outputs."""
    cmd = [sys.executable, *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=environ(env))
    if (p.returncode != 0 and "torch.distributed.run" in args
            and any(m in p.stderr.lower() for m in TORCHRUN_RETRY)):
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=environ(env))
    if ok and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def selected(request):
    """The names of the selected tests of the requesting module (a module fixture that
    starts their runs ahead starts only the ones that will be checked)."""
    return {item.originalname for item in request.session.items if item.module is request.module}


def torchrun(*args, ok=True):
    """`torchrun --standalone --nproc_per_node=2 *args`: two CPU processes (gloo)."""
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, ok=ok)


# ---- one clear line, exit status 2, no traceback --------------------------------------------


def check_error_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_user_error(p, *needles):
    """A finished process: one clear line on stderr, exit status 2, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    return check_error_line(p.stderr, *needles)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def in_process():
    """Around a stage's main() in this process: one torch thread inside, as every stage
    process of the tests has (OMP_NUM_THREADS=1), so its figures do not depend on the
    machine's core count and equal those of a process; after, the thread count and the
    SIGTERM and SIGINT handlers (distributed.StopSignal sets them) as they were."""
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)


def stage_module(script):
    """The module of a script path: "data/prepare.py" -> data.prepare."""
    return importlib.import_module(script.removesuffix(".py").replace("/", "."))


def main_of(module, args):
    """Run a script's main() in this process on its flags, as `python script.py args`
    does (the same parse_config), without the user_errors wrapper: an error raises."""
    with in_process():
        return module.main(cli.parse_config(module.Config, [str(a) for a in args]))


def assert_user_error_in_process(capsys, module, *args, needles=()):
    """A script's main() in this process, inside cli.user_errors() as its __main__ block
    runs it: SystemExit with status 2, one line on stderr starting 'error: ' that holds
    every needle, no traceback. Returns the line."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        with cli.user_errors():
            main_of(module, args)
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    return check_error_line(err, *needles)


# ---- golden figures ------------------------------------------------------------------------

# figures that are small differences of large float32 sums, whose rounding is absolute: a
# sampled KL (Σ of log π − log π_ref over a response), the policy loss while the ratio is 1
# within 1e-3, DPO's reward margin, the explained variance of a value model that explains
# nothing yet
DIFFERENCES = {"objective/kl", "loss/policy", "rewards/margin", "value/explained_variance"}


def close(value, figure=""):
    """A golden figure, as computed when its test was written: equal up to the float
    differences between CPUs (rel 1e-4, abs 1e-6; abs 2e-5 for the DIFFERENCES)."""
    return pytest.approx(value, rel=1e-4, abs=2e-5 if figure in DIFFERENCES else 1e-6)


# ---- files -----------------------------------------------------------------------------------


def read_log(path):
    """A stage's log.jsonl: every step record, in order (the config lines left out)."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "step" in r]


def copy_world(src, dst):
    """A copy of a world's folder, to edit."""
    Path(dst).mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copyfile(f, Path(dst) / f.name)
    return Path(dst)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def process_state():
    """No test leaks into the next: whatever ran in this process (main_of restores them
    itself), the SIGTERM and SIGINT handlers and the number of torch threads are put
    back as they were."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    threads = torch.get_num_threads()
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny world of `pipeline.py --quick`, written once by data/prepare.py's main()
    in this process. Read-only: a test that edits a file edits a copy (copy_world)."""
    from data import prepare

    d = tmp_path_factory.mktemp("world") / "w"
    main_of(prepare, [f"--out_dir={d}", *QUICK["data/prepare.py"]])
    return d


@pytest.fixture(scope="session")
def stages(world, tmp_path_factory):
    """Untrained checkpoints of the tiny world's models in each stage's format
    (<dir>/pretrain, /sft, /reward): what the unit layer's bad-input tests load, so
    they need no training."""
    import checkpoint
    import pretrain
    import reward
    import sft
    from data.tokenizer import load_tokenizer
    from model import GPT, GPTConfig
    from reward_model import RewardMember

    enc = load_tokenizer(world / "tokenizer.tiktoken")
    out = tmp_path_factory.mktemp("stages")
    sizes = {f.split("=")[0][2:]: int(f.split("=")[1]) for f in TINY}
    mconf = GPTConfig(vocab_size=enc.n_vocab, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for stage, config in (("pretrain", pretrain.Config), ("sft", sft.Config)):
            model = GPT(mconf)
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
            checkpoint.save(out / stage / "ckpt.pt",
                            checkpoint.stage_checkpoint(stage, model, config(), 1, opt, enc))
        member = RewardMember.from_lm(GPT(mconf), likelihood=True)
    checkpoint.save(out / "reward" / "ckpt.pt", dict(
        stage="reward", model_config=dataclasses.asdict(mconf),
        config=dataclasses.asdict(reward.Config()), tokenizer=enc.name, step=1,
        members=[member.state_dict()], norms=[[1.0, 0.0]]))
    return out


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The tiny pipeline, trained once: every stage of `pipeline.py --quick` in order, with
    the flags pipeline.commands gives it, each stage's main() run in this process as its
    __main__ block runs it (tests/unit/test_pipeline_script.py checks pipeline.py's own
    loop; the cli layer runs the stages as processes).

    .data: the world, with data/label.py's rankings of the SFT model's answers; .out:
    pretrain, sft, reward, ppo, dpo (each ckpt.pt and log.jsonl), eval's report.md and
    eval.json; .stdout: what the stages printed, each after its command line. Read-only."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = cli.parse_config(pipeline_script.Config,
                           ["--quick=true", f"--data_dir={tmp / 'world'}", f"--out={tmp / 'out'}"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for script, flags in pipeline_script.commands(cfg):
            print(f"\n$ python {script} {' '.join(flags)}")
            main_of(stage_module(script), flags)
    return SimpleNamespace(data=tmp / "world", out=tmp / "out", stdout=printed.getvalue())
