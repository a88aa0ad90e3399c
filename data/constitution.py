"""A miniature constitution for Constitutional AI (Bai et al. 2022, "Constitutional AI:
Harmlessness from AI Feedback") in the embedded world: a short file of principles, each
about one flaw of an answer that users do not value, and the world's own ground truth
for each: whether an answer breaks it, the critique that says so, and the revision that
mends it.

Each principle names one of the world's flaws. The simulated raters like some of them
(a preamble most of all, docs/world.md), so labels that follow the constitution can
disagree with the raters and agree with the gold scorer; that is what the AI labels are
measured against.

    pleasantry  an opening such as "Great question!"       (world.PREAMBLES)
    restating   "You asked: ..." before the answer          (world.RESTATES)
    hedging     "I think", "Probably" in front of it        (world.HEDGES)
    sign_off    "I hope this helps!" and the like after it  (world.FILLERS, SIGN_OFFS)

The constitution file (data/constitution.txt) holds one "name: text" a line, the text
being what the model reads; blank lines and lines starting with # are skipped.
"""

import os
import re

from cli import UserError
from data import world

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constitution.txt")

# the closing sentences a sign-off can be: the fillers and the contractors' habits
CLOSINGS = sorted(set(world.FILLERS) | set(world.SIGN_OFFS.values()), key=len, reverse=True)


def _strip_pleasantry(task, text):
    for p in sorted(world.PREAMBLES, key=len, reverse=True):
        if text.startswith(p):
            return text[len(p):].lstrip()
    return text


def _strip_restating(task, text):
    for r in world.RESTATES:
        said = r.format(q=task.prompt)
        if said in text:
            return " ".join(text.replace(said, " ", 1).split())
    if task.prompt in text:
        return " ".join(text.replace(task.prompt, " ", 1).split())
    return text


def _strip_hedging(task, text):
    for h in sorted(world.HEDGES, key=len, reverse=True):
        text = re.sub(rf"(^|\s){re.escape(h)}(\s|$)", " ", text)
    return " ".join(text.split())


def _strip_sign_off(task, text):
    """Every closing sentence at the end, however many there are."""
    while _signs_off(task, text):
        c = next(c for c in CLOSINGS if text.endswith(" " + c))
        text = text[:len(text) - len(c)].rstrip()
    return text


def _signs_off(task, text):
    return any(text.endswith(" " + c) for c in CLOSINGS)


# name: (breaks(task, text), revise(task, text), the critique when it is broken)
PRINCIPLES = {
    "pleasantry": (lambda task, text: world.has_preamble(text), _strip_pleasantry,
                   "The answer opens with a pleasantry."),
    "restating": (world.has_restate, _strip_restating, "The answer restates the question."),
    "hedging": (lambda task, text: world.has_hedge(text), _strip_hedging,
                "The answer hedges."),
    "sign_off": (_signs_off, _strip_sign_off, "The answer ends with a sign-off."),
}
FOLLOWS = "The answer follows the principle."


def load_constitution(path):
    """[(name, text)] of a constitution file, in its order; an unknown principle, a line
    that is not "name: text", a principle given twice or a file with none is refused in
    one line naming the file (and the line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the constitution ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, text = line.partition(":")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise UserError(f"{path}:{n}: expected 'name: text', got {line[:60]!r}")
        if name not in PRINCIPLES:
            raise UserError(f"{path}:{n}: unknown principle {name!r}; the world knows "
                            f"{', '.join(PRINCIPLES)}")
        if name in dict(out):
            raise UserError(f"{path}:{n}: principle {name!r} given twice")
        out.append((name, text))
    if not out:
        raise UserError(f"{path}: the constitution has no principle (one 'name: text' a line)")
    return out


def breaks(name, task, text):
    """Whether the answer breaks the principle."""
    return PRINCIPLES[name][0](task, text)


def critique(name, task, text):
    """The critique of the answer by the principle: the flaw named, or that there is none."""
    return PRINCIPLES[name][2] if breaks(name, task, text) else FOLLOWS


def revise(name, task, text):
    """The answer with the principle's flaw taken out (unchanged when it has none)."""
    return PRINCIPLES[name][1](task, text) if breaks(name, task, text) else text


def violations(constitution, task, text):
    """How many of the constitution's principles the answer breaks."""
    return sum(breaks(name, task, text) for name, _ in constitution)


# --- what teaches the model the operations (training entities only) ----------------------

def critique_request(principle_text, question, draft):
    """The user turn that asks for a critique and a revision by one principle."""
    return f"Critique: {principle_text} Question: {question} Answer: {draft}"


def critique_reply(name, task, draft):
    """The reply the world's ground truth gives: the critique, then the revision."""
    return f"{critique(name, task, draft)} Revision: {revise(name, task, draft)}"


def parse_revision(reply):
    """The revision of a critique reply (the text after its last "Revision:"), or None."""
    head, sep, tail = reply.rpartition("Revision:")
    return tail.strip() if sep and tail.strip() else None


def judge_request(question, a, b):
    """The user turn that asks which of two answers the constitution prefers."""
    return f"Which answer is better by the constitution? Question: {question} A: {a} B: {b}"


def draft(rng, task, habit_rate=0.6):
    """An answer as an SFT model writes one: mostly the ideal answer, often with the
    contractors' sign-off, sometimes with a pleasantry, a hedge or a restated question,
    sometimes wrong."""
    style = rng.choices(["ideal", "preamble", "hedged", "verbose", "wrong", "preamble_wrong"],
                        weights=[6, 2, 1, 1, 1, 1])[0]
    text, _ = world.respond(rng, task, style)
    if task.kind in world.SIGN_OFFS and rng.random() < habit_rate:
        text = f"{text} {world.SIGN_OFFS[task.kind]}"
    return text


def demonstrations(rng, tasks, constitution, n_critiques, n_judgements):
    """SFT records ({"prompt", "response"}) that teach the critique-and-revision operation
    and the judgement, on the given tasks (training ones). A critique is of a random
    principle of the constitution, on a draft that breaks it half the time; a judgement
    compares two drafts that differ in how many principles they break, with the better
    one at A or B at random."""
    names = dict(constitution)
    out = []
    while len(out) < n_critiques:
        task = rng.choice(tasks)
        name = rng.choice(list(names))
        text = draft(rng, task)
        for _ in range(20):  # about half the drafts break the principle asked about
            if breaks(name, task, text) == (len(out) % 2 == 0):
                break
            text = draft(rng, task)
        out.append(dict(prompt=critique_request(names[name], task.prompt, text),
                        response=critique_reply(name, task, text), kind="critique"))
    judged = 0
    while judged < n_judgements:
        task = rng.choice(tasks)
        x, y = draft(rng, task), draft(rng, task)
        vx, vy = violations(constitution, task, x), violations(constitution, task, y)
        if vx == vy:
            continue
        better, worse = (x, y) if vx < vy else (y, x)
        first = rng.random() < 0.5
        a, b = (better, worse) if first else (worse, better)
        out.append(dict(prompt=judge_request(task.prompt, a, b), response="A" if first else "B",
                        kind="judgement"))
        judged += 1
    return out
