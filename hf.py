"""Hugging Face's GPT-2 files, read and written by the project's own code: no transformers,
no safetensors package, no tokenizers.

A GPT-2 checkpoint directory holds config.json, the weights as model.safetensors or
pytorch_model.bin, and the tokenizer as vocab.json + merges.txt. What each format is:

  safetensors   an unsigned 64-bit little-endian N, then N bytes of JSON
                {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"},
                then the tensors' raw bytes, little-endian, each at [begin, end) of what
                follows the header
  .bin          a pickled state dict, read with torch.load(weights_only=True)
  GPT-2 names   transformer.h.{i}.attn.c_attn.weight etc. (the "transformer." prefix is
                absent when the file was saved from the bare GPT2Model); the attention,
                projection and MLP matrices are Conv1D, stored (in, out), so they are the
                transpose of a Linear's weight; lm_head.weight is wte.weight (tied)
  vocab.json    token string -> id; a token's string is its bytes, each byte written as
                one printable character (GPT-2's byte-to-unicode table)
  merges.txt    "#version" line, then one merge "a b" a line, earliest first

    model, enc = hf.from_pretrained("path/to/gpt2")      # GPT and a tiktoken Encoding
    model, enc = hf.from_pretrained("gpt2")      # downloaded once (hub.py), then cached
"""

import hashlib
import json
import os
import struct

import tiktoken
import torch

import hub
from cli import UserError
from model import GPT, GPTConfig

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # no honest header is this large; a bigger N is a damaged file

# GPT-2's pre-tokenizer (its published regex, as tiktoken's gpt2 encoding also uses)
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
                r"""|\s+""")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# --- safetensors -----------------------------------------------------------------------------


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, every offset and size checked first."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte "
                                f"header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise UserError(f"{path}: damaged safetensors file (a header of {n} bytes in a "
                                f"file of {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path}: damaged safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise UserError(f"{path}: damaged safetensors header (not a JSON object)")
            header.pop("__metadata__", None)
            data = bytearray(f.read())  # one buffer; the tensors are views of it
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a damaged entry in the header "
                            f"({json.dumps(info)[:80]})") from None
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise UserError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) does not fit "
                            f"its bytes [{begin}, {end}) of {len(data)} (truncated file?)")
        spans.append((begin, end, name))
        out[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if nbytes
                     else torch.empty(0, dtype=dtype)).reshape(shape)
    spans.sort()
    for (_, e1, a), (b2, _, b) in zip(spans, spans[1:]):
        if b2 < e1:
            raise UserError(f"{path}: tensors {a!r} and {b!r} overlap (damaged header)")
    return out


def write_safetensors(tensors, f, metadata=None):
    """Write {name: tensor} to the open binary file f in the safetensors layout, tensors
    in name order, each contiguous and little-endian."""
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)) + text)
    for name in sorted(tensors):
        f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                .tobytes())


# --- GPT-2 weights ---------------------------------------------------------------------------


def gpt2_config(path):
    """GPTConfig from a GPT-2 config.json (GPT-2's architecture: biases, tanh GELU)."""
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict) or c.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type {c.get('model_type') if isinstance(c, dict) else c!r}"
                        f" is not gpt2")
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"{path}: activation_function {act!r} is not one GPT-2 uses")
    # variants this model does not run: they would load and give other logits
    for name, supported in (("scale_attn_weights", True), ("tie_word_embeddings", True),
                            ("scale_attn_by_inverse_layer_idx", False)):
        if c.get(name, supported) != supported:
            raise UserError(f"{path}: {name} {c[name]!r} is not supported (GPT-2's is "
                            f"{supported})")
    try:
        return GPTConfig(block_size=int(c.get("n_positions", 1024)),
                         vocab_size=int(c.get("vocab_size", 50257)),
                         n_layer=int(c.get("n_layer", 12)), n_head=int(c.get("n_head", 12)),
                         n_embd=int(c.get("n_embd", 768)), dropout=0.0, bias=True,
                         gelu="exact" if act == "gelu" else "tanh",
                         ln_eps=float(c.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def from_gpt2_state_dict(sd, config, path):
    """GPT-2's state dict (either prefix) -> this project's GPT state dict: Conv1D matrices
    transposed, attention mask buffers dropped, lm_head tied to wte."""
    out = {}
    for name, t in sd.items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if key.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]) or \
                key == "lm_head.weight":
            continue  # causal-mask buffers; the tied output matrix is wte
        out["transformer." + key] = t.t() if key.endswith(CONV1D) else t
    out["lm_head.weight"] = out.get("transformer.wte.weight")
    model = GPT(config)
    want = model.state_dict()
    missing = sorted(set(want) - {k for k, v in out.items() if v is not None})
    extra = sorted(set(out) - set(want))
    if missing or extra:
        raise UserError(f"{path}: not a GPT-2 checkpoint of config.json's size (missing "
                        f"{missing[:3]}, unexpected {extra[:3]})")
    for k, v in out.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, config.json says "
                            f"{tuple(want[k].shape)}")
    return {k: v.float() for k, v in out.items()}


