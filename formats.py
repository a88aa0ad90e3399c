"""Preference, SFT and prompt files in the formats the wider world uses, read into one
shape: a conversation is a list of messages {"role": "user" | "assistant" | "system",
"content": str}; a preference is (the conversation so far, the chosen answer, the rejected
answer); an SFT example is (the conversation so far, the answer).

  HH-RLHF        .jsonl or .jsonl.gz, {"chosen": str, "rejected": str}: two whole
                 dialogues whose turns start "\\n\\nHuman: " and "\\n\\nAssistant: " and which
                 differ only in the last assistant turn. The prompt is everything up to the
                 last "\\n\\nAssistant:"; pairs whose answers are identical are skipped, and
                 so are pairs whose dialogues differ before the last turn (both counted).
  preference     {"prompt", "chosen", "rejected"} as strings, or as lists of messages
                 (TRL's conversational format: the prompt's messages, then each answer as
                 a list holding one assistant message)
  SFT            {"prompt", "response"} as strings, or {"messages": [...]} ending with the
                 assistant's answer
  RL prompts     {"prompt": str or messages}, or an HH-RLHF or preference file, whose
                 pairs' prompts are read (each once)

Every malformed record is refused in one line naming the file and the line; a truncated
.gz file says so. Each loader returns (records, counts of what was read and skipped).
hh_prompt and hh_answer write a conversation back in HH's text format, the chat format of
a GPT-2 model trained on it.
"""

import json
from types import SimpleNamespace

from cli import UserError
from data.tokenizer import encode_prompt, encode_response
from distributed import print0
from records import json_lines

ROLES = ("system", "user", "assistant")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def field(rec, name, types, where):
    if name not in rec:
        raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(rec[name], types):
        kinds = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise UserError(f"{where}: field {name!r} should be {kinds}, got "
                        f"{type(rec[name]).__name__}")
    return rec[name]


def messages(value, where, name):
    """A list of {"role", "content"} messages, checked."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field {name!r} should be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {name}[{i}] should be {{\"role\": str, \"content\": str}}")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: {name}[{i}] has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def conversation(value, where, name):
    """A prompt given as a string (one user message) or as messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: field {name!r} is empty")
        return [{"role": "user", "content": value}]
    return messages(value, where, name)


def answer(value, where, name):
    """An answer given as a string, or as a list holding one assistant message."""
    if isinstance(value, list):
        ms = messages(value, where, name)
        if len(ms) != 1 or ms[0]["role"] != "assistant":
            raise UserError(f"{where}: field {name!r} should hold one assistant message")
        value = ms[0]["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} should be a string or a list of messages")
    if not value.strip():
        raise UserError(f"{where}: field {name!r} is empty")
    return value


def hh_turns(dialogue, where, name):
    """An HH dialogue as messages; it must start with a human turn and alternate."""
    if not dialogue.startswith(HUMAN):
        raise UserError(f"{where}: field {name!r} does not start with {HUMAN!r}")
    out, rest = [], dialogue
    while rest:
        role, tag = ("user", HUMAN) if rest.startswith(HUMAN) else ("assistant", ASSISTANT)
        if not rest.startswith(tag):
            raise UserError(f"{where}: field {name!r}: a turn does not start with {HUMAN!r} "
                            f"or {ASSISTANT!r}")
        body = rest[len(tag):]
        cut = min([i for i in (body.find(HUMAN), body.find(ASSISTANT)) if i >= 0],
                  default=len(body))
        if out and out[-1]["role"] == role:
            raise UserError(f"{where}: field {name!r}: two {role} turns in a row")
        out.append({"role": role, "content": body[:cut].strip()})
        rest = body[cut:]
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: field {name!r} does not end with an {ASSISTANT!r} turn")
    return out


def load_hh(path):
    """HH-RLHF pairs: [(prompt messages, chosen, rejected)], counts. A pair whose final
    answer is empty on either side is skipped and counted, as one whose answers are the
    same (an empty answer is refused where a preference file states its answers)."""
    out, counts = [], {"read": 0, "identical": 0, "prompts_differ": 0, "empty_answer": 0}
    for lineno, rec in json_lines(path):
        where = f"{path}:{lineno}"
        chosen = hh_turns(field(rec, "chosen", str, where), where, "chosen")
        rejected = hh_turns(field(rec, "rejected", str, where), where, "rejected")
        counts["read"] += 1
        if not (chosen[-1]["content"] and rejected[-1]["content"]):
            counts["empty_answer"] += 1
        elif chosen[:-1] != rejected[:-1]:
            counts["prompts_differ"] += 1
        elif chosen[-1]["content"] == rejected[-1]["content"]:
            counts["identical"] += 1
        else:
            out.append((chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]))
    return checked(out, counts, path)


