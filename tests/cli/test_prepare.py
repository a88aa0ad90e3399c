"""data/prepare.py as a process: the same bytes as in this process (nothing depends on
the process: hash seeds, say), and a range it refuses, with nothing written. --out_dir
is replaced as a whole, so a folder it did not write (or a file) is refused and left as
it was, the current folder and its parent included; a world it wrote is replaced, also
one of an older version and from inside it (`--out_dir=.`). Ctrl-C or SIGTERM while the
world is written ends the run at once and leaves the previous world, with no temporary
folder."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import QUICK, ROOT, assert_user_error, environ, run

PREPARE = ["data/prepare.py", *QUICK["data/prepare.py"]]


def prepare_in(cwd, *args):
    """`python data/prepare.py *args` (the quick sizes) with cwd as the current folder."""
    return subprocess.run([sys.executable, ROOT / "data" / "prepare.py", *args,
                           *QUICK["data/prepare.py"]], cwd=cwd, env=environ(),
                          capture_output=True, text=True, timeout=120)


def test_world_is_the_same_in_every_process(world, tmp_path):
    run("data/prepare.py", f"--out_dir={tmp_path / 'w'}", *QUICK["data/prepare.py"])
    assert sorted(f.name for f in (tmp_path / "w").iterdir()) == sorted(
        f.name for f in world.iterdir())
    for f in sorted(world.iterdir()):
        if f.name != "meta.json":  # (it records the output folder)
            assert f.read_bytes() == (tmp_path / "w" / f.name).read_bytes(), f.name


def test_prepare_refuses_a_range_through_a_process(tmp_path):
    p = run("data/prepare.py", f"--out_dir={tmp_path / 'w'}", "--max_add=1", ok=False)
    assert_user_error(p, "--max_add=1: the range is too small")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the temporary folder


def test_prepare_refuses_a_folder_it_did_not_write_and_a_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.txt").write_text("three years of work")
    p = run(*PREPARE, f"--out_dir={d}", ok=False)
    assert_user_error(p, f"--out_dir={d}: {d} is not empty and not a world",
                      "give a new or empty folder")
    p = run(*PREPARE, f"--out_dir={d / 'thesis.txt'}", ok=False)
    assert_user_error(p, f"{d / 'thesis.txt'} is a file, not a folder")
    assert [f.name for f in tmp_path.iterdir()] == ["d"]  # no d.tmp either
    assert [f.name for f in d.iterdir()] == ["thesis.txt"]
    assert (d / "thesis.txt").read_text() == "three years of work"


@pytest.mark.parametrize("out_dir", [".", "", ".."])
def test_prepare_refuses_the_current_folder_and_its_parent(tmp_path, out_dir):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    p = prepare_in(cwd, f"--out_dir={out_dir}")
    where = tmp_path if out_dir == ".." else cwd
    assert_user_error(p, f"--out_dir={out_dir}: {where} is not empty and not a world")
    assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*")) == [
        "cwd", "cwd/notes.txt"]


def test_prepare_replaces_a_world_it_wrote(tmp_path):
    w = tmp_path / "w"
    run(*PREPARE, f"--out_dir={w}", "--seed=2")
    names = sorted(f.name for f in w.iterdir())
    (w / "prefs_sft_train.jsonl").write_text("{}\n")  # what data/label.py adds to a world
    p = prepare_in(w, "--out_dir=.")  # from inside it
    assert p.returncode == 0, p.stderr
    assert json.loads((w / "meta.json").read_text())["config"]["seed"] == 1337
    assert sorted(f.name for f in w.iterdir()) == names  # replaced whole: label's file gone
    # a world of an older data/prepare.py: a meta.json with fewer fields
    (w / "meta.json").write_text(json.dumps({"config": {"out_dir": "data/world", "seed": 5},
                                             "tokenizer": "world-0123456789ab"}))
    run(*PREPARE, f"--out_dir={w}", "--seed=3")
    assert json.loads((w / "meta.json").read_text())["config"]["seed"] == 3
    assert [f.name for f in tmp_path.iterdir()] == ["w"]  # no w.tmp


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_the_world_is_written_leaves_the_previous_one(tmp_path, sig):
    w = tmp_path / "w"
    run(*PREPARE, f"--out_dir={w}")
    before = {f.name: f.read_bytes() for f in w.iterdir()}
    # the default corpus: tokenizing it takes long enough to be signalled in (where
    # tiktoken's thread pool hung on Ctrl-C); the run is stopped long before its end
    p = subprocess.Popen([sys.executable, "data/prepare.py", f"--out_dir={w}", "--seed=2"],
                         cwd=ROOT, env=environ(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         # as from a terminal: a shell's background job (as this suite may
                         # be) passes SIGINT on ignored, and a run keeps it ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        tokenizer, deadline = tmp_path / "w.tmp" / "tokenizer.tiktoken", time.time() + 60
        while not tokenizer.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # into the tokenizing of the corpus
        assert p.poll() is None, p.communicate()
        p.send_signal(sig)
        t = time.time()
        _, err = p.communicate(timeout=10)
        took = time.time() - t
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert err.strip() == ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM")
    assert took < 5, took
    assert [f.name for f in tmp_path.iterdir()] == ["w"]  # no w.tmp
    assert {f.name: f.read_bytes() for f in w.iterdir()} == before


def test_the_labels_a_person_gave_are_carried_into_the_new_world(tmp_path):
    w = tmp_path / "w"
    run(*PREPARE, f"--out_dir={w}", "--seed=2")
    given = {"labels_human.jsonl": '{"event": "label", "choice": "A"}\n',
             "prefs_human_train.jsonl": "{}\n", "prefs_playground_train.jsonl": "{}\n"}
    for name, text in given.items():
        (w / name).write_text(text)
    (w / "prefs_sft_train.jsonl").write_text("{}\n")  # data/label.py's: made again, not kept
    p = run(*PREPARE, f"--out_dir={w}", "--seed=3")
    assert "kept the labels given in the world it replaced: labels_human.jsonl, " in p.stdout
    assert json.loads((w / "meta.json").read_text())["config"]["seed"] == 3
    assert {name: (w / name).read_text() for name in given} == given
    assert not (w / "prefs_sft_train.jsonl").exists()
