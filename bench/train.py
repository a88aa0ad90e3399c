"""Benchmark: training throughput (tokens/s) and MFU of the GPT at a preset size.

Times full optimizer steps (forward, backward, and pretrain.py's optimizer: Muon for the
blocks' matrices and AdamW the rest, or --optimizer=adamw) on random tokens, after
warm-up steps (which also absorb torch.compile's compilation), and prints the median
step time, tokens/s and, on a GPU whose peak is known (distributed.PEAK_FLOPS), the model
FLOPs utilisation: achieved FLOP/s (PaLM estimate, model.flops_per_token) / peak.

    python bench/train.py                                   # the CPU default model
    python bench/train.py --preset=gpt2 --device=cuda       # 124M, bf16 autocast
    python bench/train.py --preset=gpt2 --device=cuda --compile=true
    python bench/train.py --batch_size=16                   # another batch, same model
    python bench/train.py --optimizer=adamw                 # AdamW throughout
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402

import distributed  # noqa: E402
import optim  # noqa: E402
from cli import UserError, parse_config, ranges, user_errors  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PRESETS = {  # name: (model config, sequences per step)
    "cpu": (GPTConfig(block_size=128, vocab_size=1028, n_layer=4, n_head=4, n_embd=128), 64),
    "gpt2": (GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768), 16),
    "gpt2-medium": (GPTConfig(block_size=1024, vocab_size=50304, n_layer=24, n_head=16,
                              n_embd=1024), 8),
}


@dataclass
class Config:
    preset: str = "cpu"        # cpu, gpt2 or gpt2-medium
    device: str = "auto"       # auto, cpu, cuda, cuda:N or mps
    compile: bool = False      # torch.compile the model
    optimizer: str = "muon"    # muon (pretrain.py's default) or adamw
    batch_size: int = 0        # sequences per step (0: the preset's)
    steps: int = 10            # timed steps
    warmup: int = 3            # untimed steps first
    seed: int = 0              # random init and data

    RANGES: ClassVar = ranges(at_least_1="steps", non_negative="batch_size warmup")


def main(cfg):
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)}")
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    mconf, batch = PRESETS[cfg.preset]
    batch = cfg.batch_size or batch
    raw = GPT(mconf).to(run.device)
    model = distributed.wrap(raw, run, cfg.compile)
    optimizer = optim.pretrain_optimizer(raw, cfg.optimizer, 0.1, 3e-4, (0.9, 0.95),
                                         run.device_type)
    x = torch.randint(mconf.vocab_size, (batch, mconf.block_size + 1), device=run.device)

    times = []
    for i in range(cfg.warmup + cfg.steps):
        if run.device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with run.autocast:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device_type == "cuda":
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = batch * mconf.block_size
    flops = raw.flops_per_token(mconf.block_size) * tokens / dt
    peak = distributed.peak_flops(run.device)
    name = (torch.cuda.get_device_name(run.device) if run.device_type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    print(f"preset={cfg.preset} ({raw.num_params() / 1e6:.1f}M parameters, "
          f"batch {batch} x {mconf.block_size}) "
          f"device={name} compile={cfg.compile} optimizer={cfg.optimizer} "
          f"torch={torch.__version__}")
    print(f"step median {dt * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f}, {len(times)} steps)")
    print(f"throughput {tokens / dt:,.0f} tokens/s, {flops / 1e12:.3f} TFLOP/s achieved"
          + (f", MFU {flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else ""))


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
