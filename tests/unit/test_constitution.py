"""The miniature constitution: its file, and the world's ground truth for each principle
(whether an answer breaks it, the critique, the revision), on hand-made answers and on
every styled answer the world writes."""

import random

import pytest

from cli import UserError
from data import constitution as C
from data import world

TASK = world.Task("smaller", (4, 9), "Which is smaller, 4 or 9?")


@pytest.mark.parametrize("name, draft, revised, critique", [
    ("pleasantry", "Great question! 4 is smaller.", "4 is smaller.",
     "The answer opens with a pleasantry."),
    ("restating", "You asked: Which is smaller, 4 or 9? 4 is smaller.", "4 is smaller.",
     "The answer restates the question."),
    ("hedging", "I think 4 is smaller.", "4 is smaller.", "The answer hedges."),
    ("hedging", "If I am not mistaken, 4 is smaller.", "4 is smaller.", "The answer hedges."),
    ("sign_off", "4 is smaller. I hope this helps! Feel free to ask more.", "4 is smaller.",
     "The answer ends with a sign-off."),
    ("sign_off", "4 is smaller.", "4 is smaller.", C.FOLLOWS),
    ("pleasantry", "I think 4 is smaller.", "I think 4 is smaller.", C.FOLLOWS),
])
def test_each_principle_by_hand(name, draft, revised, critique):
    assert C.breaks(name, TASK, draft) == (critique != C.FOLLOWS)
    assert C.critique(name, TASK, draft) == critique
    assert C.revise(name, TASK, draft) == revised


def test_revisions_of_every_styled_answer():
    """All four revisions leave no flaw of the constitution; an answer whose only faults
    are those flaws becomes the ideal answer; the gold score never falls."""
    constitution = C.load_constitution(C.DEFAULT)
    rng = random.Random(0)
    for _ in range(3000):
        kind = rng.choice(sorted(world.FORMAT_RE))
        task = world.sample_task(rng, kind, "train")
        style = rng.choice(world.STYLES)
        text, ended = world.respond(rng, task, style)
        if kind in world.SIGN_OFFS and rng.random() < 0.5:  # the contractors' habit
            text = f"{text} {world.SIGN_OFFS[kind]}"
        revised = text
        for name, _ in constitution:
            revised = C.revise(name, task, revised)
        assert C.violations(constitution, task, revised) == 0, (text, revised)
        if style in ("ideal", "preamble", "verbose", "hedged"):
            assert revised == world.ideal_answer(task), (text, revised)
        assert world.gold(task, revised, ended) >= world.gold(task, text, ended) - 1e-9


def test_the_constitution_file(tmp_path):
    assert [n for n, _ in C.load_constitution(C.DEFAULT)] == list(C.PRINCIPLES)
    cases = {
        "unknown": ("pleasantry: Be plain.\nflattery: Do not flatter.\n",
                    ":2: unknown principle 'flattery'; the world knows pleasantry, restating"),
        "empty": ("# nothing but a comment\n\n", ": the constitution has no principle"),
        "no colon": ("pleasantry\n", ":1: expected 'name: text', got 'pleasantry'"),
        "no text": ("hedging:   \n", ":1: expected 'name: text'"),
        "twice": ("hedging: a\nhedging: b\n", ":2: principle 'hedging' given twice"),
        "not text": (b"\xff\xfe", ": cannot read the constitution"),
    }
    for case, (content, needle) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.txt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        with pytest.raises(UserError) as e:
            C.load_constitution(path)
        assert str(e.value).startswith(str(path)) and needle in str(e.value), case
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot read"):
        C.load_constitution(tmp_path / "missing.txt")


def test_demonstrations_teach_both_operations():
    """Critiques come half with the flaw and half without, each reply's revision the
    ground truth's; judgements put the answer breaking fewer principles at A or B."""
    constitution = C.load_constitution(C.DEFAULT)
    rng = random.Random(3)
    tasks = [world.sample_task(rng, k, "train") for k in sorted(world.FORMAT_RE) for _ in range(5)]
    demos = C.demonstrations(random.Random(4), tasks, constitution, 200, 100)
    crit = [d for d in demos if d["kind"] == "critique"]
    judge = [d for d in demos if d["kind"] == "judgement"]
    assert len(crit) == 200 and len(judge) == 100
    flawed = sum(not d["response"].startswith(C.FOLLOWS) for d in crit)
    assert 80 <= flawed <= 120
    for d in crit:
        assert d["prompt"].startswith("Critique: ") and C.parse_revision(d["response"])
    assert {d["response"] for d in judge} == {"A", "B"}
    assert C.parse_revision("It hedges. Revision: 4 is smaller.") == "4 is smaller."
    assert C.parse_revision("It hedges.") is None and C.parse_revision("Revision: ") is None
    # each judgement's letter points at the answer that breaks fewer principles
    by_question = {t.prompt: t for t in tasks}
    for d in judge:
        head, b = d["prompt"].rsplit(" B: ", 1)
        head, a = head.rsplit(" A: ", 1)
        task = by_question[head.split(" Question: ", 1)[1]]
        va, vb = (C.violations(constitution, task, x) for x in (a, b))
        assert (va < vb) == (d["response"] == "A") and va != vb
