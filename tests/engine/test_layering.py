"""The engine stays below the stages: it imports nothing of the run config, the stages, the
data formats or the figures (the stage side reads ``stage.*`` and passes plain values)."""
import ast
from pathlib import Path

import part_distillation.engine as engine

FORBIDDEN = ("part_distillation.stages", "part_distillation.config", "part_distillation.viz",
             "part_distillation.data", "part_distillation.models", "part_distillation.launch",
             "part_distillation.__main__")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against the engine package),
    at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "part_distillation.engine".split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return out


def test_engine_imports_no_stage_config_data_viz_or_model_module():
    files = sorted(Path(engine.__file__).parent.glob("*.py"))
    assert len(files) >= 9
    offending = {f.name: sorted(m for m in imported_modules(f) if m == "part_distillation" or
                                any(m == p or m.startswith(p + ".") for p in FORBIDDEN))
                 for f in files}
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_the_check_sees_relative_and_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from ..stages import training\n\ndef f():\n    from part_distillation.viz import score_overlay\n")
    modules = imported_modules(source)
    assert "part_distillation.stages.training" in modules and "part_distillation.viz" in modules
