"""logger.py: the config line, a record every `interval` steps, forced and last steps."""

import json
from dataclasses import dataclass

from logger import Logger, append_jsonl


@dataclass
class Cfg:
    steps: int = 5


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_logger_writes_config_interval_forced_and_last_steps(tmp_path, capsys):
    log = Logger(tmp_path / "out", Cfg(), total_steps=5, interval=2, master=True)
    for step in range(5):
        log.step(step, tokens=10, force=step == 1, loss=float(step), other=1.0)
    recs = lines(tmp_path / "out" / "log.jsonl")
    assert recs[0] == {"config": {"steps": 5}, "start_step": 0}
    assert [r["step"] for r in recs[1:]] == [0, 1, 2, 4]  # interval 2, forced 1, the last 4
    assert [r["loss"] for r in recs[1:]] == [0.0, 1.0, 2.0, 4.0]
    assert all({"tok_per_s", "elapsed_s", "other"} <= set(r) for r in recs[1:])
    assert capsys.readouterr().out.count("step ") == 4
    # a resumed run appends, after dropping the steps it will log again (the run was killed
    # after step 4, its last checkpoint at step 3) and a last line the kill cut short
    with open(tmp_path / "out" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    resumed = Logger(tmp_path / "out", Cfg(), 5, 2, True, start_step=3)
    assert [r.get("step") for r in lines(tmp_path / "out" / "log.jsonl")] == [None, 0, 1, 2, None]
    resumed.step(3, 10, loss=1.0)  # off the interval: nothing
    resumed.step(4, 10, show=["loss"], loss=1.0, other=2.0)  # the console shows `show` only
    recs = lines(tmp_path / "out" / "log.jsonl")
    assert [r.get("step") for r in recs] == [None, 0, 1, 2, None, 4]
    assert recs[4] == {"config": {"steps": 5}, "start_step": 3} and recs[5]["other"] == 2.0
    (console,) = capsys.readouterr().out.splitlines()
    assert console.startswith("step     4/5 | loss 1 | ") and "other" not in console
    Logger(tmp_path / "out", Cfg(), 5, 2, True)
    assert len(lines(tmp_path / "out" / "log.jsonl")) == 1
    Logger(tmp_path / "other", Cfg(), 5, 2, master=False).step(0, 1, loss=1.0)
    assert not (tmp_path / "other" / "log.jsonl").exists()  # only the master writes
    append_jsonl(tmp_path / "x.jsonl", {"a": 1})
    append_jsonl(tmp_path / "x.jsonl", {"b": 2})
    assert lines(tmp_path / "x.jsonl") == [{"a": 1}, {"b": 2}]
