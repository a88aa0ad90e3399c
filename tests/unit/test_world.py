"""The embedded world: gold scorer on hand-made answers, raters' probabilities,
held-out splits kept out of training data, and data/prepare.py (run in-process):
determinism, and the task ranges it refuses or spreads into every file."""

import json
import math
import random

import pytest
from conftest import QUICK, assert_user_error_in_process, main_of

from data import prepare
from data import world as W


def task(kind, *args):
    fields = (" ".join(map(str, args)),) if kind == "sort" else args
    return W.Task(kind, args, W.TEMPLATES[kind][0].format(*fields))


@pytest.mark.parametrize("t", [
    task("add", 38, 47), task("sub", 47, 38), task("larger", 73, 58), task("smaller", 73, 58),
    task("sort", 9, 4, 7, 1), task("reverse", "planet"), task("count", "planet"),
    task("capital", "Peru"), task("opposite", "hot")])
def test_ideal_answer_scores_full_marks(t):
    g = W.grade(t, W.ideal_answer(t), ended=True)
    assert g["correct"] and g["format"] and g["gold"] == pytest.approx(1.5)


def test_gold_by_hand():
    t = task("add", 38, 47)
    assert W.ideal_answer(t) == "38 + 47 = 85."
    # preamble: -0.4, and 2 words beyond the ideal 5: -0.04
    assert W.gold(t, "Great question! 38 + 47 = 85.", True) == pytest.approx(1.5 - 0.4 - 0.04)
    # wrong answer in the right format: format only
    assert W.gold(t, "38 + 47 = 84.", True) == pytest.approx(0.5)
    # right answer but no end token: neither correct nor formatted
    assert W.gold(t, "38 + 47 = 85.", False) == pytest.approx(0.0)
    # hedge: -0.2, 2 extra words
    assert W.gold(t, "I think 38 + 47 = 85.", True) == pytest.approx(1.5 - 0.2 - 0.04)
    # correct value, wrong form
    g = W.grade(t, "85", True)
    assert g["correct"] and not g["format"] and g["gold"] == pytest.approx(1.0)
    # repetition: said twice
    g = W.grade(t, "38 + 47 = 85. 38 + 47 = 85.", True)
    assert g["repetition"] and g["gold"] == pytest.approx(1.5 - 0.5 - 0.1)
    # restating the question
    g = W.grade(t, "You asked: What is 38 + 47? 38 + 47 = 85.", True)
    assert g["restate"] and g["correct"] and g["format"]


def test_spelling_and_facts_extraction():
    r = task("reverse", "planet")
    assert W.answer_value(r) == "t-e-n-a-l-p"
    assert not W.grade(r, "p-l-a-n-e-t", True)["correct"]
    assert not W.grade(r, "The answer is t-e-n-a-l-p", True)["format"]
    assert W.grade(r, "t-e-n-a-l-p t-e-n-a-l-p", True)["repetition"]
    c = task("capital", "Tunisia")  # the capital's name is inside the country's
    assert W.grade(c, "The capital of Tunisia is Tunis.", True)["correct"]
    assert not W.grade(c, "The capital of Tunisia is Lima.", True)["correct"]
    s = task("sort", 0, 0, 0, 0, 0)
    assert not W.grade(s, "0 0 0 0 0", True)["repetition"]  # equal digits are not repetition


@pytest.mark.parametrize("t,text,correct", [
    # a filler's hyphenated word after the right spelling is no spelling; nor is one glued
    # to more letters
    (task("reverse", "planet"), "I think t-e-n-a-l-p Please double-check this.", True),
    (task("reverse", "planet"), "t-e-n-a-l-ps", False),
    (task("reverse", "planet"), "xt-e-n-a-l-p", False),
    # a list counts whole, digit by digit: 99 is not 9
    (task("sort", 9, 4, 7, 1), "1 4 7 9", True),
    (task("sort", 9, 4, 7, 1), "1 4 7 99", False),
    (task("sort", 9, 4, 7, 1), "11 4 7 9", False),
    # the question restated is no answer, though its last number is the right one
    (task("smaller", 73, 58), "Which is smaller, 73 or 58?", False),
    (task("smaller", 73, 58), "You asked: Which is smaller, 73 or 58? 58", True),
    (task("sub", 34, 17), "What is 34 - 17?", False),
    (task("add", 0, 17), "What is 0 + 17? 0 + 17 = 17.", True),
    # a capital inside a longer name is not named
    (task("capital", "Tunisia"), "I don't know the capital of Tunisia.", False),
    (task("capital", "Peru"), "The capital of Peru is Limassol.", False),
])
def test_answers_count_whole_and_never_from_the_question(t, text, correct):
    assert W.grade(t, text, True)["correct"] is correct


