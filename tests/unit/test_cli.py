"""cli.py: flags into a config, --help, comma-separated lists, and each config's RANGES."""

import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

import cli
from cli import UserError

# every script with a config: its flags are parsed by cli.parse_config
SCRIPTS = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "eval", "overopt",
           "data.prepare", "data.label", "pipeline")


@dataclass
class Cfg:
    lr: float = 1e-3      # learning rate
    steps: int = 10       # steps
    name: str = "x"       # a name
    flag: bool = False    # a switch
    frac: float = 0.5     # a fraction
    rate: float = 0.1     # a rate that must move something
    drop: float = 0.0     # a fraction below 1
    share: float = 1.0    # a fraction above 0

    RANGES: ClassVar = cli.ranges(at_least_1="steps", non_negative="lr", fraction="frac",
                                  positive="rate", below_1="drop", above_0="share")


def test_parse_config():
    c = cli.parse_config(Cfg, ["--lr=0.5", "--steps=3", "--name=a=b", "--flag=true"])
    assert (c.lr, c.steps, c.name, c.flag) == (0.5, 3, "a=b", True)
    assert cli.parse_config(Cfg, ["--flag=0"]).flag is False
    assert cli.parse_config(Cfg, []) == Cfg()
    with pytest.raises(UserError, match="--stepz: unknown flag"):
        cli.parse_config(Cfg, ["--stepz=3"])
    with pytest.raises(UserError, match="--steps=three: expected int"):
        cli.parse_config(Cfg, ["--steps=three"])
    with pytest.raises(UserError, match="--flag=maybe: expected bool"):
        cli.parse_config(Cfg, ["--flag=maybe"])
    with pytest.raises(UserError, match="--name=value"):
        cli.parse_config(Cfg, ["steps", "3"])


def test_range_errors():
    for flag, message in (("--steps=0", "--steps=0: must be at least 1"),
                          ("--lr=-1e-4", "--lr=-1e-4: must be at least 0"),
                          ("--frac=1.5", "--frac=1.5: must be between 0 and 1"),
                          ("--frac=-0.1", "--frac=-0.1: must be between 0 and 1"),
                          ("--lr=nan", "--lr=nan: must be a finite number"),
                          ("--lr=inf", "--lr=inf: must be a finite number"),
                          ("--rate=0", "--rate=0: must be above 0 (it would train nothing)"),
                          ("--rate=-1", "--rate=-1: must be above 0 (it would train nothing)"),
                          ("--drop=1", "--drop=1: must be between 0 and 1, below 1"),
                          ("--drop=-0.5", "--drop=-0.5: must be between 0 and 1, below 1"),
                          ("--share=0", "--share=0: must be between 0 and 1, above 0"),
                          ("--share=1.5", "--share=1.5: must be between 0 and 1, above 0")):
        with pytest.raises(UserError) as e:
            cli.parse_config(Cfg, [flag])
        assert str(e.value) == message
    c = cli.parse_config(Cfg, ["--steps=1", "--lr=0", "--frac=0", "--name=-5", "--rate=1e-9",
                               "--drop=0"])  # the bounds, where they are allowed
    assert (c.steps, c.lr, c.frac, c.name, c.rate, c.drop) == (1, 0.0, 0.0, "-5", 1e-9, 0.0)
    assert cli.parse_config(Cfg, ["--frac=1"]).frac == 1.0
    assert cli.parse_config(Cfg, ["--drop=0.999"]).drop == 0.999
    assert cli.parse_config(Cfg, ["--share=1e-9"]).share == 1e-9


def test_ranges_by_kind():
    assert cli.ranges(at_least_1="a b", non_negative="c", fraction="d", positive="e",
                      below_1="f", above_0="g") == {
        "a": (1, None, ""), "b": (1, None, ""), "c": (0, None, ""), "d": (0, 1, ""),
        "e": (0, None, "low"), "f": (0, 1, "high"), "g": (0, 1, "low")}
    assert cli.ranges() == {}


def test_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lr=0.001" in out and "learning rate" in out and "--flag=False" in out
    assert "usage: python " in out and "--RANGES" not in out  # a ClassVar is no flag
    flag_lines = [line for line in out.splitlines() if line.startswith("  --")]
    assert len(flag_lines) == 8
    comments = {re.match(r"  --\S+ +", line).end() for line in flag_lines}
    assert len(comments) == 1  # the comments start in one column, whatever the flags' lengths


