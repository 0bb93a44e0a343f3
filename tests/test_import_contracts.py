"""The house's layers point down only (``.importlinter``, checked with import-linter over every
module), every room is placed in them, and no private name (``_x``) is used across modules."""
from __future__ import annotations

import ast
import configparser
import subprocess
import sys

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "part_distillation"
CONFIG = REPO_ROOT / ".importlinter"


def _lint(config: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on this checkout's package (a child, so it analyses this copy)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, config], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})


def _contracts() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return parser


def test_import_contracts_hold():
    done = _lint(str(CONFIG))
    assert done.returncode == 0, f"an import points up (see .importlinter):\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout


def test_a_broken_contract_is_reported(tmp_path):
    """The check reads this package: a contract the code breaks (stages use the store) fails it."""
    config = tmp_path / "broken.ini"
    config.write_text("[importlinter]\nroot_package = part_distillation\n\n"
                      "[importlinter:contract:x]\nname = stages without the store\ntype = forbidden\n"
                      "source_modules =\n    part_distillation.stages\n"
                      "forbidden_modules =\n    part_distillation.store\n")
    done = _lint(str(config))
    assert done.returncode != 0 and "BROKEN" in done.stdout and "part_distillation.stages." in done.stdout


def test_every_room_is_in_the_layers():
    layers = _contracts()["importlinter:contract:layers"]["layers"]
    placed = {name.strip() for line in layers.splitlines() for name in line.split("|") if name.strip()}
    rooms = {f"part_distillation.{p.stem if p.is_file() else p.name}" for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert rooms == placed, f"rooms missing from .importlinter's layers: {sorted(rooms - placed)}; " \
                            f"layers naming no room: {sorted(placed - rooms)}"


def _private_uses(path) -> list[str]:
    """``from part_distillation.x import _y`` and ``module._y`` (module imported from the package)."""
    tree = ast.parse(path.read_text(), str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("part_distillation")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: imports {alias.name}")
                elif not alias.name[0].isupper():  # maybe a module: remember the name it is bound to
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("part_distillation"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_private_name_check_finds_both_forms(tmp_path):
    sample = REPO_ROOT / "part_distillation" / "_contract_probe_tmp.py"
    try:
        sample.write_text("from part_distillation.store.reader import _hidden\n"
                          "from part_distillation.store import reader\nreader._other()\n")
        assert [use.split(": ", 1)[1] for use in _private_uses(sample)] == ["imports _hidden", "uses reader._other"]
    finally:
        sample.unlink()
