"""The runtime requirements of ``setup.py`` are what the package imports: nothing unused is
installed with it, and what only the tests and benchmarks use (scikit-learn, the reference
k-means they compare against) is an extra, not a runtime requirement."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Runtime requirements used without an import of their own in the package -> how they are used.
USED_WITHOUT_IMPORT = {
    "hydra-submitit-launcher": "a Hydra plugin, found by hydra/launcher=submitit_* (configs/hydra/launcher/)",
    "tensorboard": "the writer behind torch.utils.tensorboard (engine/hooks.py)",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """``install_requires`` and ``extras_require`` of setup.py, as normalised distribution names."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return ({_name(r) for r in kw["install_requires"]},
            {extra: {_name(r) for r in reqs} for extra, reqs in kw.get("extras_require", {}).items()})


def imported_distributions(folder: Path) -> dict[str, set[str]]:
    """Distribution -> the files of ``folder`` that import it (at any level of the file)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "part_distillation":
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(dist.lower().replace("_", "-"), set()).add(str(path.relative_to(REPO)))
    return found


def test_every_runtime_requirement_is_used_by_the_package():
    runtime, _ = setup_requirements()
    imported = imported_distributions(REPO / "part_distillation")
    unused = sorted(runtime - set(imported) - set(USED_WITHOUT_IMPORT))
    assert not unused, f"setup.py install_requires lists {unused}, which part_distillation/ never imports"


def test_every_package_import_is_a_runtime_requirement():
    runtime, _ = setup_requirements()
    imported = imported_distributions(REPO / "part_distillation")
    missing = {dist: sorted(files) for dist, files in imported.items() if dist not in runtime}
    assert not missing, f"part_distillation/ imports distributions setup.py does not require: {missing}"


def test_scikit_learn_is_a_test_and_benchmark_extra_only():
    runtime, extras = setup_requirements()
    assert "scikit-learn" not in runtime and "scikit-learn" in extras["test"]
    users = set(imported_distributions(REPO / "tests")) | set(imported_distributions(REPO / "benchmarks"))
    assert "scikit-learn" in users  # what the extra is for: tests/models/test_kmeans.py, benchmarks B1, B4, B5, B7
