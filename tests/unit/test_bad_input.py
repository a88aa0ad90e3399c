"""Bad input, run in-process: each stage's main() inside cli.user_errors(), as its
__main__ block runs it. A mistake the user can fix ends with one line on stderr naming
the file, line or flag, exit status 2, no traceback, and nothing written. The
checkpoints are untrained ones in each stage's format (the `stages` fixture);
tests/cli/test_errors.py sends a few of these cases through a real process."""

import io
import json
import shutil

import pytest
import torch
from conftest import assert_user_error_in_process, copy_world, main_of

import dpo
import eval as evaluation
import grpo
import ppo
import pretrain
import reward
import sft
from data import prepare


def edited_world(world, tmp, name, edit):
    """A copy of the world with one file rewritten by edit(text) -> text (or bytes)."""
    bad = copy_world(world, tmp / "bad")
    out = edit((bad / name).read_text())
    (bad / name).write_bytes(out if isinstance(out, bytes) else out.encode())
    return bad


def edited_checkpoint(src, tmp, edit):
    """A copy of a stage folder whose ckpt.pt bytes were rewritten by edit(bytes)."""
    d = tmp / "ckpt_copy"
    d.mkdir()
    (d / "ckpt.pt").write_bytes(edit((src / "ckpt.pt").read_bytes()))
    return d


def first_record_with(text, **fields):
    rec = json.loads(text.splitlines()[0])
    rec.update(fields)
    return json.dumps(rec) + "\n"


class Pickled:  # a checkpoint carrying this object would run code on a plain torch.load
    pass


def pickled_checkpoint(_):
    buf = io.BytesIO()
    torch.save({"stage": "sft", "model": {}, "payload": Pickled()}, buf)
    return buf.getvalue()


def world_with(name, edit):
    """Flags of a world whose file `name` was edited (for the table below)."""
    return lambda w, s, t: f"--data_dir={edited_world(w, t, name, edit)}"


def sft_with(edit):
    """Flags of an SFT checkpoint whose bytes were edited (for the table below)."""
    return lambda w, s, t: f"--init_from={edited_checkpoint(s / 'sft', t, edit)}"