def to_gpt2_state_dict(model):
    """This project's GPT -> GPT-2's names and layouts (Conv1D matrices transposed back),
    the tied matrix stored once as transformer.wte.weight."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        out[name] = t.t().contiguous() if name.endswith(CONV1D) else t.contiguous()
    return out


def load_weights(directory):
    """The state dict of a checkpoint directory: model.safetensors, else pytorch_model.bin."""
    st, pt = (os.path.join(directory, f) for f in ("model.safetensors", "pytorch_model.bin"))
    if os.path.exists(st):
        return read_safetensors(st), st
    if os.path.exists(pt):
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign pickle: one line, whatever raised
            raise UserError(f"{pt}: cannot be read as a state dict ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{pt}: not a state dict of tensors")
        return sd, pt
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin (a Hugging Face "
                    f"GPT-2 checkpoint directory has one of them and config.json)")


# --- GPT-2's tokenizer ---------------------------------------------------------------------------


def byte_alphabet():
    """GPT-2's table from each byte to a printable character: the printable Latin-1
    bytes stand for themselves, the others are moved to 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_texts(directory):
    """{"vocab.json": text, "merges.txt": text} of a GPT-2 directory: what a stage's
    checkpoint carries, so the model's tokenizer travels with it."""
    texts = {}
    for name in ("vocab.json", "merges.txt"):
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                texts[name] = f.read()
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None
    return texts


def load_gpt2_tokenizer(directory):
    """GPT-2's tokenizer from the vocab.json and merges.txt of a directory."""
    return gpt2_tokenizer(tokenizer_texts(directory), directory)


def gpt2_tokenizer(texts, where):
    """A tiktoken Encoding from vocab.json + merges.txt (their texts) with GPT-2's ids.
    tiktoken merges the adjacent pair whose result has the lowest rank, so the ids serve as
    ranks when every merge's result has a larger id than the merges before it (true of
    GPT-2's files); otherwise the files are refused. Tokens of vocab.json that are neither
    a byte nor made by a merge ("<|endoftext|>" and the like) are special tokens. The
    Encoding's name carries a hash of both texts, which checkpoints store."""
    vocab_path, merges_path = (os.path.join(where, f) for f in ("vocab.json", "merges.txt"))
    try:
        vocab = json.loads(texts["vocab.json"])
    except json.JSONDecodeError as e:
        raise UserError(f"{vocab_path}: not valid JSON ({e})") from None
    lines = texts["merges.txt"].split("\n")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise UserError(f"{vocab_path}: expected an object of token -> integer id")
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{vocab_path}: two tokens share an id")
    alphabet = byte_alphabet()
    decode = {c: b for b, c in alphabet.items()}
    ranks = {}
    for b in range(256):
        if alphabet[b] not in vocab:
            raise UserError(f"{vocab_path}: byte {b} has no token (not a byte-level BPE)")
        ranks[bytes([b])] = vocab[alphabet[b]]
    last = max(ranks.values())
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(p and all(c in decode for c in p) for p in parts):
            raise UserError(f"{merges_path}, line {n}: expected two tokens separated by one "
                            f"space, got {line[:60]!r}")
        merged = "".join(parts)
        if merged not in vocab:
            raise UserError(f"{merges_path}, line {n}: the merge {line!r} makes {merged!r}, "
                            f"which is not in vocab.json")
        if vocab[merged] <= last:
            raise UserError(f"{merges_path}, line {n}: {merged!r} has id {vocab[merged]}, not "
                            f"above the earlier merges' ids (tiktoken needs ids in merge order)")
        last = vocab[merged]
        ranks[bytes(decode[c] for c in merged)] = last
    # what neither a byte nor a merge makes ("<|endoftext|>") is a special token
    made = {"".join(alphabet[b] for b in token) for token in ranks}
    special = {t: i for t, i in vocab.items() if t not in made}
    digest = hashlib.sha256((texts["vocab.json"] + "\0" + texts["merges.txt"]).encode())
    return tiktoken.Encoding(name=f"gpt2-{digest.hexdigest()[:12]}", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=special)


def checkpoint_tokenizer(ckpt, path):
    """The GPT-2 tokenizer a stage's checkpoint carries (one trained from a GPT-2
    checkpoint), or None for a checkpoint of the world."""
    texts = ckpt.get("hf_tokenizer") if isinstance(ckpt, dict) else None
    return gpt2_tokenizer(texts, os.path.dirname(str(path))) if texts else None


def resolve(name_or_dir):
    """The directory of a GPT-2 checkpoint: a directory as given, or a model name of
    hub.MODELS, downloaded once into the cache."""
    if not os.path.isdir(name_or_dir) and name_or_dir in hub.MODELS:
        return hub.fetch(name_or_dir)
    if not os.path.isdir(name_or_dir):
        raise UserError(f"{name_or_dir}: no such directory (a Hugging Face GPT-2 checkpoint "
                        f"directory: config.json, model.safetensors or pytorch_model.bin, "
                        f"vocab.json, merges.txt)")
    return name_or_dir


def is_gpt2(name_or_dir):
    """Whether --init_from names a GPT-2 checkpoint (a directory with config.json, or a
    model name to download) rather than a stage's folder."""
    return (os.path.isfile(os.path.join(name_or_dir, "config.json")) or
            (name_or_dir in hub.MODELS and not os.path.isdir(name_or_dir)))


def from_pretrained(name_or_dir):
    """(GPT in eval mode, tiktoken Encoding) from a Hugging Face GPT-2 directory, or from
    a model name of hub.MODELS ("gpt2", ...), downloaded once into the cache."""
    directory = resolve(name_or_dir)
    config = gpt2_config(os.path.join(directory, "config.json"))
    sd, path = load_weights(directory)
    model = GPT(config)
    model.load_state_dict(from_gpt2_state_dict(sd, config, path))
    return model.eval(), load_gpt2_tokenizer(directory)
