"""Check an export.py directory with transformers itself: not a test, because it needs
transformers (the project never imports it). Run it with a Python that has transformers
and the project's requirements, from the repository root:

    python export.py --from=out/ppo --to=export/ppo
    /path/to/venv-with-transformers/bin/python bench/check_hf_export.py \\
        --export=export/ppo --from=out/ppo --data_dir=data/world
    .../python bench/check_hf_export.py --export=export/ppo-gpt2 --from=out/ppo-gpt2 \\
        --data=prompts.jsonl        # a model trained from GPT-2, on your prompts

It loads the directory with transformers' GPT2LMHeadModel and AutoTokenizer and, on the
world's held-out prompts (or those of --data, in HH's chat format for a model trained
from GPT-2), compares with the project's own model and tokenizer: the token ids of each
prompt, the logits of the prompts (largest difference), and the greedy answers. Prints
one JSON line; exits 1 if anything differs beyond float rounding.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402

import formats  # noqa: E402
from cli import UserError, parse_config, user_errors  # noqa: E402
from data.tokenizer import encode_prompt  # noqa: E402
from records import read_jsonl, stage_model  # noqa: E402


@dataclass
class Config:
    export: str = "export"        # the directory export.py wrote
    src: str = "out/sft"          # the stage folder it was exported from; the flag is --from
    data_dir: str = "data/world"  # its world (tokenizer, eval.jsonl)
    data: str = ""                # prompts of your own instead (an RL prompt or HH file)
    prompts: int = 64             # held-out prompts to compare on
    new_tokens: int = 16          # greedy tokens per prompt

    FLAGS: ClassVar = {"from": "src"}


def main(cfg):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer, GPT2LMHeadModel
    except ImportError:
        raise UserError(f"bench/check_hf_export.py needs transformers, which the project "
                        f"never installs: run it with a Python that has it ({sys.executable} "
                        f"has not)") from None

    ours, enc, chat, _ = stage_model(cfg.src, "a stage", cfg.data_dir, "cpu")
    theirs = GPT2LMHeadModel.from_pretrained(cfg.export).eval()
    tok = AutoTokenizer.from_pretrained(cfg.export)
    if cfg.data:
        convs = formats.load_rl_prompts(cfg.data)[0][:cfg.prompts]
        texts = [formats.hh_prompt(m) if chat == "hh" else m[-1]["content"] for m in convs]
    else:
        records = read_jsonl(os.path.join(cfg.data_dir, "eval.jsonl"), {"prompt": str})
        texts = [r["prompt"] for r in records[:cfg.prompts]]
    end = formats.end_token(enc, chat)

    ids_equal, max_diff, greedy_equal = 0, 0.0, 0
    for text in texts:
        # the tokenizer: plain text, then the chat format (the world's special tokens; HH's
        # format is plain text)
        ids_equal += tok(text)["input_ids"] == enc.encode_ordinary(text)
        if chat == "hh":
            prompt = enc.encode_ordinary(text)
            ids_equal += tok(text + " ")["input_ids"] == enc.encode_ordinary(text + " ")
        else:
            prompt = encode_prompt(enc, text)
            ids_equal += tok("<|user|>" + text + "<|end|><|assistant|>")["input_ids"] == prompt
        x = torch.tensor([prompt])
        with torch.no_grad():
            a, b = ours(x)[0], theirs(x).logits
            max_diff = max(max_diff, (a - b).abs().max().item())
            mine, _ = ours.generate([prompt], cfg.new_tokens, temperature=0.0)
            hf_out = theirs.generate(x, max_new_tokens=cfg.new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=end,
                                     attention_mask=torch.ones_like(x))[0, len(prompt):]
        greedy_equal += mine[0].tolist() == hf_out.tolist()
    result = {"prompts": len(texts), "token_ids_equal": f"{ids_equal}/{2 * len(texts)}",
              "max_abs_logit_diff": max_diff, "greedy_equal": f"{greedy_equal}/{len(texts)}"}
    print(json.dumps(result))
    ok = ids_equal == 2 * len(texts) and max_diff < 1e-4 and greedy_equal == len(texts)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config))