def load_preferences(path):
    """{"prompt", "chosen", "rejected"} records, strings or messages: pairs and counts."""
    out, counts = [], {"read": 0, "identical": 0}
    for lineno, rec in json_lines(path):
        where = f"{path}:{lineno}"
        prompt = conversation(field(rec, "prompt", (str, list), where), where, "prompt")
        chosen = answer(field(rec, "chosen", (str, list), where), where, "chosen")
        rejected = answer(field(rec, "rejected", (str, list), where), where, "rejected")
        counts["read"] += 1
        if chosen == rejected:
            counts["identical"] += 1
        else:
            out.append((prompt, chosen, rejected))
    return checked(out, counts, path)


def load_sft(path):
    """SFT examples, {"prompt", "response"} or {"messages"}: (prompt messages, answer)."""
    out, counts = [], {"read": 0}
    for lineno, rec in json_lines(path):
        where = f"{path}:{lineno}"
        if "messages" in rec:
            ms = messages(rec["messages"], where, "messages")
            if ms[-1]["role"] != "assistant" or len(ms) < 2:
                raise UserError(f"{where}: field 'messages' should end with the assistant's "
                                f"answer, after at least one other message")
            example = (ms[:-1], answer(ms[-1]["content"], where, "messages[-1]"))
        else:
            example = (conversation(field(rec, "prompt", (str, list), where), where, "prompt"),
                       answer(field(rec, "response", (str, list), where), where, "response"))
        counts["read"] += 1
        out.append(example)
    return checked(out, counts, path)


