"""
Benchmark: generation speed with the KV cache vs recomputing the whole sequence each step.

Measures GPT.generate for 128 new tokens at batch 32 with the default GPTConfig
(block_size 256, 4 layers, 128 dims, vocab 1024), random weights, prompts of random
lengths 8-32 tokens, and no stop token so every step runs. Each path gets a warm-up run,
then --repeats timed runs; the script prints median seconds, new tokens per second and
the speed-up (recompute median / cache median).

Run from the repository root:

    python bench/generate.py                # CPU
    python bench/generate.py --device=cuda  # if a GPU is available
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402

import distributed  # noqa: E402
from cli import parse_config, ranges, user_errors  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@dataclass
class Config:
    device: str = "cpu"       # auto, cpu, cuda, cuda:N or mps
    batch: int = 32           # prompts per call
    new_tokens: int = 128     # tokens generated for each prompt
    repeats: int = 5          # timed calls of each path, after one untimed
    seed: int = 0

    RANGES: ClassVar = ranges(at_least_1="batch new_tokens repeats")


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA runs asynchronously: wait before reading the clock


def time_generate(model, prompts, new_tokens, use_cache, repeats, device, seed) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first run is a warm-up and is not timed
        gen = torch.Generator(device=device).manual_seed(seed)
        sync(device)
        t0 = time.perf_counter()
        tokens, _ = model.generate(prompts, new_tokens, temperature=1.0, generator=gen,
                                   use_cache=use_cache)
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
        assert tokens.shape == (len(prompts), new_tokens)  # no stop token: every step ran
    return times


def main(args):
    # a device this machine lacks is refused; auto is the GPU when there is one
    args.device = distributed.setup(args.seed, args.device).device
    torch.manual_seed(args.seed)
    config = GPTConfig()
    model = GPT(config).to(args.device).eval()
    prompts = [torch.randint(0, config.vocab_size, (int(torch.randint(8, 33, ())),)).tolist()
               for _ in range(args.batch)]
    n_new = args.batch * args.new_tokens
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"config: {config}")
    print(f"batch={args.batch} new_tokens={args.new_tokens} prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} repeats={args.repeats}")

    medians = {}
    for name, use_cache in (("kv-cache", True), ("recompute", False)):
        times = time_generate(model, prompts, args.new_tokens, use_cache, args.repeats,
                              args.device, args.seed)
        medians[name] = statistics.median(times)
        print(f"{name:>9}: median {medians[name]:.3f} s  "
              f"({n_new / medians[name]:,.0f} new tokens/s)  "
              f"runs: {', '.join(f'{t:.3f}' for t in times)}")
    print(f"speed-up (recompute / kv-cache): {medians['recompute'] / medians['kv-cache']:.1f}x")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
