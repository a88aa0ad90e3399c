"""bench/stages.py at a tiny size: every figure it prints is there and well formed, so the
script cannot rot between the runs that time it. Nothing here is timed."""

import importlib.util
import json
from pathlib import Path

import pytest

from cli import UserError, parse_config

ROOT = Path(__file__).resolve().parents[2]


def load_stages():
    spec = importlib.util.spec_from_file_location("bench_stages", ROOT / "bench" / "stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_figure_at_a_tiny_size(capsys):
    stages = load_stages()
    stages.main(parse_config(stages.Config, ["--steps=2", "--warmup=0", "--batch=4",
                                             "--prompt_len=3", "--response_len=4",
                                             "--gen_batches=2,4", "--sft_len=8"]))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["bench"]: r for r in rows}
    assert list(by_name) == ["setup", "sft_step", "generate_b2", "generate_b4", "dpo_live",
                             "dpo_cached", "reward_step", "ppo_iteration", "grpo_iteration",
                             "adamw_step", "adamw_step_unfused"]
    rates = {"sft_step": "tokens_per_s", "generate_b2": "tokens_per_s", "dpo_live": "pairs_per_s",
             "reward_step": "pairs_per_s", "ppo_iteration": "episodes_per_s",
             "grpo_iteration": "episodes_per_s"}
    for name, unit in rates.items():
        r = by_name[name]
        assert r["runs"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r[unit] == pytest.approx(
            {"sft_step": 4 * 8, "generate_b2": 2 * 4}.get(name, 4) / r["median_s"], rel=1e-2)
        assert r["peak_rss_mib"] > 0
    # the stages' optimizer is the fused one; the comparison is torch's as it comes
    assert by_name["adamw_step"]["fused"] and not by_name["adamw_step_unfused"]["fused"]
    # the live reference costs a forward more than the cached one: 8 against 6 × N per token
    # (each figure is rounded to a MFLOP)
    assert by_name["dpo_live"]["gflop_per_step"] == pytest.approx(
        by_name["dpo_cached"]["gflop_per_step"] * 8 / 6, abs=2e-3)


@pytest.mark.parametrize("flags, message", [
    (["--only=gen,nope"], "--only: unknown figure"),
    (["--preset=gpt3"], "--preset=gpt3: expected one of compare, gpt2"),
    (["--sft_len=300"], "must fit the 256 positions of --preset=compare"),
    (["--gen_batches=16,0"], "--gen_batches=16,0: every value must be at least 1"),
    (["--batch=6", "--only=grpo"], "--batch=6: the grpo figure answers each prompt 4 times"),
])
def test_settings_that_cannot_run_are_refused(flags, message):
    stages = load_stages()
    with pytest.raises(UserError, match=message):
        stages.main(parse_config(stages.Config, flags))


def test_steps_below_one_are_refused_when_parsed():
    stages = load_stages()
    with pytest.raises(UserError, match="--steps=0: must be at least 1"):
        parse_config(stages.Config, ["--steps=0"])


def test_the_cache_against_recompute_benchmark_at_a_tiny_size(capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(parse_config(module.Config, ["--batch=2", "--new_tokens=3", "--repeats=1"]))
    out = capsys.readouterr().out
    assert "kv-cache: median" in out and "speed-up (recompute / kv-cache):" in out
    with pytest.raises(UserError, match="--batch=0: must be at least 1"):
        parse_config(module.Config, ["--batch=0"])


def test_host_syncs_counts_the_waits_torch_reports_and_restores_the_mode(monkeypatch):
    """The CUDA-only count of host waits, its logic checked on a CPU: torch's sync debug
    mode (replaced here) warns once per wait; other warnings are not counted."""
    import warnings
    from types import SimpleNamespace

    stages = load_stages()
    modes = []
    monkeypatch.setattr(stages.torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # the same site, 3 times
        warnings.warn("something else")

    assert stages.host_syncs(step, SimpleNamespace(type="cuda")) == 3
    assert modes == ["warn", "default"]
    with pytest.raises(ZeroDivisionError):
        stages.host_syncs(lambda: 1 / 0, SimpleNamespace(type="cuda"))
    assert modes[-1] == "default"  # restored after a failure too
    assert stages.host_syncs(step, SimpleNamespace(type="cpu")) is None
