"""hf.py: the safetensors reader and writer, GPT-2's weights and tokenizer. The
fixture tests/fixtures/gpt2-tiny was written once by transformers and tokenizers
(its make.py says how); the project's code must give the numbers they gave."""

import io
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import hf
from cli import UserError
from model import GPT, GPTConfig

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpt2-tiny"


def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


# --- safetensors ------------------------------------------------------------------------------


def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.randn(7).half(),
               "e": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        hf.write_safetensors(tensors, f, metadata={"format": "pt"})
    back = hf.read_safetensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_safetensors_layout_by_hand(tmp_path):
    # one float32 tensor [1.0, 2.0]: the header is JSON after an 8-byte length, the data
    # starts 8-byte aligned, and its bytes are the little-endian floats
    buf = io.BytesIO()
    hf.write_safetensors({"x": torch.tensor([1.0, 2.0])}, buf)
    raw = buf.getvalue()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert json.loads(raw[8:8 + n]) == {"x": {"dtype": "F32", "shape": [2],
                                              "data_offsets": [0, 8]}}
    assert raw[8 + n:] == struct.pack("<2f", 1.0, 2.0)


def damaged(tmp_path, header, data=b"\0" * 8, n=None):
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "bad.safetensors").write_bytes(b"\1\2") and p / "bad.safetensors",
     "shorter than its 8-byte header length"),
    (lambda p: damaged(p, {}, n=1 << 40), "damaged safetensors file"),
    (lambda p: (p / "bad.safetensors").write_bytes(struct.pack("<Q", 3) + b"{no")
     and p / "bad.safetensors", "damaged safetensors header"),
    (lambda p: damaged(p, [1, 2]), "not a JSON object"),
    (lambda p: damaged(p, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
     "does not fit its bytes"),
    (lambda p: damaged(p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
     "does not fit its bytes"),
    (lambda p: damaged(p, {"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}),
     "damaged entry"),
    (lambda p: damaged(p, {"x": {"dtype": "F32", "shape": [2]}}), "damaged entry"),
    (lambda p: damaged(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                           "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}),
     "overlap"),
    (lambda p: p / "missing.safetensors", "No such file"),
])
def test_damaged_safetensors_one_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        hf.read_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- GPT-2 weights against transformers' numbers ------------------------------------------------


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_logits_and_greedy_equal_transformers(tmp_path, weights):
    d = tmp_path / "gpt2"
    d.mkdir()
    for f in ("config.json", "vocab.json", "merges.txt", weights):
        shutil.copy(FIXTURE / f, d / f)
    model, _ = hf.from_pretrained(str(d))
    exp = expected()
    with torch.no_grad():
        logits = model(torch.tensor([exp["input_ids"]]))[0][0]
    assert (logits - torch.tensor(exp["logits"])).abs().max().item() < 1e-4
    out, _ = model.generate([exp["prompt_ids"]], len(exp["greedy"]), temperature=0.0)
    assert out[0].tolist() == exp["greedy"]


def test_the_hubs_older_layout_loads_the_same(tmp_path):
    # the original GPT-2 files: names without "transformer.", the causal-mask buffers
    # h.N.attn.bias (and masked_bias) stored, no lm_head.weight
    d = tmp_path / "old"
    d.mkdir()
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(FIXTURE / f, d / f)
    sd = {k.removeprefix("transformer."): v
          for k, v in hf.read_safetensors(FIXTURE / "model.safetensors").items()}
    n_layer, n_pos = (json.loads((d / "config.json").read_text())[k]
                      for k in ("n_layer", "n_positions"))
    for i in range(n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    with open(d / "model.safetensors", "wb") as f:
        hf.write_safetensors(sd, f)
    model, _ = hf.from_pretrained(str(d))
    exp = expected()
    with torch.no_grad():
        logits = model(torch.tensor([exp["input_ids"]]))[0][0]
    assert (logits - torch.tensor(exp["logits"])).abs().max().item() < 1e-4


def test_export_round_trip_is_exact(tmp_path):
    model, _ = hf.from_pretrained(str(FIXTURE))
    sd = hf.to_gpt2_state_dict(model)
    assert "lm_head.weight" not in sd  # the tied matrix is stored once, as wte
    with open(tmp_path / "model.safetensors", "wb") as f:
        hf.write_safetensors(sd, f)
    back = GPT(model.config)
    back.load_state_dict(hf.from_gpt2_state_dict(hf.read_safetensors(tmp_path /
                                                                      "model.safetensors"),
                                                 model.config, "x"))
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    # the exported file holds transformers' layout, as the fixture's own file does
    theirs = hf.read_safetensors(FIXTURE / "model.safetensors")
    for k, t in sd.items():
        assert torch.equal(t, theirs.get(k, theirs.get(k.replace("transformer.", ""))).float()), k


def test_gpt2_architecture_leaves_the_default_alone():
    d = GPTConfig()
    assert (d.bias, d.gelu, d.ln_eps) == (False, "exact", 1e-5)
    c = hf.gpt2_config(FIXTURE / "config.json")
    assert (c.bias, c.gelu, c.ln_eps) == (True, "tanh", 1e-5)


def test_mismatched_weights_are_refused(tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(FIXTURE, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": cfg["n_layer"] + 1}))
    with pytest.raises(UserError, match="not a GPT-2 checkpoint of config.json's size"):
        hf.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": cfg["n_embd"] * 2,
                                               "n_head": cfg["n_head"]}))
    with pytest.raises(UserError, match="has shape"):
        hf.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UserError, match="is not gpt2"):
        hf.from_pretrained(str(d))
    # GPT-2 variants that would load and compute other logits
    for flag, value in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                        ("tie_word_embeddings", False)):
        (d / "config.json").write_text(json.dumps({**cfg, flag: value}))
        with pytest.raises(UserError, match=f"config.json: {flag} {value} is not supported"):
            hf.from_pretrained(str(d))
    (d / "config.json").write_text("{")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        hf.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="pytorch_model.bin: cannot be read as a state dict"):
        hf.from_pretrained(str(d))
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        hf.from_pretrained(str(d))
    with pytest.raises(UserError, match="no such directory"):
        hf.from_pretrained(str(tmp_path / "nowhere"))


