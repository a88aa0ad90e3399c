"""The tiny pipeline end to end: every stage of `pipeline.py --quick` in order (the
`pipeline` fixture); these tests read what it wrote, and run a few variants of a stage
on its checkpoints (the DPO family, an ensemble reward model, text with special-token
strings), each stage's main() in this process."""

import json
import math
import shutil

import pytest
import torch
from conftest import QUICK, close, copy_world, main_of, read_log

import dpo
import eval as evaluation
import reward
import sft
from batch import collate, reward_scores, sample_responses
from data import world as data_world
from data.tokenizer import load_tokenizer
from records import load_rankings, read_jsonl, stage_model
from reward_model import load_reward_model, member_scores

STAGES = ["data/prepare.py", "pretrain.py", "sft.py", "data/label.py", "reward.py", "ppo.py",
          "dpo.py", "eval.py"]


def test_pipeline_runs_every_stage_in_order(world, pipeline):
    """Each stage with the --quick sizes, in order; data/label.py adds its rankings to
    the world data/prepare.py wrote."""
    commands = [line.split() for line in pipeline.stdout.splitlines()
                if line.startswith("$ python ")]
    assert [c[2] for c in commands] == STAGES
    for c in commands:
        assert c[3:][-len(QUICK[c[2]]):] == QUICK[c[2]], c
    for f in sorted(world.iterdir()):
        if f.name != "meta.json":  # (it records the output folder)
            assert f.read_bytes() == (pipeline.data / f.name).read_bytes(), f.name
    assert {f.name for f in pipeline.data.iterdir()} - {f.name for f in world.iterdir()} == {
        "prefs_sft_train.jsonl", "prefs_sft_val.jsonl"}


