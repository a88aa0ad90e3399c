"""sft.py from a GPT-2 checkpoint on HH-RLHF-format data, and from the world's model on a
file of your own; then sample.py and export.py on the result: the tokenizer travels in the
checkpoint, and the export reads back as the same model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error_in_process, main_of, read_log

import checkpoint
import dpo
import eval as evaluation
import export
import grpo
import hf
import ppo
import reward
import sample
import sft
from cli import parse_config
from reward_model import load_reward_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpt2-tiny"
H, A = "\n\nHuman: ", "\n\nAssistant: "
STEPS = ["--batch_size=4", "--max_steps=3", "--eval_interval=3", "--log_interval=1",
         "--warmup_steps=1"]


def hh_file(path, n=12):
    rows = [{"chosen": f"{H}What is {i} + {i}?{A}It is {2 * i}.",
             "rejected": f"{H}What is {i} + {i}?{A}No idea."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gpt2_sft_sample_and_export(tmp_path, capsys):
    out = tmp_path / "sft"
    main_of(sft, [f"--init_from={FIXTURE}", f"--data={hh_file(tmp_path / 'hh.jsonl')}",
                  f"--out_dir={out}", "--val_fraction=0.25", *STEPS])
    assert "HH-RLHF file, read 12; 0 longer than the context skipped; 9 to train on, 3 held " \
           "out" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2]
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["chat"] == "hh" and ckpt["init_from"] == str(FIXTURE)
    enc = hf.checkpoint_tokenizer(ckpt, out / "ckpt.pt")
    assert enc.name == hf.load_gpt2_tokenizer(str(FIXTURE)).name
    model = checkpoint.model_from(ckpt, out / "ckpt.pt", "x", enc)

    # sample.py answers in HH's format with the checkpoint's own tokenizer
    sample.main(parse_config(sample.Config, [f"--from={out}", "--max_new_tokens=4"]), ["Hi"])
    assert capsys.readouterr().out.startswith("> Hi\n  '")

    # export: GPT-2's own tokenizer files, and the same model read back
    main_of(export, [f"--from={out}", f"--to={tmp_path / 'export'}"])
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "export" / name).read_text() == (FIXTURE / name).read_text()
    back, _ = hf.from_pretrained(str(tmp_path / "export"))
    x = torch.tensor([enc.encode_ordinary(f"{H}What is 2 + 2?{A}")])
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_gpt2_sft_then_dpo_on_hh_pairs(tmp_path, capsys):
    data = hh_file(tmp_path / "hh.jsonl")
    main_of(sft, [f"--init_from={FIXTURE}", f"--data={data}", f"--out_dir={tmp_path / 'sft'}",
                  *STEPS])
    capsys.readouterr()
    main_of(dpo, [f"--init_from={tmp_path / 'sft'}", f"--data={data}",
                  f"--out_dir={tmp_path / 'dpo'}", "--val_fraction=0.25", "--kl_prompts=2",
                  "--max_new_tokens=4", *STEPS])
    assert "HH-RLHF file, read 12; 0 longer than the context skipped; 9 pairs to train on, " \
           "3 held out" in capsys.readouterr().out
    log = read_log(tmp_path / "dpo" / "log.jsonl")
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as SFT
    assert "objective/kl" in log[-1] and "val/rewards/accuracy" in log[-1]
    ckpt = checkpoint.load(tmp_path / "dpo" / "ckpt.pt")
    assert ckpt["chat"] == "hh" and ckpt["hf_tokenizer"] == hf.tokenizer_texts(str(FIXTURE))
    main_of(export, [f"--from={tmp_path / 'dpo'}", f"--to={tmp_path / 'export'}"])
    assert hf.from_pretrained(str(tmp_path / "export"))[0].config.n_layer == 2


def test_gpt2_sft_reward_model_and_ppo_on_data_of_your_own(tmp_path, capsys):
    data = hh_file(tmp_path / "hh.jsonl")
    main_of(sft, [f"--init_from={FIXTURE}", f"--data={data}", f"--out_dir={tmp_path / 'sft'}",
                  *STEPS])
    capsys.readouterr()
    main_of(reward, [f"--init_from={tmp_path / 'sft'}", f"--data={data}",
                     f"--out_dir={tmp_path / 'rm'}", "--val_fraction=0.25", "--norm_prompts=4",
                     "--max_new_tokens=4", *STEPS])
    out = capsys.readouterr().out
    assert "HH-RLHF file, read 12; 0 longer than the context skipped; 9 pairs to train on, " \
           "3 held out" in out
    assert "9 rankings (9 pairs) from hh.jsonl, 3 held out" in out
    assert "hh.jsonl: held-out pair accuracy" in out and "Bayes" not in out
    ckpt = checkpoint.load(tmp_path / "rm" / "ckpt.pt")
    assert ckpt["chat"] == "hh" and ckpt["hf_tokenizer"] == hf.tokenizer_texts(str(FIXTURE))
    # the reward model loads with the tokenizer it carries
    enc = hf.checkpoint_tokenizer(ckpt, tmp_path / "rm" / "ckpt.pt")
    rm, _ = load_reward_model(tmp_path / "rm" / "ckpt.pt", "x", enc)
    assert len(rm.members) == 1 and rm.norms.shape == (1, 2)

    # PPO on prompts of your own against it: HH's format, no gold scorer to log
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?"}) + "\n"
                               for i in range(6)) + json.dumps({"prompt": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 1 + 1?"}]}) + "\n")
    main_of(ppo, [f"--init_from={tmp_path / 'sft'}", f"--reward_from={tmp_path / 'rm'}",
                  f"--data={prompts}", f"--out_dir={tmp_path / 'ppo'}", "--iterations=2",
                  "--batch_size=4", "--minibatch_size=2", "--ppo_epochs=1",
                  "--max_new_tokens=4", "--sample_interval=1"])
    out = capsys.readouterr().out
    assert "RL prompt file, read 7; 0 too long for the context with --max_new_tokens skipped; " \
           "7 to train on" in out and " -> " in out
    log = read_log(tmp_path / "ppo" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1] and "gold/score" not in log[0]
    assert log[0]["objective/kl"] == pytest.approx(0, abs=1e-4)
    ckpt = checkpoint.load(tmp_path / "ppo" / "ckpt.pt")
    assert ckpt["chat"] == "hh" and ckpt["hf_tokenizer"] == hf.tokenizer_texts(str(FIXTURE))

    # the one-GPU options: the value head on the policy's trunk, the frozen models in bf16;
    # a resume continues with the head, and one with the other kind of value model is refused
    shared = [f"--init_from={tmp_path / 'sft'}", f"--reward_from={tmp_path / 'rm'}",
              f"--data={prompts}", f"--out_dir={tmp_path / 'ppo_shared'}", "--batch_size=4",
              "--minibatch_size=2", "--ppo_epochs=1", "--max_new_tokens=4",
              "--value_head=shared", "--frozen_dtype=bf16"]
    main_of(ppo, [*shared, "--iterations=2"])
    out = capsys.readouterr().out
    assert "value head shared, frozen models in bf16" in out
    ckpt = checkpoint.load(tmp_path / "ppo_shared" / "ckpt.pt")
    assert "value_model" not in ckpt and ckpt["value_head"]["weight"].abs().sum() > 0
    assert set(ckpt["model"]) == set(checkpoint.load(tmp_path / "ppo" / "ckpt.pt")["model"])
    main_of(ppo, [*shared, "--iterations=3", "--resume=true"])
    assert [r["step"] for r in read_log(tmp_path / "ppo_shared" / "log.jsonl")] == [0, 1, 2]
    assert_user_error_in_process(capsys, ppo, *shared[:-2], "--iterations=4", "--resume=true",
                                 needles=["written with --value_head=shared"])

    # GRPO on them too, the reward model (in bf16, as the reference) scoring each group
    main_of(grpo, [f"--init_from={tmp_path / 'sft'}", f"--reward_from={tmp_path / 'rm'}",
                   "--reward=model", f"--data={prompts}", f"--out_dir={tmp_path / 'grpo'}",
                   "--iterations=2", "--batch_size=8", "--group_size=4", "--max_new_tokens=4",
                   "--dynamic_sampling=false", "--frozen_dtype=bf16"])
    log = read_log(tmp_path / "grpo" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1] and "gold/score" not in log[0]
    assert checkpoint.load(tmp_path / "grpo" / "ckpt.pt")["chat"] == "hh"

    # eval on the same prompts, the reward model as the judge (no gold scorer there)
    main_of(evaluation, [f"--data={prompts}", f"--judge_from={tmp_path / 'rm'}",
                         f"--models={tmp_path / 'sft'},{tmp_path / 'ppo'}",
                         f"--out={tmp_path / 'report'}", "--max_new_tokens=4"])
    report = (tmp_path / "report" / "report_judged.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 2
    assert rows[0].split(" | ")[2:4] == ["50.0%", "0.00"]  # the reference against itself
    assert "## Answers side by side" in report and "(judge " in report


def test_world_model_on_a_file_of_your_own(pipeline, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": f"{i + 1}."})
                            + "\n" for i in range(8)))
    main_of(sft, [f"--data_dir={pipeline.data}", f"--init_from={pipeline.out / 'pretrain'}",
                  f"--data={data}", f"--out_dir={tmp_path / 'sft'}", *STEPS])
    assert "SFT file, read 8;" in capsys.readouterr().out
    assert "hf_tokenizer" not in checkpoint.load(tmp_path / "sft" / "ckpt.pt")


@pytest.mark.parametrize("rows, needle", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}],
     "the world's chat format holds one user question"),
    ([{"prompt": "q", "response": "a"}], "1 usable demonstration(s)"),
])
def test_own_data_refusals(pipeline, tmp_path, capsys, rows, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_user_error_in_process(capsys, sft, f"--data_dir={pipeline.data}",
                                 f"--init_from={pipeline.out / 'pretrain'}", f"--data={data}",
                                 f"--out_dir={tmp_path / 'sft'}", *STEPS, needles=(needle,))


def test_rl_on_your_prompts_refuses_what_needs_the_world(capsys, tmp_path):
    for module, flags in ((ppo, ["--reward=verifiable"]), (ppo, ["--ptx_coef=0.5"]),
                          (grpo, ["--reward=sum"]), (grpo, ["--reward=model", "--ptx_coef=1"])):
        assert_user_error_in_process(capsys, module, f"--data={tmp_path / 'p.jsonl'}",
                                     f"--out_dir={tmp_path / 'o'}", *flags,
                                     needles=["need the world", flags[-1]])
    assert not (tmp_path / "o").exists()


def test_eval_on_your_prompts_needs_models_and_a_judge(capsys, tmp_path):
    assert_user_error_in_process(capsys, evaluation, f"--data={tmp_path / 'p.jsonl'}",
                                 f"--out={tmp_path / 'o'}", needles=["--models", "--judge_from"])
    assert not (tmp_path / "o").exists()


def test_reward_and_dpo_straight_from_a_gpt2_directory(tmp_path, capsys):
    """--init_from takes a GPT-2 directory in every stage, not only in sft.py."""
    data = hh_file(tmp_path / "hh.jsonl")
    main_of(reward, [f"--init_from={FIXTURE}", f"--data={data}", f"--out_dir={tmp_path / 'rm'}",
                     "--norm_prompts=4", "--max_new_tokens=4", *STEPS])
    main_of(dpo, [f"--init_from={FIXTURE}", f"--data={data}", f"--out_dir={tmp_path / 'dpo'}",
                  "--kl_prompts=2", "--max_new_tokens=4", *STEPS])
    for stage in ("rm", "dpo"):
        ckpt = checkpoint.load(tmp_path / stage / "ckpt.pt")
        assert ckpt["chat"] == "hh" and ckpt["init_from"] == str(FIXTURE)
        assert ckpt["hf_tokenizer"] == hf.tokenizer_texts(str(FIXTURE))
    assert read_log(tmp_path / "dpo" / "log.jsonl")[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
