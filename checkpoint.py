"""Files a run writes and reads back: atomic writes, checkpoints, and a stage's model.

A checkpoint is a plain dict loaded with weights_only=True (no pickled code runs). It
holds what rebuilds the model without the code's defaults (the model config), what
resumes the run (optimizer, step, the global random generators of the CPU and, when a
run uses one, the GPU, the counts of updates skipped for a non-finite gradient), and
what refuses a mismatch (the stage, the tokenizer's name).
"""

import dataclasses
import os
import pickle
import shutil

import torch

import cli
from cli import UserError
import distributed
from distributed import print0
from model import GPT, GPTConfig


def atomic_write(path, write):
    """Write through a temporary file in the same folder, fsync, rename: a reader never
    sees a half-written file, and a failure (a full disk, a crash) leaves the old one. A
    failure to write is a UserError naming the file and the cause."""
    path = str(path)
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        cause = os_error(e)
        if cause is None and "writ" not in str(e).lower():
            raise  # a fault of the writer's own, not of the file system
        # (torch.save reports a failed write as a RuntimeError, "... failed writing file ..." or
        # "unexpected pos ...", raised while handling the OSError of the write itself)
        kept = "; the previous file is unchanged" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {write_failure(cause or e, folder)}"
                        f"{kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def os_error(e):
    """The OSError behind an exception (itself, or one it was raised from or during)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def reason(e):
    """An exception's first line (torch's run long), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_failure(e, folder):
    """Why a write failed, in a few words."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
    except OSError:
        pass
    return reason(e)[:160]


# made_by for a language model that any training stage may have written
ANY_STAGE = "a training stage (python sft.py, pretrain.py, ppo.py, grpo.py or dpo.py)"


def command(made_by):
    """A command as errors name it: `python x.py` in backquotes, a description as it is."""
    return f"`{made_by}`" if made_by.startswith("python ") else made_by


def require(path, made_by):
    """The path, if it exists; otherwise a UserError naming the command that makes it."""
    if not os.path.exists(path):
        raise missing(path, made_by)
    return path


def missing(path, made_by):
    """The error for a file that is not there: the command that makes it, or, when the
    folder named is itself a file (--init_from=out/sft/ckpt.pt), the folder to name."""
    folder = os.path.dirname(path)
    if os.path.isfile(folder):
        return UserError(f"{folder} is a file: name the folder that holds it "
                         f"({os.path.dirname(folder) or '.'}), not the file")
    return UserError(f"{path} not found" + (f": run {command(made_by)} first" if made_by else ""))


def save(path, payload):
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path, made_by=None):
    """Load a checkpoint. `made_by` is the command that writes it, named in the error
    when the file is missing."""
    path = str(path)
    if not os.path.exists(path):
        raise missing(path, made_by)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only refuses: pickled code, not data
        raise UserError(f"{path}: not a loadable checkpoint (it holds Python objects beyond "
                        f"tensors and plain values, which are not loaded: code could run)"
                        ) from None
    except Exception as e:  # torch raises many types for a damaged or foreign file
        first = reason(e)
        if len(first) > 100:  # torch's reasons run long: cut at a word, and say so
            first = first[:100].rsplit(" ", 1)[0] + " ..."
        raise UserError(f"{path}: not a loadable checkpoint (damaged, cut short, or not written "
                        f"by torch.save; torch says: {first})") from None


def stage_of(path):
    """The stage that wrote the checkpoint at path, or None when there is none or it
    cannot be read (mapped, not read whole: a GPT-2 checkpoint is large)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, or not a checkpoint: nothing to keep from replacement
        return None
    return ckpt.get("stage") if isinstance(ckpt, dict) else None


def stage_checkpoint(stage, model, cfg, step, optimizer, enc, guard=None, **extra):
    """What every stage's checkpoint holds (see the module docstring), plus `extra`;
    guard: the run's optim.NonFiniteGuard, whose counts of skipped updates it keeps."""
    return dict(stage=stage, model=model.state_dict(),
                model_config=dataclasses.asdict(model.config), config=dataclasses.asdict(cfg),
                step=step, optimizer=optimizer.state_dict(), tokenizer=enc.name,
                **rng_states(), **({} if guard is None else {"guard": guard.state_dict()}),
                **extra)


def rng_states():
    """The global generators a resumed run continues (dropout draws from them): the CPU's,
    and the current GPU's when this process has used one. Every rank seeds them alike
    (distributed.setup), so rank 0's stand for every rank's."""
    states = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state()
    return states


def restore_rng(ckpt):
    """rng_states() of a checkpoint back into this process's generators; a GPU's state is
    restored when this run has a GPU (a run resumed on a CPU draws its dropout there)."""
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"])
    if "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])