def test_number_list_flags():
    assert cli.number_list("1, 4,16", "--best_of") == [1, 4, 16]
    assert cli.number_list("", "--best_of") == []
    assert cli.number_list("0,0.05", "--betas", float) == [0.0, 0.05]
    with pytest.raises(UserError, match="--best_of=1,x: expected comma-separated int"):
        cli.number_list("1,x", "--best_of")
    with pytest.raises(UserError, match="--best_of=0,2: every value must be at least 1"):
        cli.number_list("0,2", "--best_of", minimum=1)


def test_user_errors_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        with cli.user_errors():
            raise UserError("something is wrong")
    assert e.value.code == 2 and capsys.readouterr().err == "error: something is wrong\n"
    with pytest.raises(SystemExit) as e:
        with cli.user_errors():
            raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(ValueError):  # anything else is a bug: its traceback is shown
        with cli.user_errors():
            raise ValueError("a bug")


def configs():
    return [(name, importlib.import_module(name).Config) for name in SCRIPTS]


@pytest.mark.parametrize("name, config", configs(), ids=SCRIPTS)
def test_each_configs_ranges_name_its_fields(name, config):
    """RANGES names only fields of its own config, each with a default inside its range,
    and every field it names refuses a value just outside (one line naming the flag)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    bounds = getattr(config, "RANGES", {})
    assert set(bounds) <= set(fields), set(bounds) - set(fields)
    defaults = config()
    for field, (low, high, open_end) in bounds.items():
        typ, value = fields[field].type, getattr(defaults, field)
        assert typ in (int, float), field
        assert low <= value and (high is None or value <= high), (field, value)
        assert not (open_end == "low" and value == low or open_end == "high" and value == high)
        below = f"--{field}={low - 1 if typ is int else low - 0.5}"
        with pytest.raises(UserError, match=re.escape(below) + ": must be "):
            cli.parse_config(config, [below])
        if open_end == "low":  # the bound itself is refused too
            with pytest.raises(UserError, match=re.escape(f"--{field}={low}") + ": must be above"):
                cli.parse_config(config, [f"--{field}={low}"])
        if high is not None:
            above = f"--{field}={high + 1 if typ is int else high + 0.5}"
            with pytest.raises(UserError, match=re.escape(above) + ": must be between 0 and 1"):
                cli.parse_config(config, [above])
        if open_end == "high":
            with pytest.raises(UserError, match=re.escape(f"--{field}={high}") + ": must be "
                                                 "between 0 and 1, below 1"):
                cli.parse_config(config, [f"--{field}={high}"])
    for field, f in fields.items():  # no float flag takes nan or inf, ranged or not
        if f.type is float:
            with pytest.raises(UserError, match="must be a finite number"):
                cli.parse_config(config, [f"--{field}=nan"])


def test_a_flag_named_for_a_python_keyword(capsys):
    @dataclass
    class Paths:
        src: str = "out/sft"  # where from
        to: str = "x"         # where to

        FLAGS: ClassVar = {"from": "src"}

    assert cli.parse_config(Paths, ["--from=a", "--to=b"]) == Paths("a", "b")
    with pytest.raises(UserError, match="--src: unknown flag"):
        cli.parse_config(Paths, ["--src=a"])
    with pytest.raises(SystemExit):
        cli.parse_config(Paths, ["--help"])
    assert "--from=out/sft" in capsys.readouterr().out


def test_an_unknown_flag_names_the_flag_it_is_closest_to_if_any():
    for flag, hint in (("--stepz=3", " (did you mean --steps?)"),
                       ("--fracs=1", " (did you mean --frac?)"),
                       ("--flg=1", " (did you mean --flag?)"), ("--stride=1", ""),
                       ("--name_of_run=x", "")):
        with pytest.raises(UserError) as e:
            cli.parse_config(Cfg, [flag])
        assert str(e.value) == f"{flag.split('=')[0]}: unknown flag{hint}; see --help"


def test_refuse_unused_judges_only_flags_given():
    """A flag at its default is not 'given'; given on the command line, even at the
    default's value, it is, and refused where the run ignores it."""
    cfg = cli.parse_config(Cfg, ["--steps=3"])
    cli.refuse_unused(cfg, ["lr"], "here")  # lr not given: nothing to say
    with pytest.raises(UserError, match=r"^--steps=3 does nothing here$"):
        cli.refuse_unused(cfg, ["lr", "steps"], "here")
    cli.refuse_unused(Cfg(steps=3), ["steps"], "here")  # built in code, not from flags