SFT_ARGS = ["--max_steps=2", "--batch_size=4"]
# name: (stage, flags given (world, stages, tmp), words the error line must hold)
BAD_INPUTS = {
    "truncated jsonl": (sft, lambda w, s, t: [
        world_with("sft_train.jsonl", lambda x: x[:-40])(w, s, t), f"--init_from={s}/pretrain"],
        ["sft_train.jsonl:", "malformed JSON"]),
    "wrong field type": (sft, lambda w, s, t: [
        world_with("sft_train.jsonl", lambda x: first_record_with(x, prompt=5))(w, s, t),
        f"--init_from={s}/pretrain"],
        ["sft_train.jsonl:1", "field 'prompt' should be str, got int"]),
    "not an object": (dpo, lambda w, s, t: [
        world_with("prefs_train.jsonl", lambda x: "[1, 2]\n" + x)(w, s, t), f"--init_from={s}/sft"],
        ["prefs_train.jsonl:1", "expected a JSON object"]),
    "not utf-8": (reward, lambda w, s, t: [
        world_with("prefs_train.jsonl", lambda x: x.encode() + b"\xff\xfe{}")(w, s, t),
        f"--init_from={s}/sft", "--prefs=prefs"], ["prefs_train.jsonl:", "not UTF-8"]),
    "empty demonstrations": (sft, lambda w, s, t: [
        world_with("sft_train.jsonl", lambda x: "")(w, s, t), f"--init_from={s}/pretrain"],
        ["sft_train.jsonl", "no records"]),
    "empty prompts": (ppo, lambda w, s, t: [
        world_with("prompts_train.jsonl", lambda x: "")(w, s, t), f"--init_from={s}/sft",
        f"--reward_from={s}/reward"], ["prompts_train.jsonl", "no records"]),
    "empty eval prompts": (evaluation, lambda w, s, t: [
        world_with("eval.jsonl", lambda x: "")(w, s, t), f"--out={s}"],
        ["eval.jsonl", "no records"]),
    "truncated checkpoint": (ppo, lambda w, s, t: [
        f"--data_dir={w}", sft_with(lambda b: b[:len(b) // 2])(w, s, t),
        f"--reward_from={s}/reward"], ["ckpt.pt", "not a loadable checkpoint"]),
    "corrupted checkpoint": (dpo, lambda w, s, t: [
        f"--data_dir={w}", sft_with(lambda b: bytes(len(b)))(w, s, t)],
        ["ckpt.pt", "not a loadable checkpoint"]),
    "pickled object in checkpoint": (sft, lambda w, s, t: [
        f"--data_dir={w}", sft_with(pickled_checkpoint)(w, s, t)],
        ["ckpt.pt", "not a loadable checkpoint"]),
    "checkpoint of another stage": (dpo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/reward"],
        ["reward-model checkpoint", "not a language model"]),
    "checkpoint file named, not its folder": (dpo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/sft/ckpt.pt"],
        ["sft/ckpt.pt is a file: name the folder that holds it", "not the file"]),
    "nothing to resume": (sft, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/pretrain", "--resume=true"],
        ["ckpt.pt not found: nothing to resume", "without --resume=true"]),
    "answers as long as the context": (ppo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/sft", f"--reward_from={s}/reward",
        "--max_new_tokens=100000"], ["--max_new_tokens=100000 leaves no room for a prompt"]),
    "negative learning rate": (sft, lambda w, s, t: [f"--data_dir={w}", "--learning_rate=-1e-4"],
                               ["--learning_rate=-1e-4", "must be above 0"]),
    "unknown optimizer": (pretrain, lambda w, s, t: [f"--data_dir={w}", "--optimizer=sgd"],
                          ["--optimizer=sgd", "expected muon or adamw"]),
    "zero interval": (pretrain, lambda w, s, t: [f"--data_dir={w}", "--log_interval=0"],
                      ["--log_interval=0", "must be at least 1"]),
    "nan coefficient": (ppo, lambda w, s, t: [f"--data_dir={w}", "--kl_coef=nan"],
                        ["--kl_coef=nan", "finite"]),
    "negative coefficient": (ppo, lambda w, s, t: [f"--data_dir={w}", "--ptx_coef=-1"],
                             ["--ptx_coef=-1", "must be at least 0"]),
    "heads do not split the width": (pretrain, lambda w, s, t: [
        f"--data_dir={w}", "--n_embd=30", "--n_head=4"], ["--n_embd=30", "--n_head=4"]),
    "fraction out of range": (ppo, lambda w, s, t: [f"--data_dir={w}", "--lam=1.5"],
                              ["--lam=1.5", "must be between 0 and 1"]),
    "unknown loss": (dpo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/sft", "--loss=dpo2"],
        ["--loss=dpo2", "expected one of"]),
    "your models without your prompts": (evaluation, lambda w, s, t: [
        f"--data_dir={w}", f"--out={s}", f"--models={s}/sft"],
        ["--models is for your own prompts: give them with --data"]),
    "a reference that is not there": (evaluation, lambda w, s, t: [
        f"--data_dir={w}", f"--out={s}", "--reference=dpoo"],
        ["--reference=dpoo:", "dpoo/ckpt.pt not found"]),
    "a reference not among your models": (evaluation, lambda w, s, t: [
        f"--data={w}/eval.jsonl", f"--out={t}/o", f"--models={s}/sft", f"--judge_from={s}/reward",
        "--reference=ppo"], ["--reference=ppo is not one of --models="]),
    "a preference set that is not there": (dpo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/sft", "--prefs=prefs,prefs_sftt"],
        ["--prefs=prefs,prefs_sftt names no preference set 'prefs_sftt'", "(there: prefs"]),
    "bad list": (evaluation, lambda w, s, t: [f"--data_dir={w}", f"--out={s}", "--best_of=1,four"],
                 ["--best_of=1,four", "comma-separated int"]),
    "bad device": (reward, lambda w, s, t: [f"--data_dir={w}", "--device=tpu"], ["--device=tpu"]),
    # settings that would train nothing, or divide by zero
    "zero learning rate": (sft, lambda w, s, t: [f"--data_dir={w}", "--learning_rate=0"],
                           ["--learning_rate=0", "must be above 0", "train nothing"]),
    "nll term with orpo": (dpo, lambda w, s, t: [f"--data_dir={w}", "--loss=orpo",
                                                 "--nll_coef=1"],
                           ["--nll_coef=1.0 with --loss=orpo", "orpo has its own"]),
    "dpo beta 0": (dpo, lambda w, s, t: [f"--data_dir={w}", "--beta=0"],
                   ["--beta=0.0", "dpo loss is then constant"]),
    "ipo beta 0": (dpo, lambda w, s, t: [f"--data_dir={w}", "--loss=ipo", "--beta=0"],
                   ["--beta=0.0", "ipo loss divides by β"]),
    "kto beta 0": (dpo, lambda w, s, t: [f"--data_dir={w}", "--loss=kto", "--beta=0"],
                   ["--beta=0.0", "kto loss is then constant"]),
    "simpo beta 0": (dpo, lambda w, s, t: [f"--data_dir={w}", "--loss=simpo", "--simpo_beta=0"],
                     ["--simpo_beta=0.0", "trains nothing"]),
    "cdpo smoothing of a half": (dpo, lambda w, s, t: [
        f"--data_dir={w}", "--loss=cdpo", "--label_smoothing=0.5"],
        ["--label_smoothing=0.5", "below 0.5"]),
    "kto weights both 0": (dpo, lambda w, s, t: [
        f"--data_dir={w}", "--loss=kto", "--kto_desirable_weight=0", "--kto_undesirable_weight=0"],
        ["--kto_desirable_weight=0", "trains nothing"]),
    # a flag the run would ignore without a word (more in IGNORED_FLAGS, below)
    "reward's --prefs with --data": (reward, lambda w, s, t: [
        f"--data_dir={w}", f"--data={t}/pairs.jsonl", "--prefs=prefs"],
        ["--prefs=prefs does nothing with --data"]),
    "eval's --best_of with --data": (evaluation, lambda w, s, t: [
        f"--data={t}/prompts.jsonl", f"--models={s}/sft", f"--judge_from={s}/reward",
        "--best_of=4"], ["--best_of=4 does nothing with --data (the stages compared are --models"]),
    "adaptive KL target 0": (ppo, lambda w, s, t: [
        f"--data_dir={w}", "--adaptive_kl=true", "--target_kl=0"],
        ["--target_kl=0.0", "--adaptive_kl=true", "above 0"]),
    "adaptive KL from a beta of 0": (ppo, lambda w, s, t: [
        f"--data_dir={w}", "--adaptive_kl=true", "--kl_coef=0"],
        ["--kl_coef=0", "--adaptive_kl=true", "would stay 0"]),
    "clip range 0": (ppo, lambda w, s, t: [f"--data_dir={w}", "--clip_range=0"],
                     ["--clip_range=0", "must be above 0"]),
    "unknown value head": (ppo, lambda w, s, t: [f"--data_dir={w}", "--value_head=tied"],
                           ["--value_head=tied", "separate or shared"]),
    "frozen models in fp16": (ppo, lambda w, s, t: [f"--data_dir={w}", "--frozen_dtype=fp16"],
                              ["--frozen_dtype=fp16", "fp32 or bf16"]),
    "dropout of 1": (pretrain, lambda w, s, t: [f"--data_dir={w}", "--dropout=1"],
                     ["--dropout=1", "below 1"]),
    "adam beta2 of 1": (reward, lambda w, s, t: [f"--data_dir={w}", "--beta2=1"],
                        ["--beta2=1", "below 1"]),
    "ptx window beyond the context": (ppo, lambda w, s, t: [
        f"--data_dir={w}", f"--init_from={s}/sft", f"--reward_from={s}/reward",
        "--ptx_coef=0.5", "--ptx_len=1000"], ["--ptx_len=1000", "the policy's context"]),
    # damaged data files, found before training starts
    "tokenizer cut short": (sft, lambda w, s, t: [
        world_with("tokenizer.tiktoken", lambda x: x[:len(x) // 2])(w, s, t),
        f"--init_from={s}/pretrain"], ["tokenizer.tiktoken:", "the tokenizer file is damaged"]),
    "tokenizer ranks not contiguous": (pretrain, lambda w, s, t: [
        world_with("tokenizer.tiktoken", lambda x: "".join(x.splitlines(True)[:5] +
                                                           x.splitlines(True)[6:]))(w, s, t)],
        ["tokenizer.tiktoken", "ranks are not 0..", "damaged"]),
    "tokenizer not text": (dpo, lambda w, s, t: [
        world_with("tokenizer.tiktoken", lambda x: b"\xff\xfe" + x.encode())(w, s, t),
        f"--init_from={s}/sft"],
        ["tokenizer.tiktoken", "can't decode", "damaged"]),
    "token stream of odd bytes": (pretrain, lambda w, s, t: [
        world_with_bytes("train.bin", lambda b: b[:7])(w, s, t)],
        ["train.bin: 7 bytes", "not a whole number of 2-byte tokens"]),
    "token stream too short": (pretrain, lambda w, s, t: [
        world_with_bytes("val.bin", lambda b: b[:20])(w, s, t)],
        ["val.bin holds 10 tokens", "fewer than", "python data/prepare.py --n_docs=N"]),
    "token id beyond the vocabulary": (pretrain, lambda w, s, t: [
        world_with_bytes("train.bin", lambda b: b[:10] + b"\xff\xff" + b[12:])(w, s, t)],
        ["train.bin: token id 65535", "beyond the tokenizer's vocabulary"]),
    "token stream missing": (pretrain, lambda w, s, t: [
        world_without("val.bin")(w, s, t)], ["val.bin not found", "python data/prepare.py"]),
    "ptx token stream damaged": (ppo, lambda w, s, t: [
        world_with_bytes("train.bin", lambda b: b[:-1])(w, s, t), f"--init_from={s}/sft",
        f"--reward_from={s}/reward", "--ptx_coef=0.5"], ["train.bin", "2-byte tokens"]),
}

# flags a run would ignore without a word, refused in one line: the stage, the flags after
# --data_dir, the line
IGNORED_FLAGS = [
    (dpo, ["--loss=simpo", "--beta=0.5"], "--beta=0.5 does nothing with --loss=simpo"),
    (dpo, ["--loss=kto", "--length_groups=2"], "--length_groups=2 does nothing with --loss=kto"),
    (dpo, ["--val_fraction=0.2"], "--val_fraction=0.2 does nothing without --data"),
    (sft, ["--val_fraction=0.2"], "--val_fraction=0.2 does nothing without --data"),
    (ppo, ["--target_kl=1"], "--target_kl=1.0 does nothing without --adaptive_kl=true"),
    (ppo, ["--vf_coef=0.5"], "--vf_coef=0.5 does nothing with --value_head=separate"),
    (ppo, ["--reward=verifiable", "--reward_from=rm"],
     "--reward_from=rm does nothing with --reward=verifiable"),
    (ppo, ["--ptx_len=64"], "--ptx_len=64 does nothing with --ptx_coef=0"),
    (grpo, ["--dynamic_sampling=false", "--max_rounds=3"],
     "--max_rounds=3 does nothing with --dynamic_sampling=false"),
    (grpo, ["--beta=0", "--kl_in=reward"], "--kl_in=reward does nothing with --beta=0"),
    (grpo, ["--reward_from=rm"], "--reward_from=rm does nothing with --reward=verifiable"),
]
for stage, flags, line in IGNORED_FLAGS:
    BAD_INPUTS[f"{stage.__name__}: {line}"] = (
        stage, lambda w, s, t, flags=flags: [f"--data_dir={w}", *flags], [line])


def world_with_bytes(name, edit):
    """Flags of a world whose binary file `name` was rewritten by edit(bytes)."""
    def make(w, s, t):
        bad = copy_world(w, t / "bad")
        (bad / name).write_bytes(edit((bad / name).read_bytes()))
        return f"--data_dir={bad}"
    return make


def world_without(name):
    """Flags of a world without its file `name`."""
    def make(w, s, t):
        bad = copy_world(w, t / "bad")
        (bad / name).unlink()
        return f"--data_dir={bad}"
    return make


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(capsys, world, stages, tmp_path, case):
    stage, make_args, needles = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = make_args(world, stages, tmp_path)
    out_flag = [] if stage is evaluation else [f"--out_dir={out}"]
    extra = SFT_ARGS if stage is sft else []
    assert_user_error_in_process(capsys, stage, *args, *out_flag, *extra, needles=needles)
    assert not out.exists()  # nothing written


def test_bad_flags(capsys, world):
    assert_user_error_in_process(capsys, pretrain, "--max_stepz=3",
                                 needles=["--max_stepz", "unknown flag"])
    assert_user_error_in_process(capsys, sft, "--batch_size=many",
                                 needles=["--batch_size=many", "expected int"])
    assert_user_error_in_process(capsys, pretrain, f"--data_dir={world}", "--batch_size=7",
                                 "--grad_accum=2", needles=["--batch_size=7"])


def test_missing_inputs_name_the_command(capsys, tmp_path, world):
    assert_user_error_in_process(capsys, pretrain, f"--data_dir={tmp_path}/nothing",
                                 needles=["python data/prepare.py"])
    assert_user_error_in_process(capsys, sft, f"--data_dir={world}",
                                 f"--init_from={tmp_path}/none", needles=["python pretrain.py"])
    assert_user_error_in_process(capsys, evaluation, f"--data_dir={world}",
                                 f"--out={tmp_path}/empty", needles=["no checkpoints"])
    assert_user_error_in_process(capsys, reward, f"--data_dir={world}", f"--out_dir={tmp_path}/o",
                                 f"--init_from={tmp_path}/none", needles=["python sft.py"])
    assert not (tmp_path / "o").exists()


def test_pretrain_resumes_only_with_its_own_optimizer(capsys, world, stages, tmp_path):
    out = tmp_path / "pretrain"
    shutil.copytree(stages / "pretrain", out)  # saved with pretrain.py's default, muon
    saved = (out / "ckpt.pt").read_bytes()
    assert_user_error_in_process(capsys, pretrain, f"--data_dir={world}", f"--out_dir={out}",
                                 "--resume=true", "--optimizer=adamw",
                                 needles=["ckpt.pt: written with --optimizer=muon",
                                          "not adamw"])
    assert (out / "ckpt.pt").read_bytes() == saved


@pytest.mark.parametrize("resume", ["true", "false"])
@pytest.mark.parametrize("stage, other, flags", [
    (sft, "pretrain", ["--init_from={}/pretrain", *SFT_ARGS]), (pretrain, "sft", []),
    (reward, "sft", ["--init_from={}/sft", "--prefs=prefs"]),
    (ppo, "sft", ["--init_from={out}", "--reward_from={}/reward"])])  # its own input
def test_a_run_into_another_stages_folder_is_refused(capsys, world, stages, tmp_path, stage,
                                                     other, flags, resume):
    """Resumed or fresh, a run does not take over another stage's folder: a fresh one
    would write over that stage's model (ppo.py --out_dir=out/sft did, exit 0)."""
    out = tmp_path / "run"
    shutil.copytree(stages / other, out)
    saved = (out / "ckpt.pt").read_bytes()
    assert_user_error_in_process(capsys, stage, f"--data_dir={world}", f"--out_dir={out}",
                                 f"--resume={resume}",
                                 *(f.format(stages, out=out) for f in flags),
                                 needles=[f"holds a run of stage '{other}', "
                                          f"not '{stage.__name__}'", "choose another --out_dir"])
    assert (out / "ckpt.pt").read_bytes() == saved


def test_malformed_jsonl_names_file_and_line(capsys, world, stages, tmp_path):
    bad = copy_world(world, tmp_path / "bad")
    lines = (bad / "sft_train.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-5]  # truncate line 5
    (bad / "sft_train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sft_out"
    assert_user_error_in_process(capsys, sft, f"--data_dir={bad}",
                                 f"--init_from={stages}/pretrain", f"--out_dir={out}",
                                 needles=["sft_train.jsonl:5", "malformed JSON"])
    assert not out.exists()  # nothing written


def test_prompt_longer_than_context(capsys, world, stages, tmp_path):
    bad = copy_world(world, tmp_path / "long")
    rec = json.loads((bad / "sft_train.jsonl").read_text().splitlines()[0])
    rec["prompt"] = "What is " + " + ".join(["12"] * 200) + "?"
    (bad / "sft_train.jsonl").write_text(json.dumps(rec) + "\n")
    assert_user_error_in_process(capsys, sft, f"--data_dir={bad}",
                                 f"--init_from={stages}/pretrain", f"--out_dir={tmp_path}/o",
                                 needles=["sft_train.jsonl:1", "context of 160 tokens"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.pop("responses"), "missing field 'responses'"),
    (lambda r: r.update(ranking=[]), "'ranking' must order all"),
    (lambda r: r.update(responses=r["responses"][:1], ranking=[0]), "at least 2 responses"),
    (lambda r: r.update(ranking="0123"), "field 'ranking' should be list"),
], ids=["missing responses", "short ranking", "one response", "ranking not a list"])
def test_malformed_preference_records(capsys, world, stages, tmp_path, edit, needle):
    bad = copy_world(world, tmp_path / "bad")
    lines = (bad / "prefs_train.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    edit(rec)
    lines[2] = json.dumps(rec)
    (bad / "prefs_train.jsonl").write_text("\n".join(lines) + "\n")
    for stage in (reward, dpo):  # both read the rankings through records.load_rankings
        assert_user_error_in_process(capsys, stage, f"--data_dir={bad}",
                                     f"--init_from={stages}/sft", f"--out_dir={tmp_path}/o",
                                     "--prefs=prefs", needles=["prefs_train.jsonl:3", needle])
    assert not (tmp_path / "o").exists()


def test_checkpoint_from_another_tokenizer(capsys, stages, tmp_path):
    other = tmp_path / "other"
    main_of(prepare, [f"--out_dir={other}", "--n_docs=300", "--vocab_size=300", "--n_sft=8",
                      "--n_prefs=4", "--n_rl=4", "--n_eval=1", "--seed=5"])
    assert_user_error_in_process(capsys, sft, f"--data_dir={other}",
                                 f"--init_from={stages}/pretrain", f"--out_dir={tmp_path}/o",
                                 needles=["tokenizer"])
    assert_user_error_in_process(capsys, evaluation, f"--data_dir={other}", f"--out={stages}",
                                 needles=["tokenizer"])
    assert not (tmp_path / "o").exists()


def test_ppo_refuses_mismatched_inputs(capsys, world, stages, tmp_path):
    common = [f"--data_dir={world}", f"--out_dir={tmp_path}/o", "--iterations=1"]
    assert_user_error_in_process(capsys, ppo, *common, f"--init_from={stages}/reward",
                                 f"--reward_from={stages}/reward",
                                 needles=["reward-model checkpoint", "not a language model"])
    assert_user_error_in_process(capsys, ppo, *common, f"--init_from={stages}/sft",
                                 f"--reward_from={stages}/sft",
                                 needles=["not a finished reward-model checkpoint"])
    ck = torch.load(stages / "reward" / "ckpt.pt", weights_only=True)
    ck["tokenizer"] = "world-000000000000"
    (tmp_path / "rm").mkdir()
    torch.save(ck, tmp_path / "rm" / "ckpt.pt")
    assert_user_error_in_process(capsys, ppo, *common, f"--init_from={stages}/sft",
                                 f"--reward_from={tmp_path}/rm",
                                 needles=["tokenizer 'world-000000000000'"])
    assert_user_error_in_process(capsys, ppo, *common, f"--init_from={stages}/sft",
                                 f"--reward_from={stages}/reward", "--minibatch_size=5",
                                 needles=["--minibatch_size=5"])
    assert not (tmp_path / "o").exists()


def test_damaged_meta_json(capsys, world, stages, tmp_path):
    from data import label
    bad = edited_world(world, tmp_path, "meta.json", lambda x: x[:len(x) // 2])
    before = sorted(p.name for p in bad.iterdir())
    assert_user_error_in_process(capsys, label, f"--data_dir={bad}", f"--policy={stages}/sft",
                                 needles=["meta.json", "not the meta.json data/prepare.py writes"])
    assert sorted(p.name for p in bad.iterdir()) == before  # no rankings written


def test_labelling_round_with_nothing_to_rank(capsys, world, stages, tmp_path):
    """Greedy answers are K copies of one answer: no prompt has two to rank, and no empty
    sets are written."""
    from data import label
    w = copy_world(world, tmp_path / "w")
    before = sorted(p.name for p in w.iterdir())
    assert_user_error_in_process(capsys, label, f"--data_dir={w}", f"--policy={stages}/sft",
                                 "--temperature=0", "--n_prompts=4", "--name=greedy",
                                 needles=["0 of 4 prompts had two different answers",
                                          "--temperature=0 gives one answer K times"])
    assert sorted(p.name for p in w.iterdir()) == before


@pytest.mark.parametrize("name", ["sft", "prefs", "prompts", "a/b"])
def test_a_labelling_round_never_writes_over_the_worlds_sets(capsys, world, stages, tmp_path,
                                                             name):
    from data import label
    w = copy_world(world, tmp_path / "w")
    before = {p.name: p.read_bytes() for p in w.iterdir()}
    line = assert_user_error_in_process(capsys, label, f"--data_dir={w}", f"--policy={stages}/sft",
                                        "--n_prompts=4", f"--name={name}",
                                        needles=["--name=", name])
    assert ("world's own files" in line) == (name != "a/b")
    assert {p.name: p.read_bytes() for p in w.iterdir()} == before


def test_out_dir_that_cannot_be_made(capsys, world, stages, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "sft"
    assert_user_error_in_process(capsys, sft, f"--data_dir={world}",
                                 f"--init_from={stages}/pretrain", f"--out_dir={out}", *SFT_ARGS,
                                 needles=[f"--out_dir={out}", "cannot create the run folder",
                                          "Not a directory"])
    assert (tmp_path / "a_file").read_text() == ""


def test_drivers_refuse_their_flags_before_writing_anything(capsys, tmp_path):
    import iterate
    import overopt
    out = tmp_path / "out"
    assert_user_error_in_process(capsys, iterate, "--K=1", f"--out_dir={out}",
                                 needles=["--K=1: the raters rank at least 2 answers"])
    assert_user_error_in_process(capsys, overopt, "--ppo_flags=--kl_coeff=1", f"--out_dir={out}",
                                 needles=["--ppo_flags='--kl_coeff=1': --kl_coeff: unknown flag"])
    # a flag each run's command sets (it sent the runs' checkpoints elsewhere, then failed)
    assert_user_error_in_process(capsys, overopt, "--ppo_flags=--entropy_coef=0 --out_dir=x",
                                 f"--out_dir={out}", needles=["overopt.py sets --out_dir"])
    assert not out.exists()
