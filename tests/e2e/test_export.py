"""export.py on the tiny pipeline's models: the directory it writes reads back through
hf.py into the same model, in GPT-2's layout. (transformers' own reading of it is checked
by bench/check_hf_export.py, outside the suite: figures in RESULTS.md.)"""

import json

import pytest
import torch
from conftest import assert_user_error_in_process, main_of

import export
import hf
from checkpoint import load_model
from records import world_tokenizer


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_export_reads_back_as_the_same_model(pipeline, tmp_path, stage):
    out = tmp_path / stage
    main_of(export, [f"--from={pipeline.out / stage}", f"--to={out}",
                     f"--data_dir={pipeline.data}"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    enc = world_tokenizer(pipeline.data)
    ours, _ = load_model(pipeline.out / stage / "ckpt.pt", "x", enc)
    theirs, tok = hf.from_pretrained(str(out))
    x = torch.randint(0, enc.n_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x)[0], ours(x)[0], atol=1e-5, rtol=1e-5)
    # GPT-2's layout: Conv1D matrices (in, out), biases present (zeros: trained without)
    sd = hf.read_safetensors(out / "model.safetensors")
    C = ours.config.n_embd
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)
    assert not sd["transformer.h.0.attn.c_attn.bias"].any() and "lm_head.weight" not in sd
    # the tokenizer: the same ranks and special tokens; tokenizer.json keeps the
    # world's own pre-tokenizer regex (GPT-2's would merge digits)
    assert tok._mergeable_ranks == enc._mergeable_ranks
    assert tok._special_tokens == enc._special_tokens
    fast = json.loads((out / "tokenizer.json").read_text())
    assert fast["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == enc._pat_str
    assert len(fast["model"]["merges"]) == len(enc._mergeable_ranks) - 256
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["eos_token_id"] == \
        enc.encode_single_token("<|end|>")


def test_recover_merges_by_hand():
    # ranks: the bytes a, b, c, then "ab" (3), "abc" (4), "bc" (5): "abc" is ab + c,
    # since bc came later
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert export.recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]


def test_export_refuses_in_one_line(pipeline, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert_user_error_in_process(capsys, export, f"--from={pipeline.out / 'sft'}",
                                 f"--to={busy}", f"--data_dir={pipeline.data}",
                                 needles=("--to=", "is not an empty directory"))
    assert_user_error_in_process(capsys, export, f"--from={tmp_path / 'nothing'}",
                                 f"--to={tmp_path / 'x'}", f"--data_dir={pipeline.data}",
                                 needles=("ckpt.pt not found",))
    assert_user_error_in_process(capsys, export, f"--from={pipeline.out / 'reward'}",
                                 f"--to={tmp_path / 'y'}", f"--data_dir={pipeline.data}",
                                 needles=("reward-model checkpoint",))
    assert_user_error_in_process(capsys, export, f"--from={pipeline.out / 'sft'}",
                                 f"--to={busy / 'x' / 'z'}", f"--data_dir={pipeline.data}",
                                 needles=("--to=", "z: cannot write in", "busy/x ("))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no partial directory left
