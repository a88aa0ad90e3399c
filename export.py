"""Write a stage's model as a Hugging Face GPT-2 checkpoint directory, for the tools that
read that format (transformers' GPT2LMHeadModel and AutoTokenizer, and what builds on
them). Everything is written by the project's own code:

  config.json          GPT-2's config: sizes, the GELU (exact: "gelu"; GPT-2's tanh:
                       "gelu_new"), LayerNorm epsilon, the end token as eos
  model.safetensors    GPT-2's names and layouts (Conv1D matrices transposed); the tied
                       embedding stored once; biases written as zeros for a model trained
                       without them (GPT-2's layers always have biases)
  vocab.json,          the byte-level BPE in GPT-2's file format; merges recovered from the
  merges.txt           tokenizer's ranks
  tokenizer.json       the same BPE with the tokenizer's own pre-tokenizer regex (the
                       world's splits digits one by one, GPT-2's does not), so a fast
                       tokenizer encodes exactly as tiktoken does here
  special_tokens_map.json, tokenizer_config.json

    python export.py --from=out/ppo --to=export/ppo          # the world's tokenizer
    python export.py --from=out/sft --to=export/sft --data_dir=data/world

bench/check_hf_export.py (it needs transformers, in a venv of its own) loads the result
with transformers and compares logits, greedy tokens and token ids with this project's.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import ClassVar

import checkpoint
import hf
from cli import UserError, parse_config, ranges, user_errors
from records import world_tokenizer


@dataclass
class Config:
    src: str = "out/sft"         # a stage's folder (its ckpt.pt); the flag is --from
    to: str = "export"           # the directory to write (must not exist, or be empty)
    data_dir: str = "data/world"  # the world whose tokenizer the checkpoint was trained with

    RANGES: ClassVar = ranges()
    FLAGS: ClassVar = {"from": "src"}


def recover_merges(ranks):
    """The merges of a byte-level BPE from tiktoken's ranks, earliest first: each token of
    two or more bytes is what BPE makes of its bytes with only the tokens ranked below it,
    which must be exactly two tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1),
                       key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            if ranks.get(parts[best] + parts[best + 1], 1 << 62) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise UserError(f"the tokenizer's token {token!r} (rank {rank}) is not the merge of "
                            f"two earlier tokens: not a byte-level BPE that can be exported")
        merges.append(tuple(parts))
    return merges


def tokenizer_files(enc, eos):
    """{file name: text} of the tokenizer in Hugging Face's formats."""
    ranks, specials = enc._mergeable_ranks, enc._special_tokens
    alphabet = hf.byte_alphabet()
    show = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    vocab = {show(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab.update(specials)
    merges = [f"{show(a)} {show(b)}" for a, b in recover_merges(ranks)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(specials.items(),
                                                                     key=lambda kv: kv[1])]
    fast = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": None,
              "eos_token": eos, "bos_token": eos, "unk_token": None,
              "additional_special_tokens": [t for t in specials if t != eos]}
    config = {k: v for k, v in config.items() if v is not None}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer.json": json.dumps(fast, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=1),
            "special_tokens_map.json": json.dumps({"eos_token": eos, "bos_token": eos},
                                                  indent=1)}


def gpt2_config_json(mc, eos_id):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": mc.vocab_size, "n_positions": mc.block_size, "n_ctx": mc.block_size,
            "n_embd": mc.n_embd, "n_layer": mc.n_layer, "n_head": mc.n_head, "n_inner": None,
            "activation_function": "gelu" if mc.gelu == "exact" else "gelu_new",
            "layer_norm_epsilon": mc.ln_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": True, "scale_attn_weights": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id}


def with_biases(sd, model):
    """GPT-2's layers all have biases: zeros where the model was trained without them."""
    out = dict(sd)
    C = model.config.n_embd
    sizes = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C,
             "mlp.c_proj": C}
    for i in range(model.config.n_layer):
        for name, n in sizes.items():
            out.setdefault(f"transformer.h.{i}.{name}.bias",
                           sd[f"transformer.h.{i}.{name}.weight"].new_zeros(n))
    out.setdefault("transformer.ln_f.bias", sd["transformer.ln_f.weight"].new_zeros(C))
    return out


def main(cfg):
    path = os.path.join(cfg.src, "ckpt.pt")
    ckpt = checkpoint.load(path, checkpoint.ANY_STAGE)
    enc = hf.checkpoint_tokenizer(ckpt, path)  # a stage trained from GPT-2 carries its own
    gpt2 = enc is not None
    enc = enc or world_tokenizer(cfg.data_dir)
    model = checkpoint.model_from(ckpt, path, checkpoint.ANY_STAGE, enc)
    if os.path.exists(cfg.to) and (not os.path.isdir(cfg.to) or os.listdir(cfg.to)):
        raise UserError(f"--to={cfg.to}: exists and is not an empty directory; choose another")
    eos = "<|endoftext|>" if gpt2 else "<|end|>"
    files = tokenizer_files(enc, eos)
    if gpt2:  # GPT-2's own files, as they came
        files.update(ckpt["hf_tokenizer"])
    files["config.json"] = json.dumps(gpt2_config_json(model.config,
                                                       enc.encode_single_token(eos)), indent=1)
    parent = os.path.dirname(os.path.abspath(cfg.to))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)  # all or nothing: renamed at the end
    except OSError as e:
        raise UserError(f"--to={cfg.to}: cannot write in {parent} ({e.strerror or e})") from None
    try:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            hf.write_safetensors(with_biases(hf.to_gpt2_state_dict(model), model), f,
                                 metadata={"format": "pt", "stage": str(ckpt.get("stage")),
                                           "step": str(ckpt.get("step"))})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is not
        if os.path.isdir(cfg.to):
            os.rmdir(cfg.to)
        os.replace(tmp, cfg.to)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--to={cfg.to}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {cfg.to}/: a GPT-2 checkpoint of {ckpt.get('stage')} step {ckpt.get('step')} "
          f"({model.num_params() / 1e6:.2f}M parameters) and its tokenizer ({enc.n_vocab} tokens)")


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
