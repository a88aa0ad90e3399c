"""data/labeler.py in a real pseudo-terminal: one key per label without Enter, undo, an
unknown key, quit, resume, a SIGKILL while a pair is on the screen (no label given before
it is lost), a damaged last line, and the export that reward.py trains on."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, copy_world, main_of, read_log

import reward
from data import labeler

PAIRS = [{"prompt": f"Question {i}?", "responses": [{"text": f"first {i}", "ended": True},
                                                     {"text": f"second {i}", "ended": True}]}
         for i in range(5)]


class Terminal:
    """The labeler as a process on a pseudo-terminal: send keys, wait for text."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "data" / "labeler.py"), *args],
                                     stdin=slave, stdout=slave, stderr=slave, cwd=ROOT)
        os.close(slave)
        self.screen = ""

    def wait_for(self, text, timeout=20):
        end = time.time() + timeout
        while text not in self.screen:
            if time.time() > end:
                raise AssertionError(f"{text!r} never appeared; the screen: {self.screen[-600:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the process ended and closed the terminal
                    break
        return self.screen

    def key(self, k, then):
        """Press one key (no Enter) and wait for `then` to appear after it."""
        self.screen = ""
        os.write(self.master, k.encode())
        return self.wait_for(then)

    def close(self):
        try:
            self.proc.wait(timeout=20)
        finally:
            os.close(self.master)
        return self.proc.returncode


def events(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def files(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return pairs, tmp_path / "labels.jsonl"


def test_keys_undo_quit_resume_and_kill(files):
    pairs, log = files
    args = (f"--pairs={pairs}", f"--log={log}")
    t = Terminal(*args)
    t.wait_for("pair 1 of 5")
    t.key("a", "pair 2 of 5")
    t.key("z", "unknown key 'z'; press ? for help")
    t.key("?", "keys: a = A is better")
    t.key("u", "undid the label of pair 1")
    assert "pair 1 of 5" in t.screen
    t.key("b", "pair 2 of 5")
    t.key("t", "pair 3 of 5")
    t.key("q", "2 of 5 pairs labelled")
    assert t.close() == 0
    ev = events(log)
    assert [e["event"] for e in ev] == ["label", "undo", "label", "label"]
    assert [(e["pair"], e["choice"]) for e in ev if e["event"] == "label"] == [
        (0, "A"), (0, "B"), (1, "tie")]
    assert all(e["left"] in (0, 1) for e in ev if e["event"] == "label")

    # resume where the log ends; then a SIGKILL while pair 4 is shown loses nothing given
    t = Terminal(*args)
    t.wait_for("pair 3 of 5")
    t.key("x", "pair 4 of 5")
    t.proc.send_signal(signal.SIGKILL)
    t.close()
    labels, note = labeler.read_log(str(log), len(PAIRS))
    assert [(e["pair"], e["choice"]) for e in labels] == [(0, "B"), (1, "tie"), (2, "both_bad")]
    assert note is None

    # a damaged last line (a kill mid-write) is skipped and said; labelling goes on
    with open(log, "a") as f:
        f.write('{"event": "label", "pa')
    t = Terminal(*args)
    t.wait_for("cut off a damaged last line")
    t.wait_for("pair 4 of 5")
    t.key("s", "pair 5 of 5")
    t.key("a", "5 of 5 pairs labelled")
    assert t.close() == 0
    # the damaged line was cut off, so the labels given after it read back whole
    labels, note = labeler.read_log(str(log), len(PAIRS))
    assert [(e["pair"], e["choice"]) for e in labels] == [
        (0, "B"), (1, "tie"), (2, "both_bad"), (3, "skip"), (4, "A")]
    assert note is None


def test_the_same_pair_shows_the_same_order_after_a_resume(files):
    pairs, log = files
    t = Terminal(f"--pairs={pairs}", f"--log={log}")
    first = t.wait_for("? > ")  # the whole screen of pair 1
    t.key("q", "0 of 5 pairs labelled")
    t.close()
    t = Terminal(f"--pairs={pairs}", f"--log={log}")
    again = t.wait_for("? > ")
    t.key("q", "0 of 5")
    t.close()
    a_line = lambda s: next(line for line in s.splitlines() if line.startswith("A "))  # noqa: E731
    assert a_line(first) == a_line(again)


def test_a_log_damaged_before_its_end_is_refused(files, capsys):
    pairs, log = files
    log.write_text('not json\n{"event": "label", "pair": 0, "choice": "A", "left": 0}\n')
    with pytest.raises(SystemExit):
        with labeler.user_errors():
            main_of(labeler, [f"--pairs={pairs}", f"--log={log}"])
    err = capsys.readouterr().err
    assert f"{log}:1: not a line of this log" in err and err.count("\n") == 1
    # a label without the side its first answer was shown on, before the last line
    log.write_text('{"event": "label", "pair": 0, "choice": "A"}\n'
                   '{"event": "label", "pair": 0, "choice": "A", "left": 0}\n')
    with pytest.raises(SystemExit):
        with labeler.user_errors():
            main_of(labeler, [f"--pairs={pairs}", f"--log={log}"])
    assert f"{log}:1: not a line of this log" in capsys.readouterr().err


def test_labels_of_world_answers_train_the_reward_model(pipeline, tmp_path, capsys):
    world = copy_world(pipeline.data, tmp_path / "world")
    log = tmp_path / "labels.jsonl"
    common = [f"--data_dir={world}", f"--policy={pipeline.out / 'sft'}", f"--log={log}",
              "--n_pairs=6", "--max_new_tokens=8"]
    keys = "abab" + "t" + "ba"  # piped keys, one a line: 6 A/B choices and a tie
    p = subprocess.run([sys.executable, str(ROOT / "data" / "labeler.py"), *common],
                       input="\n".join(keys) + "\n", text=True, capture_output=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "6 of 6 pairs labelled" in p.stdout
    main_of(labeler, [*common, "--export=true"])
    rows = [json.loads(line) for line in (world / "prefs_human_train.jsonl").read_text()
            .splitlines()] + [json.loads(line) for line in
                              (world / "prefs_human_val.jsonl").read_text().splitlines()]
    assert len(rows) == 5  # the tie is left out
    assert all("gold" in r and "utility" in r for row in rows for r in row["responses"])
    main_of(reward, [f"--data_dir={world}", f"--init_from={pipeline.out / 'sft'}",
                     f"--out_dir={tmp_path / 'rm'}", "--prefs=prefs_human", "--batch_size=2",
                     "--max_steps=2", "--eval_interval=2", "--log_interval=1",
                     "--warmup_steps=1", "--norm_prompts=4", "--max_new_tokens=8"])
    assert [r["step"] for r in read_log(tmp_path / "rm" / "log.jsonl")][-1] == 1
    (world / "meta.json").write_text("{damaged")  # the export reads the raters from it
    with pytest.raises(SystemExit) as e, labeler.user_errors():
        main_of(labeler, [*common, "--export=true"])
    assert e.value.code == 2 and "meta.json: not the meta.json" in capsys.readouterr().err


def test_a_missing_pairs_file_and_a_log_that_is_a_folder_are_refused(files, capsys, tmp_path):
    pairs, log = files
    for args, needle in (([f"--pairs={tmp_path}/none.jsonl", f"--log={log}"],
                          f"--pairs={tmp_path}/none.jsonl not found: a JSONL file of pairs"),
                         ([f"--pairs={pairs}", f"--log={tmp_path}"],
                          f"--log={tmp_path} is a folder: name a file")):
        with pytest.raises(SystemExit) as e:
            with labeler.user_errors():
                main_of(labeler, args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing written