def load_rl_prompts(path):
    """RL prompts, {"prompt": str or messages}: prompt messages and counts. An HH-RLHF or
    preference file (told by a first record with "chosen") gives its pairs' prompts, each
    once, so PPO and GRPO can run on the prompts of the pairs the reward model learned."""
    first = next((rec for _, rec in json_lines(path)), None)
    if isinstance(first, dict) and "chosen" in first:
        pairs, counts, _ = load_comparisons(path)
        seen, out = set(), []
        for messages, _, _ in pairs:
            key = json.dumps(messages, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(messages)
        counts["repeated_prompts"] = len(pairs) - len(out)
        return out, counts
    out, counts = [], {"read": 0}
    for lineno, rec in json_lines(path):
        where = f"{path}:{lineno}"
        out.append(conversation(field(rec, "prompt", (str, list), where), where, "prompt"))
        counts["read"] += 1
    return checked(out, counts, path)


def hh_prompt(messages):
    """A conversation in HH-RLHF's text format, ending where the assistant answers next:
    "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:". A system message, which
    HH has no turn for, comes first as plain text."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"])
        else:
            out.append(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}")
    return "".join(out) + ASSISTANT


def hh_answer(text):
    """The answer as it follows hh_prompt in HH's files: one space, then the text."""
    return " " + text


def load_comparisons(path):
    """(prompt messages, chosen, rejected) from an HH-RLHF or a preference file (told by
    its first record). Returns (pairs, counts, the format's name)."""
    first = next((rec for _, rec in json_lines(path)), None)
    if first is None:
        raise UserError(f"{path}: no records")
    if isinstance(first.get("chosen"), str) and first["chosen"].startswith(HUMAN):
        return (*load_hh(path), "HH-RLHF")
    return (*load_preferences(path), "preference")


def end_token(enc, chat):
    """The token that ends an answer: GPT-2's end-of-text in HH's format, the world's
    <|end|> in its own."""
    return enc.encode_single_token("<|endoftext|>" if chat == "hh" else "<|end|>")


def chat_tokens(enc, chat, messages, answer=None, where=""):
    """(prompt ids, answer ids ending with the end token, or None) in the model's chat
    format: "hh" (a GPT-2 model: hh_prompt, hh_answer, end-of-text) or "world" (one user
    question: <|user|> ... <|end|> <|assistant|> answer <|end|>)."""
    if chat == "hh":
        prompt = enc.encode_ordinary(hh_prompt(messages))
        reply = None if answer is None else (enc.encode_ordinary(hh_answer(answer)) +
                                             [end_token(enc, chat)])
        return prompt, reply
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise UserError(f"{where}: a conversation of {len(messages)} messages; the world's chat "
                        f"format holds one user question (use a GPT-2 model)")
    return (encode_prompt(enc, messages[0]["content"]),
            None if answer is None else encode_response(enc, answer))


def rl_prompts(path, enc, chat, room):
    """An RL prompt file's prompts in the model's chat format: (texts, token lists), the
    prompts longer than `room` tokens skipped and counted."""
    messages, counts = load_rl_prompts(path)
    texts, prompts = [], []
    for m in messages:
        ids = chat_tokens(enc, chat, m, None, path)[0]
        if len(ids) <= room:
            texts.append(m[-1]["content"])
            prompts.append(ids)
    print0(f"{path}: RL prompt file, {describe(counts)}; {len(messages) - len(prompts)} too "
           f"long for the context with --max_new_tokens skipped; {len(prompts)} to train on")
    if not prompts:
        raise UserError(f"{path}: no prompt leaves room for --max_new_tokens in the context")
    return texts, prompts


def comparison_tokens(path, enc, chat, block_size):
    """A comparison file's pairs in the model's chat format: ((prompt, chosen, rejected)
    token lists, counts, the format's name, how many were longer than the context and
    left out)."""
    records, counts, kind = load_comparisons(path)
    encoded, too_long = [], 0
    for messages, chosen, rejected in records:
        p, c = chat_tokens(enc, chat, messages, chosen, path)
        r = chat_tokens(enc, chat, messages, rejected, path)[1]
        if len(p) + max(len(c), len(r)) > block_size:
            too_long += 1
            continue
        encoded.append((p, c, r))
    return encoded, counts, kind, too_long


def rl_tokens(enc, chat):
    """The answer's end token and the padding token of an RL stage, in the model's chat
    format."""
    return SimpleNamespace(end=end_token(enc, chat), pad=enc.encode_single_token("<|endoftext|>"))


def refuse_world_only(cfg):
    """An RL stage on prompts of your own (--data) has no tasks to check and no
    pretraining tokens: only the reward model's score, and no PPO-ptx term."""
    if cfg.data and (cfg.reward != "model" or cfg.ptx_coef > 0):
        raise UserError(f"--data={cfg.data} with --reward={cfg.reward} --ptx_coef={cfg.ptx_coef}: "
                        f"the verifiable reward and the pretraining term need the world; use "
                        f"--reward=model --ptx_coef=0")


def load_demonstrations(path):
    """(prompt messages, answer) pairs to fine-tune on, from whichever of the formats the
    file holds (told by its first record): SFT records, or the chosen answers of HH-RLHF or
    preference records. Returns (examples, counts, the format's name)."""
    first = next((rec for _, rec in json_lines(path)), None)
    if first is None:
        raise UserError(f"{path}: no records")
    if "chosen" in first:
        hh = isinstance(first["chosen"], str) and first["chosen"].startswith(HUMAN)
        pairs, counts = load_hh(path) if hh else load_preferences(path)
        return [(p, c) for p, c, _ in pairs], counts, "HH-RLHF" if hh else "preference"
    examples, counts = load_sft(path)
    return examples, counts, "SFT"


def hold_out(items, val_fraction, path, kind, counts, too_long, block_size, noun, kept=""):
    """Training and held-out parts of a file's usable items (at least 2; at least one
    held out), saying what was read, skipped and kept."""
    if len(items) < 2:
        raise UserError(f"{path}: {len(items)} usable {noun}(s) ({too_long} longer than the "
                        f"context of {block_size} tokens); at least 2 are needed")
    n_val = max(1, round(len(items) * val_fraction))
    if n_val >= len(items):
        raise UserError(f"--val_fraction={val_fraction} holds out all {len(items)} usable "
                        f"{noun}s of {path}, leaving none to train on; lower it")
    print0(f"{path}: {kind} file, {describe(counts)}; {too_long} longer than the context "
           f"skipped; {len(items) - n_val} {kept}to train on, {n_val} held out")
    return items[:-n_val], items[-n_val:]


def checked(out, counts, path):
    if not out:
        raise UserError(f"{path}: no usable records ({describe(counts)})")
    return out, counts


def describe(counts):
    """'read 24, skipped 2 identical' and the like."""
    read = counts.get("read", 0)
    skipped = [f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if k != "read" and n]
    return f"read {read}" + (f", skipped {', '.join(skipped)}" if skipped else "")
