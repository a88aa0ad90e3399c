"""Benchmark: one step of each stage, timed on fixed shapes, one JSON line per figure.

--preset=compare (the default) is the shape other RLHF libraries are usually timed on, so
a figure here can be set beside theirs when both run one after the other on the same
machine: a GPT-2-shaped model (4 layers, 128 dims, 4 heads, vocabulary 1024, 256
positions, random weights), prompts of 32 random tokens, responses of exactly 32 tokens
(no end token, so every sequence has full length), batches of 16. --preset=gpt2 is
GPT-2 small (124M: 12 layers, 768 dims, vocabulary 50304, 1024 positions) on the same
batches: the figures to take whenever a GPU is at hand (a few minutes of one).

  sft      one language-model step (SFT's and pretraining's) on --batch sequences of
           --sft_len tokens: tokens/s and, on a GPU of known peak, MFU
  gen      GPT.generate at batch 16, 64 and 256, 32 new tokens, temperature 1, KV cache
           (on CUDA also the times a call made the host wait for the GPU, host_syncs_per_call)
  dpo      one DPO step on 16 pairs (dpo.batch_loss, backward, clip, AdamW), the
           reference's log-probs run live in the step (dpo_live) or cached (dpo_cached);
           a pair's chosen and rejected answer follow one prompt, which runs once
  reward   one Bradley-Terry step on 16 pairs (reward.bradley_terry_loss), the pair's
           prompt run once
  ppo      one PPO iteration: ppo.rollout on 16 prompts (generation, reward model,
           policy, reference and value forwards), then ppo.ppo_update with 4 epochs of
           one minibatch of 16
  grpo     one GRPO iteration: 4 prompts x 4 answers, the reward the share of
           even token ids, the reference at beta 0.04, one update (grpo.sample_groups,
           grpo.assemble, grpo.group_advantages, grpo.grpo_loss, as grpo.py's loop)
  adamw    one optimizer step on the policy's gradients: the stages' AdamW
           (GPT.configure_optimizers, fused) and, beside it, torch's AdamW as it comes
           (not fused: a loop over the tensors on a CPU, foreach on a GPU)

Each figure: --warmup untimed steps, then --steps timed ones; the median step time and
its rate (tokens/s, pairs/s or episodes/s), with min and max, and the peak memory (on a
GPU, allocated by torch during that figure; on a CPU, the process's peak RSS so far). The
training steps also carry their FLOPs (6 x parameters per trained token, 2 x per
forward-only token; a prompt shared by a pair counts once), the achieved GFLOP/s and,
on a GPU whose bf16 peak is known (distributed.PEAK_FLOPS), the MFU. On CUDA the
training steps run under bf16 autocast, as the stages do.

    python bench/stages.py                        # every figure, CPU
    python bench/stages.py --only=gen,grpo        # some
    python bench/stages.py --compile=true         # generation step and forwards compiled
    python bench/stages.py --device=cuda --preset=gpt2     # 124M on a GPU
"""

import copy
import json
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402

import distributed  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
from batch import collate, collate_pairs, response_logprobs, sequence_logprobs  # noqa: E402
from cli import UserError, number_list, parse_config, ranges, user_errors  # noqa: E402
from model import GPT, GPTConfig, ScalarGPT  # noqa: E402
from reward_model import RewardMember, RewardModel  # noqa: E402

FIGURES = ("sft", "gen", "dpo", "reward", "ppo", "grpo", "adamw")
PRESETS = {
    "compare": GPTConfig(block_size=256, vocab_size=1024, n_layer=4, n_head=4, n_embd=128),
    "gpt2": GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
}


@dataclass
class Config:
    only: str = ",".join(FIGURES)  # which figures, comma-separated
    preset: str = "compare"        # compare (the shapes other libraries are timed on) or gpt2
    steps: int = 10                # timed steps per figure
    warmup: int = 3                # untimed steps first
    batch: int = 16                # pairs, prompts or episodes per step
    prompt_len: int = 32           # tokens per prompt
    response_len: int = 32         # tokens per response
    gen_batches: str = "16,64,256"  # generation batch sizes
    sft_len: int = 256             # tokens per sequence of the sft figure
    threads: int = 0               # torch threads (0 = torch's default)
    compile: bool = False          # torch.compile generation and the trained forwards (warm-up)
    device: str = "auto"           # auto, cpu, cuda, cuda:N or mps
    seed: int = 0

    RANGES: ClassVar = ranges(at_least_1="steps batch prompt_len response_len sft_len",
                              non_negative="warmup threads")


