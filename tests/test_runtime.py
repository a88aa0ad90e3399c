"""The shared runtime: flags, schedule, atomic files, JSONL and checkpoint loading."""

import os
import re
from dataclasses import dataclass

import pytest
import torch

import runtime
from runtime import UserError


@dataclass
class Cfg:
    lr: float = 1e-3      # learning rate
    steps: int = 10       # steps
    name: str = "x"       # a name
    flag: bool = False    # a switch


def test_parse_config():
    c = runtime.parse_config(Cfg, ["--lr=0.5", "--steps=3", "--name=a=b", "--flag=true"])
    assert (c.lr, c.steps, c.name, c.flag) == (0.5, 3, "a=b", True)
    assert runtime.parse_config(Cfg, ["--flag=0"]).flag is False
    with pytest.raises(UserError, match="--stepz: unknown flag"):
        runtime.parse_config(Cfg, ["--stepz=3"])
    with pytest.raises(UserError, match="--steps=three: expected int"):
        runtime.parse_config(Cfg, ["--steps=three"])
    with pytest.raises(UserError, match="--flag=maybe: expected bool"):
        runtime.parse_config(Cfg, ["--flag=maybe"])
    with pytest.raises(UserError, match="--name=value"):
        runtime.parse_config(Cfg, ["steps", "3"])


def test_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit) as e:
        runtime.parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lr=0.001" in out and "learning rate" in out and "--flag=False" in out
    flag_lines = [line for line in out.splitlines() if line.startswith("  --")]
    comments = {re.match(r"  --\S+ +", line).end() for line in flag_lines}
    assert len(comments) == 1  # the comments start in one column, whatever the lengths of the flags


def test_lr_schedule():
    assert runtime.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert runtime.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert runtime.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert runtime.lr_at(55, 1.0, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert runtime.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    runtime.atomic_write(p, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runtime.atomic_write(p, boom)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "n": 1}\n\n{"prompt": "b"\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: malformed JSON"):
        runtime.read_jsonl(p, {"prompt": str})
    p.write_text('{"prompt": "a"}\n{"n": 1}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'prompt'"):
        runtime.read_jsonl(p, {"prompt": str})
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: field 'prompt' should be str, got int"):
        runtime.read_jsonl(p, {"prompt": str})
    p.write_text("")
    with pytest.raises(UserError, match="no records"):
        runtime.read_jsonl(p, {"prompt": str})
    with pytest.raises(UserError, match="prepare.py"):
        runtime.read_jsonl(tmp_path / "missing.jsonl", {})


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_roundtrip_and_pickle_refused(tmp_path):
    good = tmp_path / "good.pt"
    runtime.save_checkpoint(good, {"w": torch.ones(2), "step": 3, "name": "x"})
    assert runtime.load_checkpoint(good)["step"] == 3
    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(UserError, match="evil.pt: not a loadable checkpoint"):
        runtime.load_checkpoint(evil)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:50])
    with pytest.raises(UserError, match="trunc.pt: not a loadable checkpoint"):
        runtime.load_checkpoint(trunc)
    with pytest.raises(UserError, match=r"missing.pt not found: run `python sft.py` first"):
        runtime.load_checkpoint(tmp_path / "missing.pt", made_by="python sft.py")
