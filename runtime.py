"""What every stage needs and is not the model: config from the command line,
device/dtype/seed/DDP set-up, checkpoint IO, data-file reading, the learning-rate
schedule and the log. The algorithms themselves stay in their stage files.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, malformed record). The
    stage prints its message as one line and exits with status 2, no traceback."""


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --- config from the command line ------------------------------------------------------


def _field_help(cls):
    """The comment after each field in the dataclass source is its --help text."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                helps[m.group(1)] = m.group(2)
    return helps


def _convert(name, typ, text):
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float, str):
            return typ(text)
    except ValueError:
        pass
    raise UserError(f"--{name}={text}: expected {typ.__name__}")


def parse_config(cls, argv=None):
    """Fill the stage's config dataclass from --name=value flags. --help lists the fields."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        helps = _field_help(cls)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
        print(" ".join(doc.split()) or cls.__name__)  # the docstring's first paragraph
        print(f"\nusage: python {os.path.relpath(sys.argv[0])} [--name=value ...]\n")
        defaults = cls()
        flags = {name: f"--{name}={getattr(defaults, name)!s}" for name in fields}
        width = max(map(len, flags.values()))
        for name, flag in flags.items():
            print(f"  {flag:<{width}}  {helps.get(name, '')}")
        sys.exit(0)
    values = {}
    for arg in argv:
        m = re.fullmatch(r"--([A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if not m:
            raise UserError(f"argument {arg!r}: flags look like --name=value (see --help)")
        name, text = m.groups()
        if name not in fields:
            close = [f for f in fields if f.startswith(name[:3])]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"--{name}: unknown flag{hint}; see --help")
        values[name] = _convert(name, fields[name].type, text)
        _check_range(name, values[name], text)
    return cls(**values)


# The ranges of the flags that several stages share, checked once here. Integers that count
# or space out steps must be >= 1, rates and coefficients >= 0, fractions in [0, 1].
AT_LEAST_1 = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "minibatch_size", "grad_accum",
              "max_steps", "iterations", "ppo_epochs", "eval_interval", "log_interval", "ckpt_interval",
              "eval_batches", "members", "norm_prompts", "kl_prompts", "max_new_tokens", "n_show", "n_prompts",
              "kl_horizon", "steps"}
NON_NEGATIVE = {"learning_rate", "value_lr", "warmup_steps", "weight_decay", "grad_clip", "kl_coef", "target_kl",
                "entropy_coef", "beta", "simpo_beta", "simpo_gamma", "orpo_lambda", "kto_desirable_weight",
                "kto_undesirable_weight", "temperature", "norm_temperature", "sample_interval", "clip_range",
                "clip_range_value", "ptx_coef", "n_docs", "n_sft", "n_prefs", "n_rl", "n_eval", "rater_k",
                "rater_b_len", "rater_b_style"}
FRACTION = {"dropout", "beta1", "beta2", "gamma", "lam", "label_smoothing", "imperfect", "habit"}


def _check_range(name, value, text):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{name}={text}: must be a finite number")
    if name in AT_LEAST_1 and value < 1:
        raise UserError(f"--{name}={text}: must be at least 1")
    if name in NON_NEGATIVE and value < 0:
        raise UserError(f"--{name}={text}: must be >= 0")
    if name in FRACTION and not 0 <= value <= 1:
        raise UserError(f"--{name}={text}: must be between 0 and 1")


# --- device, dtype, seed, DDP ---------------------------------------------------------