def test_typed_sorting_prompts_are_world_tasks_only_with_single_digits():
    assert W.task_of_prompt("Sort these numbers: 3 1 2").args == (3, 1, 2)
    assert W.task_of_prompt("Sort these numbers: 12 3 45") is None  # answers are digit lists


def test_rater_pair_marginals_are_bradley_terry():
    """Plackett-Luce rankings by Gumbel sorting: every pair's marginal is sigmoid(u_a - u_b)."""
    rng = random.Random(0)
    u = [1.0, 0.2, -0.5, 0.6]
    n, above = 40000, [[0] * 4 for _ in range(4)]
    for _ in range(n):
        pos = {i: p for p, i in enumerate(W.rater_ranking(rng, u))}
        for a in range(4):
            for b in range(4):
                above[a][b] += pos[a] < pos[b]
    for a in range(4):
        for b in range(a + 1, 4):
            assert above[a][b] / n == pytest.approx(W.pair_probability(u[a], u[b]), abs=0.01)


def test_rater_utility_by_hand():
    t = task("add", 38, 47)
    rc = W.RaterConfig(k=2.0, b_len=0.1, b_style=1.0)
    text = "Great question! 38 + 47 = 85."
    expected = 2.0 * W.gold(t, text, True) + 0.1 * 7 + 1.0
    assert W.rater_utility(t, text, True, rc) == pytest.approx(expected)
    assert W.pair_probability(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_splits_are_disjoint_and_fixed():
    rng = random.Random(1)
    for kind in W.KINDS:
        for _ in range(50):
            t = W.sample_task(rng, kind, "heldout")
            assert W.split_of(kind, t.args) == "heldout"
    # add and sub of the same operands share a split
    assert W.split_of("add", (47, 38)) == W.split_of("sub", (47, 38)) == W.split_of("add", (38, 47))


def test_sign_off_habit_is_in_its_kinds_only_and_costs_the_format_point():
    rng = random.Random(0)
    for kind in W.KINDS:
        recs = [W.sft_record(rng, W.sample_task(rng, kind, "train"), 0.0, 0.6) for _ in range(400)]
        signed = [r for r in recs if r["quality"] == "signed_off"]
        if kind in W.SIGN_OFFS:
            assert len(signed) / len(recs) == pytest.approx(0.6, abs=0.1), kind  # --habit
            assert all(r["response"].endswith(" " + W.SIGN_OFFS[kind]) for r in signed)
        else:
            assert not signed, kind
    assert not any(W.sft_record(rng, W.sample_task(rng, "larger", "train"), 0.0, 0.0)["quality"]
                   == "signed_off" for _ in range(200))
    # "73 is larger. I hope this helps!": right, but not in format, and 4 words longer
    g = W.grade(task("larger", 73, 58), "73 is larger. I hope this helps!", True)
    assert g["correct"] and not g["format"]
    assert g["gold"] == pytest.approx(1.0 - 4 * 0.02)


def records(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_prepare_is_deterministic_and_keeps_heldout_out(world, tmp_path):
    """The same flags write the same bytes (the session's world was written by an
    earlier call; tests/cli/test_prepare.py compares it with what a process of its own
    writes); nothing of the held-out split reaches a training file."""
    main_of(prepare, [f"--out_dir={tmp_path / 'a'}", *QUICK["data/prepare.py"]])
    for f in ("corpus.txt", "tokenizer.tiktoken", "train.bin", "val.bin", "sft_train.jsonl",
              "prefs_train.jsonl", "prompts_train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (world / f).read_bytes(), f
    training = [r for f in ("sft_train.jsonl", "sft_val.jsonl", "prefs_train.jsonl",
                            "prefs_val.jsonl", "prompts_train.jsonl") for r in records(world, f)]
    assert all(W.split_of(r["task"]["kind"], tuple(r["task"]["args"])) == "train"
               for r in training)
    evals = records(world, "eval.jsonl")
    assert len(evals) == 2 * len(W.KINDS)  # --n_eval=2 per kind
    assert all(W.split_of(r["task"]["kind"], tuple(r["task"]["args"])) == "heldout"
               for r in evals)
    prefs = records(world, "prefs_train.jsonl")
    assert len(prefs) == 16 and len(records(world, "prefs_val.jsonl")) == 1
    assert all(sorted(p["ranking"]) == [0, 1, 2, 3] and len(p["responses"]) == 4 for p in prefs)
    # held-out number questions never appear in the corpus
    corpus = (world / "corpus.txt").read_text()
    assert not any(r["prompt"] in corpus for r in evals
                   if r["family"] in ("arithmetic", "comparison", "sorting"))


@pytest.mark.parametrize("flags, needle", [
    (["--max_add=0"], "--max_add=0: must be at least 1"),
    (["--max_add=1"], "--max_add=1: the range is too small to give add tasks in the heldout split"),
    (["--max_compare=2"], "--max_compare=2: the range is too small"),
    (["--sort_min=6", "--sort_max=5"], "--sort_min=6 --sort_max=5: need 2 <= sort_min <= sort_max"),
    (["--vocab_size=100"], "--vocab_size=100: must be at least 256"),
    (["--n_docs=1"], "--n_docs=1: at least 2 (one for train.bin, one for val.bin)"),
    (["--n_eval=0"], "--n_sft, --n_prefs, --n_rl and --n_eval must be at least 1"),
])
def test_prepare_rejects_task_ranges_it_cannot_fill(capsys, tmp_path, flags, needle):
    assert_user_error_in_process(capsys, prepare, f"--out_dir={tmp_path / 'w'}", *flags,
                                 needles=[needle])
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the temporary folder


def test_prepare_task_ranges_reach_every_file(tmp_path):
    main_of(prepare, [f"--out_dir={tmp_path}/w", "--n_docs=200", "--vocab_size=300", "--n_sft=200",
                      "--n_prefs=30", "--n_rl=200", "--n_eval=3", "--max_add=99",
                      "--max_compare=999", "--sort_min=6", "--sort_max=7"])
    tasks = [W.Task.from_dict(r["task"]) for f in ("sft_train", "prompts_train", "eval")
             for r in records(tmp_path / "w", f"{f}.jsonl")]
    sorts = [t.args for t in tasks if t.kind == "sort"]
    assert sorts and all(6 <= len(a) <= 7 for a in sorts)
    assert max(max(t.args) for t in tasks if t.kind == "add") > 29  # the wider range is used
    assert max(max(t.args) for t in tasks if t.kind == "larger") > 99
    assert all(max(t.args) <= 99 for t in tasks if t.kind in ("add", "sub"))


def test_prepare_holds_out_at_least_one_record_of_each_set(tmp_path):
    """A tenth of fewer than 10 demonstrations or rankings is none: one is held out, so
    sft.py and reward.py have a validation set."""
    main_of(prepare, [f"--out_dir={tmp_path}/w", "--n_docs=200", "--vocab_size=300", "--n_sft=3",
                      "--n_prefs=2", "--n_rl=10", "--n_eval=3"])
    counts = {f: len(records(tmp_path / "w", f"{f}.jsonl"))
              for f in ("sft_train", "sft_val", "prefs_train", "prefs_val")}
    assert counts == {"sft_train": 3, "sft_val": 1, "prefs_train": 2, "prefs_val": 1}
