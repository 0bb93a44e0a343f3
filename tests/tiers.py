"""The test tiers: which tests are ``integration`` (they run a stage, the entry point, a
subprocess or a training loop), decided from the code instead of by hand.

``make test-fast`` runs ``pytest -m "not integration"`` for the edit-run loop; ``make test``
runs every tier. A test is put in the integration tier at collection when the functions it
reaches call one of :data:`TRIGGERS`: the test's own body, the module-level functions of
the test package it calls (transitively) and the fixtures it requests (theirs too). Names
are resolved through the test module's globals, so ``run_entry(...)``,
``launch.run_job(...)``, ``subprocess.run(...)``, ``Trainer(...)`` and
``<stage module>.run(...)`` are all seen whatever they are imported as.

A static rule can miss a call made in an unusual way, so the fast tier also guards at run
time (:func:`guard`): in it, starting a subprocess, a stage job or a training loop fails the
test with a message saying to let the rule see the call. A miss can therefore never make
the fast tier slow without saying so.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import types
from typing import Callable, Iterable

import pytest

STAGE_PACKAGE = "part_distillation.stages"


def _triggers() -> dict[object, str]:
    """Objects whose call makes a test integration, with what they start (imported lazily:
    the rule runs once per collected test, the imports once per session)."""
    from part_distillation import launch
    from part_distillation.engine import train_loop
    from tests import helpers

    return {
        subprocess.run: "a subprocess", subprocess.Popen: "a subprocess",
        subprocess.check_call: "a subprocess", subprocess.check_output: "a subprocess",
        subprocess.call: "a subprocess",
        helpers.run_entry: "the entry point", helpers.kill_entry_after_first_record: "the entry point",
        launch.run_job: "a stage job", launch.run_in_context: "a stage job",
        train_loop.Trainer: "a training loop",
    }


TRIGGERS = functools.lru_cache(maxsize=None)(_triggers)
#: Stands for ``<something>trainer.train()``, whose receiver the rule cannot resolve.
TRAINER_LOOP = "a training loop"


def _is_stage_module(obj: object) -> bool:
    return isinstance(obj, types.ModuleType) and obj.__name__.startswith(STAGE_PACKAGE + ".")


def _parse(func: Callable) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return None


def _namespace(func: Callable, tree: ast.AST) -> dict:
    """``func``'s globals plus the names its own ``import`` statements bind (tests often
    import a stage or a helper inside the test)."""
    namespace = dict(getattr(func, "__globals__", {}))
    package = (getattr(func, "__module__", "") or "").rpartition(".")[0]
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = importlib.import_module(alias.name)
                    namespace[alias.asname or alias.name.partition(".")[0]] = (
                        module if alias.asname else importlib.import_module(alias.name.partition(".")[0]))
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                module = importlib.import_module(base, package) if node.level else importlib.import_module(base)
                for alias in node.names:
                    value = getattr(module, alias.name, None)
                    if value is None:  # a submodule
                        value = importlib.import_module(f"{module.__name__}.{alias.name}")
                    namespace[alias.asname or alias.name] = value
        except ImportError:
            continue
    return namespace


def _resolve(expr: ast.expr, namespace: dict) -> object | None:
    """The object a callee expression names (``a``, ``a.b``, ``a.b.c``), or None."""
    if isinstance(expr, ast.Name):
        return namespace.get(expr.id, getattr(__builtins__, expr.id, None) if not isinstance(
            __builtins__, dict) else __builtins__.get(expr.id))
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, namespace)
        if _is_stage_module(base) and expr.attr == "run":
            return base  # <stage module>.run(...): runs the stage in-process
        if expr.attr == "train" and ast.unparse(expr.value).lower().endswith("trainer"):
            return TRAINER_LOOP  # <...trainer>.train(): the object is made at run time
        return getattr(base, expr.attr, None) if base is not None else None
    return None


def _is_test_code(obj: object) -> bool:
    module = getattr(obj, "__module__", "") or ""
    return (inspect.isfunction(obj) or inspect.ismethod(obj)) and (
        module == "tests" or module.startswith("tests.") or module.startswith("test_"))


def reason(func: Callable, fixtures: Iterable[Callable] = ()) -> str | None:
    """What ``func`` (and the fixtures given) start, reached through test code; None: nothing."""
    triggers, seen = TRIGGERS(), set()
    todo = [func, *fixtures]
    while todo:
        current = inspect.unwrap(todo.pop())
        if id(current) in seen:
            continue
        seen.add(id(current))
        tree = _parse(current)
        if tree is None:
            continue
        namespace = _namespace(current, tree)
        for expr in (node.func for node in ast.walk(tree) if isinstance(node, ast.Call)):
            target = _resolve(expr, namespace)
            if id(target) in GUARDED:  # the rule sees through the fast tier's guard
                target = GUARDED[id(target)][1]
            if target is None:
                continue
            if target is TRAINER_LOOP:
                return TRAINER_LOOP
            if _is_stage_module(target):
                return f"a stage ({target.__name__.rsplit('.', 1)[-1]}.run)"
            try:
                hit = triggers.get(target)
            except TypeError:  # unhashable callee
                hit = None
            if hit:
                return hit
            if _is_test_code(target):
                todo.append(target)
    return None


def fixture_functions(item: pytest.Item) -> list[Callable]:
    """The functions of the fixtures ``item`` requests (the closest definition of each)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [defs[-1].func for defs in info.name2fixturedefs.values() if defs]


def mark_integration(items: Iterable[pytest.Item]) -> None:
    """Add the ``integration`` mark to every collected test the rule finds."""
    for item in items:
        if item.get_closest_marker("integration") or not isinstance(item, pytest.Function):
            continue
        why = reason(item.function, fixture_functions(item))
        if why:
            item.add_marker(pytest.mark.integration(reason=why))


#: Programs the fast tier may not start (short tools such as ``git`` stay allowed).
HEAVY_PROGRAMS = frozenset({"bash", "sh", "sbatch", "srun", "salloc", "part-distillation"})


#: id(replacement) -> (replacement, the function it replaced): the fast tier's guard, seen
#: through by the rule (the replacement is kept alive so that its id is never reused).
GUARDED: dict[int, tuple[object, object]] = {}


class TierViolation(AssertionError):
    pass


def guard(monkeypatch: pytest.MonkeyPatch, nodeid: str) -> None:
    """In the fast tier, make a subprocess, a stage job or a training loop fail the test."""
    from part_distillation import launch
    from part_distillation.engine import train_loop

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise TierViolation(
                f"{nodeid} starts {what} but is not in the integration tier: mark it "
                f"@pytest.mark.integration, or call it in a way tests/tiers.py's rule can see")
        return refused

    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        program = os.path.basename(str(args if isinstance(args, (str, os.PathLike)) else args[0]).split()[0])
        if program.startswith("python") or program in HEAVY_PROGRAMS or program == os.path.basename(sys.executable):
            refuse(f"a subprocess ({program})")()
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    from part_distillation.launch import local

    for module, name in ((launch, "run_job"), (local, "run_job"), (local, "run_in_context")):
        replacement = refuse("a stage job")  # the package's name and the one path every job takes
        GUARDED[id(replacement)] = (replacement, getattr(module, name))
        monkeypatch.setattr(module, name, replacement)
    monkeypatch.setattr(train_loop.Trainer, "train", refuse("a training loop"))