def number_list(text, flag, typ=int, minimum=None):
    """A comma-separated flag value ("1,4,16") as a list of numbers; "" is the empty list."""
    try:
        values = [typ(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}={text}: expected comma-separated {typ.__name__} values, e.g. {flag}=1,4,16") from None
    if minimum is not None and any(v < minimum for v in values):
        raise UserError(f"{flag}={text}: every value must be at least {minimum}")
    return values


def setup(seed, device="auto"):
    """One set-up for CPU, one GPU and torchrun. Returns a namespace with the device, the
    autocast context (bf16 on CUDA, none on CPU), the DDP rank and world size, and
    `master` (rank 0, the process that prints and writes)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"--device={device}: expected auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available on this machine")
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else device
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda"
                else contextlib.nullcontext())
    return SimpleNamespace(device=device, device_type=device_type, autocast=autocast, ddp=ddp, rank=rank,
                           local_rank=local_rank, world_size=world_size, master=rank == 0)


def teardown(run):
    if run.ddp:
        dist.barrier()  # rank 0 may still be writing; a rank that tears down alone aborts gloo
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(x, run):
    """Average a float over ranks (for logged figures; gradients are DDP's business)."""
    if not run.ddp:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.item() / run.world_size


# --- optimisation -----------------------------------------------------------------------


def micro_batch_size(batch_size, grad_accum, run):
    """Sequences per forward pass on one rank; the global batch must split evenly."""
    if batch_size <= 0 or grad_accum <= 0 or batch_size % (run.world_size * grad_accum):
        raise UserError(f"--batch_size={batch_size} does not split into {run.world_size} process(es) x "
                        f"{grad_accum} micro-steps (--grad_accum)")
    return batch_size // (run.world_size * grad_accum)


def wrap(model, run, compile=False):
    """torch.compile and DDP around the raw model; checkpoints keep saving the raw one,
    so state-dict keys never carry wrapper prefixes."""
    if compile:
        model = torch.compile(model)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    return model


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def global_batch(n, step, batch_size, seed):
    """Indices of a step's global batch of a data set of n items, in a fresh random order
    every epoch, drawn from (seed, epoch) alone: every rank and every resume agree."""
    return [epoch_order(seed, k // n, n)[k % n] for k in range(step * batch_size, (step + 1) * batch_size)]


def rank_chunks(items, run, grad_accum):
    """This rank's slice of a global batch, split into its grad_accum micro-batches."""
    per_rank = len(items) // run.world_size
    mine = items[run.rank * per_rank:(run.rank + 1) * per_rank]
    size = per_rank // grad_accum
    return [mine[j:j + size] for j in range(0, per_rank, size)]


def accumulate(model, micro_batches, loss_fn, run, weights=None):
    """Backward through each micro-batch's loss times its weight, so that the gradients
    summed over micro-steps and averaged over ranks are those of the global batch's mean
    loss. The default weights 1/len(micro_batches) suit micro-batches of equal token
    counts; with ragged batches pass each one's share of the global batch's tokens,
    times the number of ranks (DDP averages over ranks). Gradients are all-reduced once,
    on the last micro-step. Returns the global batch's mean loss."""
    weights = weights or [1.0 / len(micro_batches)] * len(micro_batches)
    total = 0.0
    for i, (batch, w) in enumerate(zip(micro_batches, weights)):
        last = i == len(micro_batches) - 1
        with (model.no_sync() if run.ddp and not last else contextlib.nullcontext()), run.autocast:
            loss = loss_fn(model, batch)
        (loss * w).backward()
        total += loss.item() * w
    return all_reduce_mean(total, run)


def lr_at(step, max_lr, warmup, total, min_lr_ratio=0.1):
    """Linear warmup to max_lr, then cosine decay to min_lr_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(model, optimizer, lr, grad_clip, loss=0.0):
    """Set the learning rate, clip the gradient norm, step, zero. Returns the norm. A
    non-finite loss or gradient norm skips the update (the gradients are dropped and the
    weights and optimizer state stay as they were) and returns nan; under DDP every rank
    sees the same all-reduced gradients and loss, so all of them skip together."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    _inject_fault(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")).item()
    if not (math.isfinite(norm) and math.isfinite(loss)):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# Fault injection for the tests: MINRLHF_NAN_STEPS="3,4" puts a NaN into the gradient at
# this process's 3rd and 4th optimizer steps (counted from 0, per process run).
_NAN_STEPS = {int(x) for x in os.environ.get("MINRLHF_NAN_STEPS", "").split(",") if x.strip()}
_calls = [0]


def _inject_fault(model):
    if _calls[0] in _NAN_STEPS:
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    _calls[0] += 1


class NonFiniteGuard:
    """Counts the updates optimizer_step skipped for a non-finite loss or gradient; after
    `limit` in a row the run stops with a clear error, before anything else is written,
    so the last checkpoint on disk is the last good one."""

    def __init__(self, limit=10, ckpt_path=""):
        self.limit, self.ckpt_path, self.skipped, self.in_a_row = limit, ckpt_path, 0, 0

    def update(self, grad_norm, step):
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        print0(f"warning: step {step}: non-finite loss or gradient, update skipped ({self.skipped} so far)")
        if self.in_a_row >= self.limit:
            kept = f"{self.ckpt_path} holds the last good weights; " if os.path.exists(self.ckpt_path) else ""
            raise UserError(f"{self.limit} non-finite updates in a row, at step {step}: stopping; {kept}"
                            f"try a lower --learning_rate or --grad_clip")

    def logged(self):
        """What goes into the step's log: the count of skipped updates, once there are any."""
        return {"skipped": self.skipped} if self.skipped else {}


class StopSignal:
    """SIGTERM (pre-emption, `kill`) and SIGINT (Ctrl-C) ask the training loop to stop
    instead of killing it: `requested(run)` becomes true after the step under way, the loop
    saves a checkpoint and calls `exit`; `checkpoint` does both for a loop. Under DDP the
    ranks agree (one all-reduce per step), so they stop at the same step. A second signal
    kills at once."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: the default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def requested(self, run):
        flag = float(self.signum is not None)
        if run.ddp:
            t = torch.tensor([flag], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0

    def checkpoint(self, run, step, due, ckpt_path, save):
        """Call on every rank after each step: rank 0 runs save() when the checkpoint is due
        or a stop was asked for; then, if asked, every rank exits."""
        stopping = self.requested(run)
        if run.master and (due or stopping):
            save()
        if stopping:
            self.exit(step, ckpt_path)

    def exit(self, step, ckpt_path):
        name = signal.Signals(self.signum).name if self.signum else "a signal on another process"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped by {name} after step {step}: checkpoint {ckpt_path} saved; --resume=true continues",
                  file=sys.stderr)
        sys.exit(128 + (self.signum or signal.SIGTERM))


# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices get no MFU figure
# rather than a wrong one.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    print0(f"warning: no peak FLOP/s known for {name!r}; MFU not reported (add it to runtime.PEAK_FLOPS)")
    return None


# --- files ----------------------------------------------------------------------------


def atomic_write(path, write):
    """Write through a temporary file in the same folder, fsync, rename: a reader never
    sees a half-written file, and a crash leaves the old one."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require(path, made_by):
    """The path, if it exists; otherwise a UserError naming the command that makes it."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `{made_by}` first")
    return path


def save_checkpoint(path, payload):
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, made_by=None):
    """Load a checkpoint with weights_only=True (no pickled code runs). `made_by` is the
    command that writes it, named in the error when the file is missing."""
    path = str(path)
    if not os.path.exists(path):
        hint = f": run `{made_by}` first" if made_by else ""
        raise UserError(f"{path} not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable checkpoint ({first[:160]})") from None


def resume(path, model, optimizer):
    """Restore model and optimizer from a stage's own checkpoint; returns (step, ckpt)."""
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:  # the global generator (dropout); data order and sampling have their own seeds
        torch.set_rng_state(ckpt["rng"])
    print0(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt


def stage_checkpoint(stage, model, cfg, step, optimizer, enc, **extra):
    """What every stage's checkpoint holds: enough to rebuild the model without the
    code's defaults (model config), to resume (optimizer, step, the global random
    generator's state) and to refuse a mismatch (stage, tokenizer)."""
    return dict(stage=stage, model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                config=dataclasses.asdict(cfg), step=step, optimizer=optimizer.state_dict(), tokenizer=enc.name,
                rng=torch.get_rng_state(), **extra)


def load_model(path, made_by, enc, cls=None, device="cpu"):
    """Rebuild a stage's model from its checkpoint, after checking it was trained with
    this tokenizer. Returns (model, ckpt); the model is in eval mode."""
    from model import GPT, GPTConfig

    ckpt = load_checkpoint(path, made_by)
    if isinstance(ckpt, dict) and "members" in ckpt:
        raise UserError(f"{path} is a reward-model checkpoint ({ckpt.get('stage')!r}), not a language model: "
                        f"expected the output of `{made_by}`")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a minRLHF checkpoint (no model weights or model config)")
    if ckpt.get("tokenizer") != enc.name:
        raise UserError(f"{path} was trained with tokenizer {ckpt.get('tokenizer')!r}, but the data uses "
                        f"{enc.name!r}: retrain it on this data (or point --data_dir at its data)")
    model = (cls or GPT)(GPTConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {type(model).__name__} "
                        f"({str(e).splitlines()[0][:120]})") from None
    return model.to(device).eval(), ckpt


def load_reward_model(path, made_by, enc, device="cpu", reduce=None):
    """The reward model written by reward.py: its members, their normalisation, pooling
    and (unless overridden) how members are combined. Returns (RewardModel, ckpt)."""
    from model import GPTConfig, RewardModel, ScalarGPT

    ckpt = load_checkpoint(path, made_by)
    if not isinstance(ckpt, dict) or ckpt.get("stage") != "reward" or not ckpt.get("members"):
        raise UserError(f"{path}: not a finished reward-model checkpoint (stage {ckpt.get('stage')!r}): "
                        f"run `{made_by}`")
    if ckpt.get("tokenizer") != enc.name:
        raise UserError(f"{path} was trained with tokenizer {ckpt.get('tokenizer')!r}, but the data uses "
                        f"{enc.name!r}: retrain it on this data")
    members = []
    for sd in ckpt["members"]:
        m = ScalarGPT(GPTConfig(**ckpt["model_config"]), bool(ckpt["config"].get("likelihood", False)))
        m.load_state_dict(sd)
        members.append(m)
    rm = RewardModel(members, ckpt["norms"], ckpt["config"]["pooling"], reduce or ckpt["config"]["reduce"])
    return rm.to(device).eval(), ckpt


@torch.no_grad()
def sample_responses(model, enc, prompts, max_new_tokens, temperature, seed, device, batch_size=64):
    """Answer each prompt in the chat format with the KV cache, batch by batch, from one
    generator seeded with `seed`. Returns (prompt tokens, response tokens) per prompt; a
    response keeps its end token when it emitted one. Every stage that samples from a
    policy goes through here."""
    from data.tokenizer import encode_prompt

    end, pad = enc.encode_single_token("<|end|>"), enc.encode_single_token("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = [encode_prompt(enc, p) for p in prompts[i:i + batch_size]]
        longest = max(len(b) for b in batch)
        if longest + max_new_tokens > model.config.block_size:
            raise UserError(f"a prompt of {longest} tokens + --max_new_tokens={max_new_tokens} exceeds the context "
                            f"of {model.config.block_size} tokens")
        tokens, mask = model.generate(batch, max_new_tokens, temperature=temperature, stop_token=end,
                                      pad_token=pad, generator=g)
        out += [(p, [t for t, keep in zip(row, m) if keep]) for p, row, m in zip(batch, tokens.tolist(), mask.tolist())]
    return out


def token_windows(data, starts, length, device):
    """Windows of length + 1 tokens of a token stream (a uint16 memmap of train.bin or
    val.bin) at the given starts: inputs and next-token targets, (B, length) each."""
    rows = np.stack([data[i:i + length + 1] for i in starts.tolist()]).astype(np.int64)
    xy = torch.from_numpy(rows).to(device)
    return xy[:, :-1], xy[:, 1:]


def preference_paths(data_dir, prefs, split):
    """(name, path) of each preference set named in a --prefs value ("prefs,prefs_sft")
    for one split (train or val), each checked to exist: prefs_*.jsonl are written by
    data/prepare.py, prefs_sft_*.jsonl by data/label.py."""
    names = [x for x in prefs.split(",") if x]
    if not names:
        raise UserError("--prefs is empty: name at least one preference set (e.g. prefs)")
    made_by = {"prefs_sft": "python data/label.py"}
    return [(name, require(os.path.join(data_dir, f"{name}_{split}.jsonl"), made_by.get(name, "python data/prepare.py")))
            for name in names]


def read_jsonl(path, fields):
    """Records from a JSONL file; `fields` maps each required field to its type. A bad
    line raises UserError naming the file and line."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` first")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            for name, typ in fields.items():
                if name not in rec:
                    raise UserError(f"{path}:{lineno}: missing field {name!r}")
                if not isinstance(rec[name], typ) or (typ is int and isinstance(rec[name], bool)):
                    raise UserError(f"{path}:{lineno}: field {name!r} should be {typ.__name__}, "
                                    f"got {type(rec[name]).__name__}")
            rec["_line"] = lineno
            records.append(rec)
    if not records:
        raise UserError(f"{path}: no records")
    return records


# --- logging ---------------------------------------------------------------------------


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Logger:
    """A console line every `interval` steps (loss, tokens/s, ETA) and every logged
    figure in out_dir/log.jsonl, one JSON object per line; the first line of a run (and
    of each resume) is {"config": ...}."""

    def __init__(self, out_dir, cfg, total_steps, interval, master, start_step=0, append=False):
        self.total, self.interval, self.master, self.start = total_steps, interval, master, start_step
        self.path = os.path.join(out_dir, "log.jsonl")
        self.t0, self.last_t, self.tokens = time.time(), time.time(), 0
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if start_step == 0 and not append and os.path.exists(self.path):
                os.remove(self.path)
        self.write({"config": dataclasses.asdict(cfg), "start_step": start_step})

    def write(self, record):
        if self.master:
            append_jsonl(self.path, record)

    def step(self, step, tokens, force=False, show=None, **metrics):
        """Call once per optimizer step with the tokens it processed (all ranks); `force`
        logs this step off the interval (a step that carries an evaluation); `show` names
        the metrics printed on the console (default: all; the JSONL file gets all)."""
        self.tokens += tokens
        if step % self.interval and step != self.total - 1 and not force:
            return
        now = time.time()
        dt = now - self.last_t
        tok_s = self.tokens / max(dt, 1e-9)
        eta = (now - self.t0) / (step + 1 - self.start) * (self.total - step - 1)
        self.last_t, self.tokens = now, 0
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}, "tok_per_s": round(tok_s, 1),
               "elapsed_s": round(now - self.t0, 2)}
        self.write(rec)
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if show is None or k in show)
        print0(f"step {step:>5}/{self.total} | {shown} | {tok_s / 1e3:.1f}k tok/s | eta {eta:.0f}s")
