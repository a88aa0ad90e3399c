"""The project's imports run one way, through layers: a module imports only from
strictly lower layers, so there is no cycle and each layer can be read (and tested)
knowing only the ones below it. The bench/ scripts may import anything below L6."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYERS = [
    {"generation", "cli", "data.tokenizer", "data.world", "data"},        # L0: no project import
    {"model", "distributed", "hub", "data.constitution"},                # L1
    {"checkpoint", "logger", "optim", "hf"},                             # L2
    {"batch", "records"},                                                # L3
    {"reward_model", "formats"},                                         # L4
    {"pretrain", "sft", "reward", "ppo", "grpo", "dpo", "eval", "sample", # L5: the stages
     "pipeline", "data.label", "data.labeler", "data.prepare", "export"},
    {"overopt", "playground", "iterate", "cai"},                         # L6
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
BENCH = len(LAYERS) - 1  # bench/ scripts import from layers below this one


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files():
    """Every .py file of the project: the top level, data/ and bench/ (not tests/)."""
    return sorted([*ROOT.glob("*.py"), *(ROOT / "data").glob("*.py"),
                   *(ROOT / "bench").glob("*.py")])


def project_imports(path):
    """The project modules a file imports (anywhere in it, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from data import world` imports the module data.world
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in LAYER
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in LAYER or n.split(".")[0] in LAYER}
    return found


def graph():
    return {module_name(p): project_imports(p) for p in project_files()}


def test_every_module_has_a_layer():
    modules = {m for m in graph() if not m.startswith("bench.")}
    assert modules == set(LAYER), (modules - set(LAYER), set(LAYER) - modules)


def test_imports_run_down_the_layers():
    wrong = []
    for module, imports in graph().items():
        top = BENCH if module.startswith("bench.") else LAYER[module]
        wrong += [f"{module} (L{top}) imports {m} (L{LAYER[m]})" for m in sorted(imports)
                  if LAYER.get(m, top) >= top]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(g.get(m, ())):
            assert state.get(n) != 1, " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_what_it_should():
    """project_imports reads `import x`, `from x import y` and `from data import world`,
    also inside functions, and ignores third-party modules."""
    p = ROOT / "reward_model.py"
    assert project_imports(p) == {"batch", "checkpoint", "cli", "model"}
    assert project_imports(ROOT / "data" / "prepare.py") == {"cli", "data.tokenizer",
                                                             "data.world"}
    assert {"checkpoint", "distributed", "eval", "records", "reward_model"} <= project_imports(
        ROOT / "overopt.py")