def own_run(path, stage):
    """The checkpoint at path, to resume a run of `stage` (the name stage_checkpoint gave
    it); refused in one line when there is none or it is another stage's."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: nothing to resume; start without --resume=true")
    ckpt = load(path)
    written = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if written != stage:
        raise UserError(f"{path} holds a run of stage {written!r}, not {stage!r}: point "
                        f"--out_dir at a {stage!r} run to resume, or start without --resume=true")
    return ckpt


def restore(path, model, optimizer, ckpt, guard=None):
    """The weights and optimizer state of ckpt (read from path) into model and optimizer,
    and its counts of skipped updates into guard (an optim.NonFiniteGuard, if given);
    ones of other shapes (other flags) refused in one line."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this run's model or optimizer ({reason(e)[:120]}): "
                        f"resume with the flags it was started with") from None
    if guard is not None and "guard" in ckpt:  # plain counts, written by stage_checkpoint
        guard.load_state_dict(ckpt["guard"])


def resume(path, stage, model, optimizer, same=None, guard=None):
    """Restore model and optimizer from a run of this stage (own_run, restore); returns
    (step, ckpt). same, if given, maps flags to this run's values: flags that define what
    the run optimises (the reward, the advantage), which a resumed run may not change; a
    checkpoint written with another value is refused in one line naming the flag."""
    ckpt = own_run(path, stage)
    config = ckpt.get("config") or {}
    for flag, value in (same or {}).items():
        if flag in config and config[flag] != value:
            raise UserError(f"{path}: written with --{flag}={config[flag]}, not {value}; "
                            f"resume with --{flag}={config[flag]} or start a new --out_dir")
    restore(path, model, optimizer, ckpt, guard)
    restore_rng(ckpt)  # the global generators (dropout); data and sampling have own seeds
    print0(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt


def check_tokenizer(path, ckpt, enc):
    if ckpt.get("tokenizer") != enc.name:
        raise UserError(f"{path} was trained with tokenizer {ckpt.get('tokenizer')!r}, "
                        f"but the data uses {enc.name!r}: retrain it on this data "
                        f"(or point --data_dir at its data)")


def load_model(path, made_by, enc, cls=GPT, device="cpu"):
    """Rebuild a stage's language model from its checkpoint, after checking it was
    trained with this tokenizer. Returns (model, ckpt); the model is in eval mode."""
    ckpt = load(path, made_by)
    return model_from(ckpt, path, made_by, enc, cls, device), ckpt


def model_from(ckpt, path, made_by, enc, cls=GPT, device="cpu"):
    """load_model's second half, for a checkpoint already loaded: the model, in eval mode."""
    if isinstance(ckpt, dict) and "members" in ckpt:
        raise UserError(f"{path} is a reward-model checkpoint ({ckpt.get('stage')!r}), "
                        f"not a language model: expected the output of {command(made_by)}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a minRLHF checkpoint (no model weights or model config)")
    check_tokenizer(path, ckpt, enc)
    model = cls(GPTConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {type(model).__name__} "
                        f"({reason(e)[:120]})") from None
    return model.to(device).eval()


class RunLock:
    """A run folder is owned by one run at a time: an exclusive lock on out_dir/.lock,
    which holds the owner's process id. The operating system drops the lock when the
    process ends, however it ends, so a run killed with SIGKILL does not block the next
    one; a second run into a busy folder is refused at once. Under DDP only rank 0
    takes it, and its refusal stops every process. Where the platform has no fcntl
    (Windows) the folder is not locked. A folder the run made is removed again when the
    run stops on a mistake or Ctrl-C (cli's user_errors) before its first checkpoint, so
    a failed start leaves nothing behind.
    stages: the stage names whose checkpoint this run may replace (its own; DPO's
    losses each other's); a folder holding another stage's model is refused, so that
    `ppo.py --out_dir=out/sft` does not write over the SFT model."""

    def __init__(self, out_dir, run, stages, flag="--out_dir"):
        self.path, self.file, self.dir = os.path.join(out_dir, ".lock"), None, out_dir
        # the other processes stop with rank 0's refusal, not in DDP's set-up
        distributed.on_rank0(run, lambda: self._take(stages, flag))

    def _take(self, stages, flag):
        out_dir = self.dir
        try:
            import fcntl
        except ImportError:
            fcntl = None
        try:
            made = not os.path.exists(out_dir)
            os.makedirs(out_dir, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"{flag}={out_dir}: cannot create the run folder "
                            f"({e.strerror})") from None
        try:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{flag}={out_dir} is in use by process {owner}: wait for that run "
                            f"to end, stop it, or choose another {flag}") from None
        written = stage_of(os.path.join(out_dir, "ckpt.pt"))
        if written is not None and written not in stages:
            f.close()
            raise UserError(f"{flag}={out_dir} holds a run of stage {written!r}, not "
                            f"{stages[0]!r}: choose another {flag} (this run would write over "
                            f"its model), or remove that folder first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        if made:  # a run stopped by a mistake before its first checkpoint leaves no folder
            cli.ON_USER_ERROR.append(self.discard)

    def discard(self):
        if self.file is not None and not os.path.exists(os.path.join(self.dir, "ckpt.pt")):
            self.release()
            shutil.rmtree(self.dir, ignore_errors=True)

    def release(self):
        if self.discard in cli.ON_USER_ERROR:
            cli.ON_USER_ERROR.remove(self.discard)
        if self.file is not None:
            self.file.close()  # closing drops the lock; the file stays, harmless
            self.file = None

