"""The rooms of training/ as docs/architecture.md draws them, checked on the source: who may import whom, no import
cycle, imports inside functions only for optional dependencies or a measured start-up cost (with the reason beside
them), and the names that only one room may know: a backend's, a stage's."""

import ast
import glob
import io
import os
import re
import subprocess
import sys
import tokenize

from conftest import REPO

TRAINING = os.path.join(REPO, "training")
COMMANDS = {"pretrain", "sft", "dpo", "kto", "grpo", "describe", "generate", "sample", "pairs", "report", "export_hf",
            "lr_find", "evaluate", "cli", "config"}
# what each room may import of training/ besides itself (docs/architecture.md, "What each room may import")
MAY_IMPORT = {
    "models": {"config"},
    "data": set(),
    "parallel": {"config", "data", "checkpoint.store", "checkpoint.state"},
    "checkpoint": {"config", "data", "models", "parallel"},
    "stages": {"config", "data", "models", "parallel.env", "checkpoint"},
    "run": {"config", "data", "models", "parallel", "checkpoint", "stages"},
    "config": {"models.transformer", "stages.losses", "data.batch"},
}
# imports that may sit inside a function, and why (each such line also says why, in a comment beside it)
OPTIONAL = ("deepspeed", "transformers", "tokenizers", "peft", "wandb", "matplotlib", "torch.utils.tensorboard",
            "torchao", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.tensor",
            "torch.distributed.device_mesh", "lm_eval", "training.run.harness")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in glob.glob(os.path.join(TRAINING, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, TRAINING)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        out[name] = ast.parse(open(path).read(), path)
    return out


def resolved(module: str, node: ast.ImportFrom) -> list[str]:
    """training-relative names of what `node` imports (a module, or a module's attribute)."""
    if node.level == 0:
        if not (node.module or "").startswith("training"):
            return []
        base = node.module.removeprefix("training").lstrip(".")
    else:
        package = module.split(".") if module in PACKAGES else module.split(".")[:-1]
        parent = package[: len(package) - (node.level - 1)]
        base = ".".join(parent + ([node.module] if node.module else []))
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        names.append(candidate if candidate in MODULES else base)
    return names


MODULES = modules()
PACKAGES = {name for name in MODULES if os.path.isdir(os.path.join(TRAINING, *name.split(".")))} | {""}


def top_level_imports(module: str) -> set[str]:
    tree = MODULES[module]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            found |= {n for n in resolved(module, node) if n}
    return found


def test_no_import_cycle_among_the_modules_of_training():
    graph = {m: top_level_imports(m) for m in MODULES}
    assert graph["run.loop"] and graph["cli"], "the graph was read"  # the check can fail: edges exist
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycle.append(path + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycle == []


def room(module: str) -> str:
    first = module.split(".")[0]
    return "command" if first in COMMANDS and first != "config" else first


def test_each_room_imports_only_what_the_architecture_allows():
    problems = []
    for module in MODULES:
        allowed = MAY_IMPORT.get(room(module))
        if allowed is None:  # commands and the package itself: anything
            continue
        for target in top_level_imports(module):
            if room(target) == room(module):
                continue
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                problems.append(f"{module} imports {target}")
    assert problems == []
    # and the check sees a violation: a room importing a command
    assert not any(room(t) == "command" for m in MODULES if room(m) == "run" for t in top_level_imports(m))


def test_imports_inside_functions_are_of_optional_dependencies_or_a_measured_start_up_cost_and_say_so():
    problems, seen = [], 0
    for path in glob.glob(os.path.join(TRAINING, "**", "*.py"), recursive=True):
        source = open(path).read()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, path)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                    continue
                seen += 1
                names = [inner.module] if isinstance(inner, ast.ImportFrom) else [a.name for a in inner.names]
                where = f"{os.path.relpath(path, REPO)}:{inner.lineno}"
                if getattr(inner, "level", 0) or not all(n and n.startswith(OPTIONAL) for n in names):
                    problems.append(f"{where}: imports {names} inside a function")
                elif not any("#" in line for line in lines[max(0, inner.lineno - 4):inner.lineno]):  # or just above
                    problems.append(f"{where}: no comment saying why {names} is imported here")
    assert problems == [] and seen > 0


def code_tokens(path: str):
    """(line, text) of every name and string in the code that is not a docstring or a comment."""
    source = open(path).read()
    docstrings = {node.body[0].value.lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in docstrings:
            yield tok.start[0], tok.string


def test_only_the_deepspeed_backend_names_deepspeed_and_only_stages_name_a_stage():
    stage_names = {"pretrain", "sft", "dpo", "kto", "grpo"}
    deepspeed, stages = [], []
    for path in glob.glob(os.path.join(TRAINING, "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, TRAINING)
        for line, text in code_tokens(path):
            if re.search("deepspeed", text, re.I) and relative not in (
                    "parallel/deepspeed.py", "parallel/backends.py", "config.py"):  # the backend, its registry line
                deepspeed.append(f"{relative}:{line}: {text}")                      # and the config's keys
            literal = text.strip("\"'") if text[0] in "\"'" else None
            if literal in stage_names and not relative.startswith("stages/") and relative != f"{literal}.py":
                stages.append(f"{relative}:{line}: {text}")
    assert deepspeed == [] and stages == []
    # the checks can fail: the registry and the entry points do name them
    assert any("deepspeed" in t for _, t in code_tokens(os.path.join(TRAINING, "parallel", "backends.py")))
    assert any(t == '"dpo"' for _, t in code_tokens(os.path.join(TRAINING, "dpo.py")))


def test_the_config_offers_the_backends_and_stages_there_are():
    from training.config import CHOICES
    from training.parallel.backends import BACKENDS
    from training.stages.registry import STAGES

    assert set(CHOICES["dist.backend"]) == set(BACKENDS)
    for name, stage in STAGES.items():  # a command per stage, a tiny config per stage
        assert os.path.isfile(os.path.join(TRAINING, f"{name}.py")) and stage.name == name
        assert glob.glob(os.path.join(REPO, "configs", name, "*tiny*.yaml")), name


def test_every_command_starts_in_a_fresh_interpreter():
    """Most tests fork the commands from a process that has imported the package (tests/forkserver.py); here
    every command's entry point runs (--help) in a real interpreter of its own, importing only what it imports
    (a module it uses but never imports would be missing)."""
    commands = sorted(n for n in COMMANDS if n not in ("cli", "config"))
    started = {c: subprocess.Popen([sys.executable, "-m", f"training.{c}", "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=REPO) for c in commands}
    for command, proc in started.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, (command, stderr[-2000:])
        assert stdout.startswith(f"usage: python -m training.{command}"), (command, stdout[:200])
