"""Device, dtype, seed and DDP set-up, and how a global batch is shared out.

One set-up serves a CPU, one GPU and torchrun. Data order is drawn from (seed, step)
alone, so every rank and every resumed run agree on it without talking. SIGTERM and
Ctrl-C ask a training loop to save and stop (StopSignal); the ranks agree on when.
"""

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

import cli
from cli import UserError


def setup(seed, device="auto", compile=False):
    """Returns a namespace with the device, the autocast context (bf16 on CUDA, none on
    CPU), the DDP rank and world size, and `master` (rank 0: the process that prints
    and writes). compile: the stage's --compile, refused here, before anything is
    written, when the machine has no compiler for it (require_compiler)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"--device={device}: expected auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps: MPS (Apple's GPU) is not available on this machine")
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k])
                                        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else device
    if compile:
        require_compiler(device_type)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda"
                else contextlib.nullcontext())
    return SimpleNamespace(device=device, device_type=device_type, autocast=autocast, ddp=ddp,
                           rank=rank, local_rank=local_rank, world_size=world_size,
                           master=rank == 0)


def require_compiler(device_type):
    """torch.compile builds what it compiles with a compiler on this machine: C++ kernels
    on a CPU (torch's default: $CXX, else g++, clang++ on macOS), and on a GPU a small C
    launcher for each kernel (Triton's: $CC, else gcc or clang). Without one the first
    compiled call would fail deep inside torch; say so in one line instead."""
    if device_type == "cpu":
        names = [os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")]
    elif device_type == "cuda":
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
    else:
        return
    var = "CXX" if device_type == "cpu" else "CC"
    found = [n for n in names if shutil.which(n)]
    if not found:
        raise UserError(f"--compile=true on {device_type} needs a compiler, and none of "
                        f"{', '.join(names)} is on PATH: install one (or set {var}), "
                        f"or run without --compile")
    # torch takes the first that answers `--version`; one that does not would fail later
    for name in found:
        try:
            subprocess.run([name, "--version"], capture_output=True, timeout=60, check=True)
            return
        except (OSError, subprocess.SubprocessError):
            pass
    raise UserError(f"--compile=true on {device_type}: the compiler {' or '.join(found)} is on "
                    f"PATH but `{found[0]} --version` fails: repair it (or set {var}), "
                    f"or run without --compile")


def teardown(run):
    if run.ddp:
        dist.barrier()  # rank 0 may still be writing; a rank that tears down alone aborts gloo
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def on_rank0(run, write):
    """write() on rank 0 alone (a file written once for every process). A UserError there
    (a full disk) is raised on every rank, so the others stop with the same line instead
    of waiting in their next collective for a process that has gone. Returns write()'s
    result on rank 0, None elsewhere."""
    error = result = None
    if run.master:
        try:
            result = write()
        except UserError as e:
            error = e
    if getattr(run, "ddp", False):
        said = [None if error is None else str(error)]
        dist.broadcast_object_list(said, src=0)
        error = error or (said[0] and UserError(said[0]))
    if error:
        raise error
    return result


def all_reduce_mean(x, run):
    """Average a float, or each float of a list in one collective, over ranks (for logged
    figures; gradients are DDP's business)."""
    if not run.ddp:
        return x
    t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    out = (t / run.world_size).tolist()
    return out if isinstance(x, list) else out[0]


def wrap(model, run, compile=False):
    """torch.compile and DDP around the raw model; checkpoints keep saving the raw one,
    so state-dict keys never carry wrapper prefixes."""
    if compile:
        model = torch.compile(model)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    return model


def run_only(model, compile=False):
    """torch.compile around a model that is only ever run, never trained: PPO's and
    GRPO's reference, the value model's pass in PPO's rollout (None, when there is none,
    passes through). No DDP wrapper (there are no gradients to reduce); the module itself
    is unchanged, so it is saved and loaded as it is."""
    return torch.compile(model) if compile and model is not None else model


def grad_sync(model, run, last):
    """Context for one micro-step's forward and backward: under DDP, gradients are
    all-reduced on the last micro-step of an optimizer step only."""
    return model.no_sync() if run.ddp and not last else contextlib.nullcontext()


# --- a global batch, shared out over ranks and micro-steps ------------------------------


def micro_batch_size(batch_size, grad_accum, run):
    """Sequences per forward pass on one rank; the global batch must split evenly."""
    if batch_size <= 0 or grad_accum <= 0 or batch_size % (run.world_size * grad_accum):
        raise UserError(f"--batch_size={batch_size} does not split into {run.world_size} "
                        f"process(es) x {grad_accum} micro-steps (--grad_accum)")
    return batch_size // (run.world_size * grad_accum)


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def global_batch(n, step, batch_size, seed):
    """Indices of a step's global batch of a data set of n items, in a fresh random order
    every epoch, drawn from (seed, epoch) alone: every rank and every resume agree."""
    return [epoch_order(seed, k // n, n)[k % n]
            for k in range(step * batch_size, (step + 1) * batch_size)]


def iteration_seed(seed, rank, it):
    """The seed of one (process, iteration) of an RL stage's sampling and shuffling: a
    resumed run repeats exactly what the uninterrupted one would have done."""
    return (seed * 1_000_003 + rank) * 1_000_003 + it


def rank_chunks(items, run, grad_accum):
    """This rank's slice of a global batch, split into its grad_accum micro-batches."""
    per_rank = len(items) // run.world_size
    mine = items[run.rank * per_rank:(run.rank + 1) * per_rank]
    size = per_rank // grad_accum
    return [mine[j:j + size] for j in range(0, per_rank, size)]


# --- stopping on a signal ---------------------------------------------------------------


class StopSignal:
    """SIGTERM (pre-emption, `kill`) and SIGINT (Ctrl-C) ask the training loop to stop
    instead of killing it: `requested(run)` becomes true after the step under way, the
    loop saves a checkpoint and calls `exit`; `checkpoint` does both for a loop. Under
    DDP the ranks agree (one all-reduce per step), so they stop at the same step. A
    second signal kills at once. `release()` after the loop gives the signals back to
    the handlers before it, for the work after the loop (or a driver's: cai.py goes on
    after sft.py's loop), where no loop would read the request."""

    def __init__(self, resume_hint=None):
        self.signum = None
        # how the user continues a stopped run (a driver that runs a stage's loop in its
        # own process, as cai.py runs sft.py's, names its own way)
        self.resume_hint = resume_hint or "--resume=true continues"
        cli.SIGNALLED.clear()  # set by _handle until the loop is over (release, exit)
        self.before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in self.before:
            signal.signal(sig, self._handle)

    def release(self):
        cli.SIGNALLED.clear()
        for sig, handler in self.before.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: the default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        cli.SIGNALLED.append(signum)

    def requested(self, run):
        flag = float(self.signum is not None)
        if run.ddp:
            t = torch.tensor([flag], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0

    def checkpoint(self, run, step, due, ckpt_path, save):
        """Call on every rank after each step: rank 0 runs save() when the checkpoint is
        due or a stop was asked for (on_rank0); then, if asked, every rank exits."""
        stopping = self.requested(run)
        if due or stopping:
            on_rank0(run, save)
        if stopping:
            self.exit(step, ckpt_path)

    def exit(self, step, ckpt_path):
        cli.SIGNALLED.clear()
        name = signal.Signals(self.signum).name if self.signum else "a signal on another process"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped by {name} after step {step}: checkpoint {ckpt_path} saved; "
                  f"{self.resume_hint}", file=sys.stderr)
        sys.exit(128 + (self.signum or signal.SIGTERM))


# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices get no MFU figure
# rather than a wrong one.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    print0(f"warning: no peak FLOP/s known for {name!r}; MFU not reported "
           f"(add it to distributed.PEAK_FLOPS)")
    return None