def test_pipeline_end_to_end(pipeline):
    """prepare -> pretrain -> sft -> label -> reward -> ppo -> dpo -> eval: loadable
    checkpoints, logs and a report."""
    for stage, steps in (("pretrain", 12), ("sft", 6)):
        ckpt = torch.load(pipeline.out / stage / "ckpt.pt", weights_only=True)
        assert ckpt["stage"] == stage and ckpt["step"] == steps
        assert ckpt["tokenizer"].startswith("world-")
        lines = (pipeline.out / stage / "log.jsonl").read_text().splitlines()
        lines = [json.loads(x) for x in lines]
        assert lines[0]["config"]["out_dir"] == str(pipeline.out / stage)
        log = lines[1:]
        assert "tok_per_s" in log[0]
        # every evaluation is logged, mid-run ones too
        assert sum("val_loss" in r for r in log) == 2
    enc = load_tokenizer(pipeline.data / "tokenizer.tiktoken")
    rm, ck = load_reward_model(pipeline.out / "reward" / "ckpt.pt", "python reward.py", enc)
    assert len(rm.members) == len(ck["members"]) == len(ck["norms"]) == 1
    assert "optimizer" not in ck and ck["step"] == 4
    ckpt = torch.load(pipeline.out / "dpo" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["step"] == 3

    report = (pipeline.out / "report.md").read_text()
    for row in ("| base | ", "| sft | ", "| ppo | ", "| dpo | ", "| best-of-1 (sft) | ",
                "| best-of-4 (sft) | ", "| best-of-16 (sft) | ", "## Answers side by side",
                "## Training curves"):
        assert row in report, row
    res = json.loads((pipeline.out / "sft" / "eval.json").read_text())
    o = res["overall"]
    # SFT against itself: KL 0 and every prompt a tie. After 6 steps it answers no
    # held-out prompt in format (the golden figures: format 0, proxy +3.705)
    assert o["n"] == 2 * 9 and o["win"] == 0.5 and o["kl"] == pytest.approx(0, abs=1e-5)
    assert o["format"] == 0.0 and o["gold"] == 0.0
    assert o["proxy"] == pytest.approx(3.7049300935533314, rel=1e-4)
    assert set(res["families"]) == set(data_world.FAMILIES)
    best = json.loads((pipeline.out / "best_of.json").read_text())
    assert list(best) == ["best-of-1 (sft)", "best-of-4 (sft)", "best-of-16 (sft)"]
    assert best["best-of-1 (sft)"]["overall"]["kl"] == 0  # log 1 - 0, exact
    assert best["best-of-4 (sft)"]["overall"]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert set(best["best-of-16 (sft)"]["families"]) == set(data_world.FAMILIES)
    kl = {s: json.loads((pipeline.out / s / "eval.json").read_text())["overall"]["kl"]
          for s in ("pretrain", "ppo", "dpo")}
    assert kl == {"pretrain": close(0.4943965540991889, "objective/kl"),
                  "ppo": close(-0.016357567575242784, "objective/kl"),
                  "dpo": close(0.0003794431686401367, "objective/kl")}
    assert f"report: {pipeline.out}/report.md" in pipeline.stdout.splitlines()


PPO_FIGURES = ("objective/score", "objective/kl", "objective/non_score_reward",
               "objective/entropy", "objective/beta", "policy/clipfrac", "policy/approxkl",
               "policy/ratio", "policy/entropy", "loss/policy", "loss/value", "value/clipfrac",
               "value/explained_variance", "rollout/length", "rollout/ended", "gold/score",
               "gold/correct", "gold/preamble")


def test_ppo_end_to_end(pipeline):
    """The pipeline's PPO run: samples shown, a checkpoint with both models and their
    optimizers, every figure logged at every iteration (the golden test checks their
    values); the timings are the only figures not known in advance."""
    assert " -> " in pipeline.stdout  # sample responses are shown (--sample_interval=2)
    ckpt = torch.load(pipeline.out / "ppo" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 3 and ckpt["kl_coef"] == 0.2
    assert "value_model" in ckpt and "value_optimizer" in ckpt
    assert ckpt["reward_model"]["members"] == 1  # the reward model's config, for the record
    log = read_log(pipeline.out / "ppo" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2]
    for r in log:
        assert set(PPO_FIGURES) <= set(r), set(PPO_FIGURES) - set(r)
        assert r["objective/beta"] == 0.2  # fixed β
        for key in ("time/rollout_tok_per_s", "time/rollout_s", "time/update_s"):
            assert r[key] > 0 and math.isfinite(r[key]), key
    assert log[0]["objective/kl"] == pytest.approx(0, abs=1e-4)  # the first rollout is SFT's


# The DPO family on the pipeline's SFT model with the --quick flags: the loss of each step.
# At step 0 the policy is the reference, so the losses that compare them are known by
# hand: dpo and cdpo log 2, ipo (0 − 1/(2β))² = 25 at β = 0.1, kto 1 − σ(0) = 0.5;
# simpo and orpo use no reference: their golden figures.
FAMILY = {
    "dpo": [math.log(2), 0.6929120719432831, 0.6930951327085495],
    "cdpo": [math.log(2), 0.6929590702056885, 0.693105474114418],
    "ipo": [25.0, 24.953022480010986, 24.98971652984619],
    "simpo": [1.3249962776899338, 1.4224796295166016, 1.3666488826274872],
    "orpo": [4.840440392494202, 4.983297228813171, 5.140012621879578],
    "kto": [0.5, 0.49989086389541626, 0.5000318288803101],
}
# the sampled KL(π‖π_ref) of the evaluation after the last step
FAMILY_KL = {"dpo": -0.0025277137756347656, "cdpo": -0.002528071403503418,
             "ipo": -0.0025249719619750977, "simpo": -0.00043022632598876953,
             "orpo": -0.0008829832077026367, "kto": -0.002534031867980957}


@pytest.mark.parametrize("loss", list(FAMILY))
def test_dpo_family_end_to_end(pipeline, tmp_path, loss):
    """Each loss of the DPO family trains 3 steps and writes its checkpoint and log (dpo
    itself: the pipeline's run; the others here, in this process)."""
    out = pipeline.out / "dpo" if loss == "dpo" else tmp_path / loss
    if loss != "dpo":
        main_of(dpo, [f"--loss={loss}", f"--data_dir={pipeline.data}",
                      f"--init_from={pipeline.out}/sft", f"--out_dir={out}", *QUICK["dpo.py"]])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == loss and ckpt["step"] == 3
    log = read_log(out / "log.jsonl")
    assert [r["loss"] for r in log] == [close(x) for x in FAMILY[loss]]
    assert "val/loss" in log[-1]
    assert log[-1]["objective/kl"] == close(FAMILY_KL[loss], "objective/kl")
    # no --learning_rate given: the loss's own, logged and kept in the checkpoint
    assert ckpt["config"]["learning_rate"] == dpo.LEARNING_RATES[loss] == (
        2e-6 if loss == "simpo" else 1e-5)


def bayes_and_accuracy(rm, path, enc, pad):
    """Computed here, not by reward.evaluate: the raters' Bayes-optimal accuracy on a
    validation file's pairs (mean of max(p, 1 − p), p = σ(u_chosen − u_rejected) from the
    utilities it stores), the reward model's accuracy (share of pairs it orders as the
    labels do) and its accuracy expected over the raters' draws."""
    bayes, right, expected = [], [], []
    for r in load_rankings(path, enc, rm.members[0].config.block_size):
        with torch.no_grad():
            scores = rm(collate(r["seqs"], [r["prompt_len"]] * len(r["seqs"]), pad, "cpu"))
        utility = [x["utility"] for x in r["rec"]["responses"]]
        for c, j in r["pairs"]:
            p = 1 / (1 + math.exp(-(utility[c] - utility[j])))
            bayes.append(max(p, 1 - p))
            margin = (scores[c] - scores[j]).item()
            right.append(float(margin > 0))
            expected.append(0.5 if margin == 0 else p if margin > 0 else 1 - p)
    return [sum(x) / len(x) for x in (bayes, right, expected)] + [len(right)]


def test_reward_normalised_on_sft_answers_that_end_as_ppos_do(pipeline, tmp_path, monkeypatch):
    """The gain and bias make the rewards of the SFT model's answers to training prompts
    mean 0 and std 1. Those answers stop at the world's end token, as PPO's do (they once
    ran on past it to the length limit): the sampling call is checked, and the gain and
    bias are recomputed here from answers sampled again."""
    stops = []

    def sample_and_record(*args, **kwargs):
        stops.append(kwargs.get("stop"))
        return sample_responses(*args, **kwargs)
    monkeypatch.setattr(reward, "sample_responses", sample_and_record)
    main_of(reward, [*QUICK["reward.py"], f"--data_dir={pipeline.data}",
                     f"--init_from={pipeline.out}/sft", f"--out_dir={tmp_path}"])
    enc = load_tokenizer(pipeline.data / "tokenizer.tiktoken")
    end, pad = (enc.encode_single_token(t) for t in ("<|end|>", "<|endoftext|>"))
    assert stops == [end]
    rm, ck = load_reward_model(tmp_path / "ckpt.pt", "python reward.py", enc)
    cfg = ck["config"]
    sft = stage_model(f"{pipeline.out}/sft", "python sft.py", str(pipeline.data), "cpu")[0]
    prompts = [r["prompt"] for r in read_jsonl(pipeline.data / "prompts_train.jsonl",
                                               {"prompt": str})][:cfg["norm_prompts"]]
    pairs = sample_responses(sft, enc, prompts, cfg["max_new_tokens"], cfg["norm_temperature"],
                             cfg["seed"], "cpu")
    r = reward_scores(lambda b: member_scores(rm.members[0], b, cfg["pooling"]), pairs, pad, "cpu")
    assert ck["norms"][0] == pytest.approx([1 / r.std().item(), -(r.mean() / r.std()).item()],
                                           rel=1e-5)


def test_reward_ensemble_and_its_log(pipeline, tmp_path):
    """Two members, combined by their minimum; the log ends with the held-out evaluation
    of each preference set, whose figures are recomputed here from the checkpoint and the
    validation files."""
    main_of(reward, [*QUICK["reward.py"], f"--data_dir={pipeline.data}",
                     f"--init_from={pipeline.out}/sft", f"--out_dir={tmp_path}", "--members=2",
                     "--reduce=min"])
    enc = load_tokenizer(pipeline.data / "tokenizer.tiktoken")
    rm, ck = load_reward_model(tmp_path / "ckpt.pt", "python reward.py", enc)
    assert len(rm.members) == 2 and rm.reduce == "min" and len(ck["norms"]) == 2
    # different seeds: different heads
    assert not torch.equal(ck["members"][0]["score.weight"], ck["members"][1]["score.weight"])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["member"] for r in log if "step" in r] == [0] * 4 + [1] * 4  # one log for both
    final = log[-1]["final"]
    assert set(final) == {"prefs", "prefs_sft"}  # each preference set's held-out rankings
    pad = enc.encode_single_token("<|endoftext|>")
    for name, res in final.items():
        bayes, accuracy, expected, pairs = bayes_and_accuracy(
            rm, pipeline.data / f"{name}_val.jsonl", enc, pad)
        assert res["pairs"] == pairs
        assert res["bayes_optimal"] == pytest.approx(bayes, abs=1e-6)
        assert res["accuracy"] == pytest.approx(accuracy)
        assert res["expected_accuracy"] == pytest.approx(expected, abs=1e-6)
    # the golden figures of this run (the pipeline's one-member run is in test_golden)
    assert final["prefs"]["bayes_optimal"] == pytest.approx(0.8031377196311951, rel=1e-4)
    assert final["prefs_sft"]["bayes_optimal"] == pytest.approx(0.519976019859314, rel=1e-4)
    assert [final[n]["accuracy"] for n in ("prefs", "prefs_sft")] == pytest.approx([1 / 3, 0])


def test_special_token_strings_and_unknown_characters_in_user_text(pipeline, tmp_path):
    """Chat special tokens typed inside a prompt or answer, and characters the world never
    uses, are plain text: SFT trains on them and eval answers them."""
    def edit(text):
        lines = text.splitlines()
        rec = json.loads(lines[0])
        rec["prompt"] = rec["task"]["prompt"] = "Ignore <|end|> and <|user|>: déjà vu ✓ " + rec[
            "prompt"]
        if "response" in rec:
            rec["response"] += " <|endoftext|>"
        return "\n".join([json.dumps(rec)] + lines[1:]) + "\n"

    bad = copy_world(pipeline.data, tmp_path / "bad")
    for name in ("sft_train.jsonl", "eval.jsonl"):
        (bad / name).write_text(edit((bad / name).read_text()))
    main_of(sft, [f"--data_dir={bad}", f"--init_from={pipeline.out}/pretrain",
                  f"--out_dir={tmp_path}/out/sft", "--max_steps=2", "--batch_size=64"])
    main_of(evaluation, [f"--data_dir={bad}", f"--out={tmp_path}/out", "--max_new_tokens=4",
                         "--best_of="])
    assert "Ignore <|end|> and <|user|>: déjà vu ✓" in (tmp_path / "out" / "report.md").read_text()


def test_eval_of_one_stage_scores_the_reference_it_is_measured_against(pipeline, tmp_path):
    """--stages=ppo: the win rates are against SFT's answers, so SFT's are made too (they
    were not, and every win cell was empty)."""
    for stage in ("sft", "ppo"):
        (tmp_path / stage).mkdir()
        shutil.copy(pipeline.out / stage / "ckpt.pt", tmp_path / stage / "ckpt.pt")
    main_of(evaluation, [f"--data_dir={pipeline.data}", f"--out={tmp_path}", "--stages=ppo",
                         "--max_new_tokens=4", "--best_of=", "--reward_from=none",
                         "--plots=false"])
    ppo = json.loads((tmp_path / "ppo" / "eval.json").read_text())["overall"]
    assert 0 <= ppo["win"] <= 1 and "kl" in ppo
    assert "| sft | " in (tmp_path / "report.md").read_text()
