"""One way to do each thing: each shared helper is defined once and the old copies stay gone.

Read from the package's source with ``ast`` (nothing is imported), so a new copy fails here
whichever module it lands in.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "part_distillation"

#: helper -> the one module (relative to the package) that defines it
ONE_HOME = {
    "resolve_device": "devices.py",
    "resolve_checkpoint": "engine/checkpoint.py",
    "list_checkpoints": "engine/checkpoint.py",
    "load_tensor_file": "state_file.py",
    "model_state": "state_file.py",
    "atomic_open": "store/files.py",
    "atomic_write_bytes": "store/files.py",
    "atomic_write_text": "store/files.py",
    "atomic_write_json": "store/files.py",
    "masks_to_label_map": "masks.py",
    "label_map_to_masks": "masks.py",
    "check_manifest": "store/manifest.py",
    "render_table": "evaluation/tables.py",
    "metric_cell": "evaluation/tables.py",
}
#: names of the copies these replaced: none may come back under its old name
RETIRED = {"device_of", "device_for", "choose_device", "labels_to_segments", "part_label_map", "label_map",
           "_state_dict", "_fmt", "_write_json_atomic", "write_atomic"}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _definitions() -> dict[str, list[str]]:
    found = defaultdict(list)
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[node.name].append(f"{name}:{node.lineno}")
    return found


def _calls(dotted: str) -> list[str]:
    """Where ``a.b(...)`` (``dotted`` = "a.b") is called, as module:line."""
    owner, attr = dotted.split(".")
    return [f"{name}:{node.lineno}" for name, tree in MODULES.items() for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner]


DEFINITIONS = _definitions()


@pytest.mark.parametrize("helper", sorted(ONE_HOME))
def test_each_shared_helper_is_defined_once_in_its_room(helper):
    assert [d.split(":")[0] for d in DEFINITIONS[helper]] == [ONE_HOME[helper]], DEFINITIONS[helper]


def test_the_replaced_copies_are_gone():
    back = {name: DEFINITIONS[name] for name in RETIRED if DEFINITIONS.get(name)}
    assert not back, f"copies of shared helpers came back: {back}"


def test_one_safe_torch_load():
    assert [c.split(":")[0] for c in _calls("torch.load")] == ["state_file.py"]


def test_files_are_replaced_only_by_the_store():
    """``os.replace``: store.files' atomic writes, plus the store's own shard repair and manifest link."""
    outside = [c for c in _calls("os.replace") if not c.startswith("store/")]
    assert not outside, f"write through store.files.atomic_open / atomic_write_*: {outside}"


def test_the_device_is_chosen_in_one_function():
    """No function but ``resolve_device`` both asks whether CUDA is there and makes a device."""
    choosers = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                calls = {(c.func.attr, ast.unparse(c.func.value)) for c in ast.walk(node)
                         if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
                if ("is_available", "torch.cuda") in calls and ("device", "torch") in calls:
                    choosers.append(f"{name}:{node.name}")
    assert choosers == ["devices.py:resolve_device"]


def test_checkpoint_files_are_listed_by_engine_checkpoint():
    globbing = {name for name, tree in MODULES.items() for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value.startswith("model_") and node.value.endswith(".pth")}
    assert globbing <= {"engine/checkpoint.py"}, globbing