# --- GPT-2's tokenizer ---------------------------------------------------------------------------


def test_byte_alphabet_is_gpt2s():
    table = hf.byte_alphabet()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_tokenizer_ids_equal_transformers():
    enc = hf.load_gpt2_tokenizer(str(FIXTURE))
    exp = expected()
    for text, ids in zip(exp["texts"], exp["ids"]):
        assert enc.encode(text, allowed_special="all") == ids, text
        assert enc.decode(ids) == text


def test_damaged_tokenizer_files_one_line(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(FIXTURE, d)
    merges = (d / "merges.txt").read_text().split("\n")
    vocab = json.loads((d / "vocab.json").read_text())

    def refused(message):
        with pytest.raises(UserError, match=message) as e:
            hf.load_gpt2_tokenizer(str(d))
        assert "\n" not in str(e.value)

    (d / "merges.txt").write_text("\n".join(merges[:2] + ["one two three"] + merges[3:]))
    refused("merges.txt, line 3: expected two tokens")
    (d / "merges.txt").write_text("\n".join(merges[:2] + ["Ġ zzzz"] + merges[3:]))
    refused("merges.txt, line 3: the merge .* is not in vocab.json")
    (d / "merges.txt").write_text("\n".join([merges[0], merges[2], merges[1]] + merges[3:]))
    refused("merges.txt, line 3: .* not above the earlier merges' ids")
    (d / "merges.txt").write_text("\n".join(merges))
    (d / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "A"}))
    refused("vocab.json: byte 65 has no token")
    (d / "vocab.json").write_text(json.dumps({**vocab, "A": vocab["B"]}))
    refused("vocab.json: two tokens share an id")
    (d / "vocab.json").write_text("[1, 2]")
    refused("vocab.json: expected an object")
    (d / "vocab.json").unlink()
    refused("vocab.json: No such file")
