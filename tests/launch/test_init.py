"""The launch package: its public names, and no import cycle with the stages."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "part_distillation"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``part_distillation`` module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = _module_name(path).rsplit(".", node.level - (path.name == "__init__.py"))[0]
            found |= {f"{base}.{node.module}" if node.module else f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("part_distillation")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_the_public_names_tests_and_the_entry_point_use_are_there():
    from part_distillation import launch

    for name in ("run_job", "compose_config", "check_job", "preflight_sweep", "JobFailed", "PreflightError",
                 "StageJob", "JobContext", "distributed_context", "job_error_message", "fail_submitit_job_at_exit"):
        assert hasattr(launch, name), name


def test_no_import_cycle_between_launching_and_the_stages():
    graph = _graph()
    launch_modules = {m for m in graph if m.startswith("part_distillation.launch")}
    # launching reaches the stages through the registry only (and the store check of stages.shard_io)
    for module in launch_modules:
        into_stages = {m for m in graph[module] if m.startswith("part_distillation.stages")}
        assert into_stages <= {"part_distillation.stages", "part_distillation.stages.shard_io"}, (module, into_stages)
    # and nothing launch imports (directly or not) imports launch back: no cycle through the stages
    def is_launch(module: str) -> bool:
        return module == "part_distillation.launch" or module.startswith("part_distillation.launch.")

    reached, todo = set(), [m for start in launch_modules for m in graph[start] if not is_launch(m)]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += [m for m in graph[module] if not is_launch(m)]
    back = sorted(m for m in reached if any(is_launch(i) for i in graph[m]))
    assert back == [], f"imported by launch and importing launch: {back}"


def test_the_entry_point_and_the_launcher_do_not_import_each_other():
    graph = _graph()
    for module, imported in graph.items():
        assert "part_distillation.__main__" not in imported, f"{module} imports __main__"
    code = ("import sys, part_distillation.launch, part_distillation.stages.pipeline, part_distillation.stages.report; "
            "assert 'part_distillation.__main__' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
