"""Answer prompts with any model the project can load: a stage's checkpoint (out/sft,
out/ppo, ...) in the world's chat format, or a Hugging Face GPT-2 directory (imported
weights, or one export.py wrote) as plain text or in HH-RLHF's dialogue format; a world
model export.py wrote answers in the world's chat format, as its stage does.

    python sample.py --from=out/ppo "What is 7 + 5?" "Sort these numbers: 4 1 3"
    python sample.py --from=out/sft --temperature=1.0 --num_samples=4 "Spell 'cat' backwards."
    python sample.py --from=path/to/gpt2 --format=hh "How do I bake bread?"
    python sample.py --from=path/to/gpt2 --format=plain --top_k=40 "Once upon a time"

Prompts are the arguments that are not flags. Greedy at --temperature=0 (the default);
otherwise sampled, with --top_k and --top_p filtering, --num_samples answers a prompt.
"""

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

import checkpoint
import distributed
import hf
from cli import UserError, parse_config, ranges, user_errors
from data.tokenizer import SPECIAL_TOKENS, decode_response, encode_prompt
from records import world_tokenizer


@dataclass
class Config:
    src: str = "out/sft"           # a stage's folder (ckpt.pt) or a GPT-2 directory; --from
    data_dir: str = "data/world"   # the world's tokenizer (for a stage's checkpoint)
    format: str = "auto"           # auto (chat for a world model, hh for GPT-2), chat, hh, plain
    num_samples: int = 1           # answers per prompt
    max_new_tokens: int = 64       # answer length limit
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # keep the k likeliest tokens (0 = all)
    top_p: float = 1.0             # keep the smallest set holding this probability (1 = all)
    seed: int = 1337
    device: str = "auto"           # auto, cpu, cuda, cuda:N or mps

    FLAGS: ClassVar = {"from": "src"}
    RANGES: ClassVar = ranges(at_least_1="num_samples max_new_tokens",
                              non_negative="temperature top_k", above_0="top_p")


def load(cfg, device):
    """(model, encode(prompt) -> ids, decode(ids) -> (text, ended), stop token, pad)."""
    gpt2, ckpt = None, None
    if hf.is_gpt2(cfg.src):  # a GPT-2 directory, or a name to download
        model, enc = hf.from_pretrained(cfg.src)
        gpt2 = f"{cfg.src} is a GPT-2 checkpoint"
        if set(SPECIAL_TOKENS) <= set(enc._special_tokens) and cfg.format in ("auto", "chat"):
            # a world model export.py wrote: it answers in the world's chat format
            end, pad = (enc.encode_single_token(t) for t in ("<|end|>", "<|endoftext|>"))
            return (model.to(device), lambda text: encode_prompt(enc, text),
                    lambda ids: decode_response(enc, ids, end), end, pad)
    else:
        path = os.path.join(cfg.src, "ckpt.pt")
        ckpt = checkpoint.load(path, checkpoint.ANY_STAGE)
        enc = hf.checkpoint_tokenizer(ckpt, path)
        if enc is not None:  # a stage trained from GPT-2: its tokenizer travels with it
            model = checkpoint.model_from(ckpt, path, checkpoint.ANY_STAGE, enc, device=device)
            gpt2 = f"{cfg.src} was trained from GPT-2"
    if gpt2:
        eot = enc.encode_single_token("<|endoftext|>") if "<|endoftext|>" in \
            enc._special_tokens else None
        fmt = "hh" if cfg.format == "auto" else cfg.format
        if fmt == "chat":
            raise UserError(f"--format=chat: {gpt2}; use hh or plain")

        def encode(text):
            return enc.encode_ordinary(f"\n\nHuman: {text}\n\nAssistant:" if fmt == "hh"
                                       else text)

        def decode(ids):
            ended = eot is not None and eot in ids
            text = enc.decode(ids[:ids.index(eot)] if ended else ids)
            if fmt == "hh" and "\n\nHuman:" in text:  # the model's next turn ends the answer
                text, ended = text.split("\n\nHuman:")[0], True
            return text.strip() if fmt == "hh" else text, ended
        return model.to(device), encode, decode, eot, eot or 0
    enc = world_tokenizer(cfg.data_dir)
    if cfg.format not in ("auto", "chat"):
        raise UserError(f"--format={cfg.format}: a stage's checkpoint answers in the chat format")
    model = checkpoint.model_from(ckpt, os.path.join(cfg.src, "ckpt.pt"),
                                  checkpoint.ANY_STAGE, enc, device=device)
    end, pad = (enc.encode_single_token(t) for t in ("<|end|>", "<|endoftext|>"))
    return (model, lambda text: encode_prompt(enc, text),
            lambda ids: decode_response(enc, ids), end, pad)


def main(cfg, prompts):
    if not prompts:
        raise UserError("no prompt: give one or more as arguments, e.g. "
                        "python sample.py --from=out/sft \"What is 2 + 2?\"")
    empty = [i for i, text in enumerate(prompts, 1) if not text.strip()]
    if empty:
        raise UserError(f"prompt {empty[0]} of {len(prompts)} is empty: give the question, e.g. "
                        "python sample.py --from=out/sft \"What is 2 + 2?\"")
    if cfg.format not in ("auto", "chat", "hh", "plain"):
        raise UserError(f"--format={cfg.format}: expected auto, chat, hh or plain")
    run = distributed.setup(cfg.seed, cfg.device)
    model, encode, decode, stop, pad = load(cfg, run.device)
    g = torch.Generator(device=run.device).manual_seed(cfg.seed)
    n = 1 if cfg.temperature == 0 else cfg.num_samples
    for text in prompts:
        ids = encode(text)
        room = model.config.block_size - len(ids)
        if room < 1:
            raise UserError(f"the prompt {text[:40]!r} fills the model's {model.config.block_size}"
                            f" positions; shorten it")
        with run.autocast:
            out, mask = model.generate([ids] * n, min(cfg.max_new_tokens, room),
                                       temperature=cfg.temperature, top_k=cfg.top_k,
                                       top_p=cfg.top_p, stop_token=stop, pad_token=pad,
                                       generator=g)
        print(f"> {text}")
        for row, m in zip(out, mask):
            answer, ended = decode(row[m].tolist())
            print(f"  {answer!r}{'' if ended else '  (no end)'}")


if __name__ == "__main__":
    with user_errors():
        flags = [a for a in sys.argv[1:] if a.startswith("--")]
        main(parse_config(Config, flags), [a for a in sys.argv[1:] if not a.startswith("--")])
