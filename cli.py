"""Config from the command line, and the one-line error a user gets for a mistake.

Every script has one config dataclass. Each field is a flag (`--name=value`), the
comment after the field is its `--help` text, and the dataclass's RANGES (built with
`ranges` beside the fields) says which values each flag accepts. This module imports
nothing else of the project, so every other module can raise UserError.
"""

import contextlib
import dataclasses
import difflib
import inspect
import math
import os
import re
import signal
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, malformed record). The
    script prints its message as one line and exits with status 2, no traceback."""


# the signal a training loop was asked to stop by (distributed.StopSignal), if any: an
# error raised after it (a C++ compiler that Ctrl-C stopped as well) is part of stopping
SIGNALLED = []

# what a script undoes when it stops on a user's mistake: callbacks, run in turn (a run
# folder that the run made and that holds no checkpoint yet is removed: checkpoint.RunLock)
ON_USER_ERROR = []


@contextlib.contextmanager
def user_errors():
    """Wrap a script's main(): a UserError becomes one line on stderr and exit status 2;
    Ctrl-C outside a training loop exits 130 without a traceback; under torchrun, a
    process whose peer has gone says so in one line (exit 1). Either way, what was
    added to ON_USER_ERROR inside the block is undone first; on leaving the block it is
    dropped from the list either way."""
    mark = len(ON_USER_ERROR)
    try:
        yield
    except UserError as e:
        undo(mark)
        say(f"error: {e}")
        sys.exit(2)
    except OSError as e:  # a file the script could not read or write, whichever it was
        undo(mark)
        where = f"{e.filename}: " if e.filename else ""
        say(f"error: {where}{e.strerror or e}")
        sys.exit(2)
    except KeyboardInterrupt:
        undo(mark)
        say("interrupted")
        sys.exit(130)
    except Exception as e:
        if SIGNALLED:  # asked to stop, and the work under way failed with it
            undo(mark)
            name = signal.Signals(SIGNALLED[-1]).name
            say(f"stopped by {name} before a checkpoint could be saved ({type(e).__name__} "
                f"as it stopped); the run's last checkpoint, if any, stands")
            sys.exit(128 + SIGNALLED[-1])
        # under torchrun: a collective whose peer process has gone
        if not isinstance(e, RuntimeError) or int(os.environ.get("WORLD_SIZE", 1)) < 2 or \
                not re.search(r"(closed|reset) by peer", str(e)):
            raise
        undo(mark)
        say("error: another process of this run stopped first (its own line says why)")
        sys.exit(1)
    finally:
        del ON_USER_ERROR[mark:]


def say(line):
    """One line on stderr in one write: under torchrun every process may say the same
    line at once, and print's two writes (the text, then the newline) can interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def undo(mark=0):
    """Run the callbacks added since ON_USER_ERROR held `mark` of them, newest first."""
    while len(ON_USER_ERROR) > mark:
        ON_USER_ERROR.pop()()


def ranges(at_least_1="", non_negative="", positive="", fraction="", below_1="", above_0=""):
    """The accepted values of a config's fields, by kind: counts and intervals at least 1,
    coefficients at least 0, rates that must move something (a learning rate) above 0,
    fractions in [0, 1], fractions that must stay below 1 (dropout, Adam's betas), and
    fractions that must stay above 0 (top-p). Each argument is a space-separated list of
    field names. Returns {name: (low, high, which ends are open)}."""
    kinds = ((at_least_1, (1, None, "")), (non_negative, (0, None, "")),
             (positive, (0, None, "low")), (fraction, (0, 1, "")), (below_1, (0, 1, "high")),
             (above_0, (0, 1, "low")))
    return {name: bounds for names, bounds in kinds for name in names.split()}


def _field_help(cls):
    """The comment after each field in the dataclass source is its --help text."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                helps[m.group(1)] = m.group(2)
    return helps


def _convert(name, typ, text):
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float, str):
            return typ(text)
    except ValueError:
        pass
    raise UserError(f"--{name}={text}: expected {typ.__name__}")


def _check_range(name, value, text, bounds):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{name}={text}: must be a finite number")
    if bounds is None or isinstance(value, str):
        return
    low, high, open_end = bounds
    if high is None and (value < low or (open_end == "low" and value == low)):
        if open_end == "low":
            raise UserError(f"--{name}={text}: must be above {low} (it would train nothing)")
        raise UserError(f"--{name}={text}: must be at least {low}")
    if high is not None and (not low <= value <= high or (open_end == "high" and value == high)
                             or (open_end == "low" and value == low)):
        raise UserError(f"--{name}={text}: must be between {low} and {high}"
                        + (f", below {high}" if open_end == "high" else "")
                        + (f", above {low}" if open_end == "low" else ""))


def print_help(cls):
    """The docstring's first paragraph, the usage line, and one line per flag with its
    default and its comment, the comments in one column."""
    helps = _field_help(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    print(" ".join(doc.split()) or cls.__name__)
    print(f"\nusage: python {os.path.relpath(sys.argv[0])} [--name=value ...]\n")
    defaults, shown = cls(), {v: k for k, v in getattr(cls, "FLAGS", {}).items()}
    flags = {f.name: f"--{shown.get(f.name, f.name)}={getattr(defaults, f.name)!s}"
             for f in dataclasses.fields(cls)}
    width = max(map(len, flags.values()))
    for name, flag in flags.items():
        print(f"  {flag:<{width}}  {helps.get(name, '')}")


def parse_config(cls, argv=None):
    """Fill a config dataclass from --name=value flags; --help lists the fields. A config's
    FLAGS {flag: field} names a field whose flag is a Python keyword (--from: src)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "FLAGS", {})
    fields.update({flag: fields.pop(field) for flag, field in renamed.items()})
    if "-h" in argv or "--help" in argv:
        print_help(cls)
        sys.exit(0)
    bounds = getattr(cls, "RANGES", {})
    values = {}
    for arg in argv:
        m = re.fullmatch(r"--([A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if not m:
            raise UserError(f"argument {arg!r}: flags look like --name=value (see --help)")
        name, text = m.groups()
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"--{name}: unknown flag{hint}; see --help")
        field = renamed.get(name, name)
        values[field] = _convert(name, fields[name].type, text)
        _check_range(name, values[field], text, bounds.get(field))
    cfg = cls(**values)
    cfg._given = frozenset(values)  # the fields set on the command line (refuse_unused)
    return cfg


def refuse_unused(cfg, names, context, when=True):
    """A flag given on the command line that does nothing in this run (one of `names`,
    fields the run ignores when `when` holds; `context` says why, "with --loss=simpo") is
    refused in one line rather than ignored without a word."""
    for name in names if when else ():
        if name in getattr(cfg, "_given", ()):
            raise UserError(f"--{name}={getattr(cfg, name)} does nothing {context}")


def number_list(text, flag, typ=int, minimum=None):
    """A comma-separated flag value ("1,4,16") as a list of numbers; "" is the empty list."""
    try:
        values = [typ(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}={text}: expected comma-separated {typ.__name__} values, "
                        f"e.g. {flag}=1,4,16") from None
    if minimum is not None and any(v < minimum for v in values):
        raise UserError(f"{flag}={text}: every value must be at least {minimum}")
    return values