def timed(step, cfg, device):
    """Run step() warmup + steps times; seconds of the timed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return times


def host_syncs(step, device):
    """How many times step() made the host wait for the GPU (torch's sync debug mode warns
    at each wait); None off CUDA. A generation call should wait only where it reads the
    device: the stop-token check every few steps, and the answers' length at the end."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def emit(name, times, per_step, unit, device, flops=None, **extra):
    med = statistics.median(times)
    row = {"bench": name, "median_s": round(med, 5), "min_s": round(min(times), 5),
           "max_s": round(max(times), 5), "runs": len(times), unit: round(per_step / med, 2)}
    if flops:
        row["gflop_per_step"] = round(flops / 1e9, 3)
        row["gflop_per_s"] = round(flops / med / 1e9, 2)
        peak = distributed.peak_flops(device)
        if peak:
            row["mfu"] = round(flops / med / peak, 4)
    if device.type == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:  # ru_maxrss is in KiB on Linux
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row.update(extra)
    print(json.dumps(row), flush=True)


def random_rows(n, length, vocab, g):
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)}")
    gen_batches = number_list(cfg.gen_batches, "--gen_batches", minimum=1)
    if "grpo" in cfg.only.split(",") and cfg.batch % 4:
        raise UserError(f"--batch={cfg.batch}: the grpo figure answers each prompt 4 times, "
                        f"so the batch must be a multiple of 4")
    unknown = set(cfg.only.split(",")) - set(FIGURES)
    if unknown:
        raise UserError(f"--only: unknown figure(s) {', '.join(sorted(unknown))}; expected some "
                        f"of {', '.join(FIGURES)}")
    run = distributed.setup(cfg.seed, cfg.device, cfg.compile)
    dev, B, P, N = torch.device(run.device), cfg.batch, cfg.prompt_len, cfg.response_len
    g = torch.Generator().manual_seed(cfg.seed)
    mconf = copy.deepcopy(PRESETS[cfg.preset])
    if P + N > mconf.block_size or cfg.sft_len > mconf.block_size:
        raise UserError(f"--prompt_len + --response_len and --sft_len must fit the "
                        f"{mconf.block_size} positions of --preset={cfg.preset}")
    policy = GPT(mconf).to(dev)
    n_params = policy.num_params()
    ref = copy.deepcopy(policy).requires_grad_(False)
    for m in (policy, ref):
        m.eval()  # dropout is 0 anyway; eval as the stages run their models
    print(json.dumps({"bench": "setup", "preset": cfg.preset, "device": str(dev),
                      "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                      else "cpu"),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "compile": cfg.compile,
                      "params": n_params, "batch": B, "prompt_len": P, "response_len": N}),
          flush=True)
    only = cfg.only.split(",")
    opt = policy.configure_optimizers(0.0, 1e-6, (0.9, 0.95), dev.type)
    train_policy = distributed.wrap(policy, run, cfg.compile)  # the policy the training steps run
    ref_forward = distributed.run_only(ref, cfg.compile)  # PPO's and GRPO's reference, as theirs

    def train_step(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if "sft" in only:
        x = torch.randint(3, mconf.vocab_size, (B, cfg.sft_len + 1), generator=g).to(dev)

        def sft_step():
            with run.autocast:
                loss = train_policy(x[:, :-1], x[:, 1:])[1]
            train_step(loss)
        emit("sft_step", timed(sft_step, cfg, dev), B * cfg.sft_len, "tokens_per_s", dev,
             flops=policy.flops_per_token(cfg.sft_len) * B * cfg.sft_len)

    if "gen" in only:
        for b in gen_batches:
            prompts = random_rows(b, P, mconf.vocab_size, g)
            gen = torch.Generator(device=dev).manual_seed(cfg.seed)
            with run.autocast:
                def call():
                    policy.generate(prompts, N, generator=gen, compile=cfg.compile)
                times = timed(call, cfg, dev)
                syncs = host_syncs(call, dev)
            emit(f"generate_b{b}", times, b * N, "tokens_per_s", dev,
                 **({} if syncs is None else {"host_syncs_per_call": syncs}))

    pad = 0
    seqs = random_rows(2 * B, P + N, mconf.vocab_size, g)
    for chosen, rejected in zip(seqs[:B], seqs[B:]):
        rejected[:P] = chosen[:P]  # a pair's two answers follow one prompt, as in the stages' data
    seqs = [(r, P) for r in seqs]

    if "dpo" in only:
        dcfg = dpo.Config()
        rows = collate([s for s, _ in seqs], [p for _, p in seqs], pad, dev)
        cached = sequence_logprobs(ref, rows)[0].detach()
        tokens = B * (P + 2 * N)  # the pair's prompt runs once (sequence_logprobs shares it)

        def dpo_step(live):
            with run.autocast:
                if live:
                    with torch.no_grad():
                        r = sequence_logprobs(ref, rows)[0]
                loss = dpo.batch_loss(train_policy, (rows, r if live else cached), dcfg)[0]
            train_step(loss)
        emit("dpo_live", timed(lambda: dpo_step(True), cfg, dev), B, "pairs_per_s", dev,
             flops=6 * n_params * tokens + 2 * n_params * tokens)
        emit("dpo_cached", timed(lambda: dpo_step(False), cfg, dev), B, "pairs_per_s", dev,
             flops=6 * n_params * tokens)

    member = RewardMember(mconf, likelihood=True).to(dev)
    reward_model = RewardModel([member], [(1.0, 0.0)]).to(dev)

    if "reward" in only:
        rows = collate([s for s, _ in seqs], [p for _, p in seqs], pad, dev)
        ropt = member.configure_optimizers(0.0, 1e-6, (0.9, 0.95), dev.type)
        member.train()
        train_rm = distributed.wrap(reward_model, run, cfg.compile)

        def rm_step():
            with run.autocast:
                r = train_rm(rows)
                loss = reward.bradley_terry_loss(r[:B], r[B:])[0].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(member.parameters(), 1.0)
            ropt.step()
            ropt.zero_grad(set_to_none=True)
        emit("reward_step", timed(rm_step, cfg, dev), B, "pairs_per_s", dev,
             flops=6 * member.num_params() * B * (P + 2 * N))
        member.eval()

    prompts = [s[:P] for s, _ in seqs]
    if "ppo" in only:
        pcfg = ppo.Config(batch_size=B, minibatch_size=B, ppo_epochs=4, max_new_tokens=N,
                          compile=cfg.compile)
        value_model = ScalarGPT(mconf).to(dev)
        train_value = distributed.wrap(value_model, run, cfg.compile)
        value_forward = distributed.run_only(value_model, cfg.compile)  # as ppo.py
        vopt = value_model.configure_optimizers(0.0, 1e-6, (0.9, 0.95), dev.type)
        tok = SimpleNamespace(end=-1, pad=pad)  # no end token: full-length responses
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)

        def score(prompt_rows, responses):
            with torch.no_grad():
                return reward_model(collate_pairs(list(zip(prompt_rows, responses)), pad, dev))

        def iteration():
            with run.autocast:
                batch = ppo.rollout(policy, ref_forward, value_forward, score, prompts[:B],
                                    pcfg.kl_coef, pcfg, tok, gen, dev)
            batch["advantages"] = ppo.whiten(batch["advantages"], batch["mask"])
            ppo.ppo_update(train_policy, train_value, opt, vopt, batch, pcfg, 1e-6, 1e-6, gen, run)
        emit("ppo_iteration", timed(iteration, cfg, dev), B, "episodes_per_s", dev,
             epochs=pcfg.ppo_epochs)

    if "grpo" in only:
        G = 4
        gcfg = grpo.Config(batch_size=B, group_size=G, updates=1, max_new_tokens=N, beta=0.04,
                           compile=cfg.compile)
        tok = SimpleNamespace(end=None, pad=pad)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)

        def iteration():
            groups = prompts[:B // G]
            responses = grpo.sample_groups(policy, groups, G, gcfg, tok, gen)
            scores = torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in responses],
                                  device=dev)
            rows = [p for p in groups for _ in range(G)]
            tokens, attn, mask, start = grpo.assemble(rows, responses, pad, dev)
            advantages = grpo.group_advantages(scores, G, gcfg.advantage)
            with torch.no_grad(), run.autocast:
                ref_logp = response_logprobs(ref_forward, tokens, attn_mask=attn, start=start,
                                             share_prefix=True)
            old_logp = None
            for _ in range(gcfg.updates):  # as grpo.py: π_old from the first forward
                with run.autocast:
                    logp, _ = response_logprobs(train_policy, tokens, attn_mask=attn, start=start,
                                                entropy=True, share_prefix=True)
                    old_logp = logp.detach() if old_logp is None else old_logp
                    loss = grpo.grpo_loss(logp, old_logp, ref_logp, advantages, mask, gcfg)[0]
                train_step(loss)
        emit("grpo_iteration", timed(iteration, cfg, dev), B, "episodes_per_s", dev,
             group=G, updates=gcfg.updates)

    if "adamw" in only:
        for p in policy.parameters():  # random gradients: a step's time does not depend on them
            p.grad = torch.randn(p.shape, generator=g).to(dev)
        plain = torch.optim.AdamW([{"params": grp["params"], "weight_decay": grp["weight_decay"]}
                                   for grp in opt.param_groups], lr=1e-6, betas=(0.9, 0.95))
        for name, o in (("adamw_step", opt), ("adamw_step_unfused", plain)):
            emit(name, timed(o.step, cfg, dev), n_params, "params_per_s", dev,
                 fused=bool(o.defaults["fused"]))
    distributed.teardown(run)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
