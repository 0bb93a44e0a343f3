"""Each setting is written once: a YAML file in ``configs/`` does not restate a value its
schema (``part_distillation/config.py``) or the file it is layered over already gives, and a
stage's output folder is spelled in one place (``PathsConfig``).

A restated default is a second copy of the setting: changing the schema then silently leaves
the YAML's old value in force.
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from part_distillation import config as schema

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: Values that equal what they are layered over on purpose, "<file>: <dotted key>" -> why.
EXCEPTIONS: dict[str, str] = {
    "model/mask2former_tiny.yaml: size": "a model file names its network in full (name and size)",
    "model/none.yaml: name": "a model file names its network in full",
    "stage_tuning/demo_evaluate.yaml: stage.dataset_root": "the demo recipe names the dataset it scores",
    "stage_tuning/demo_fewshot_learning.yaml: stage.split": "the demo recipe names the split it trains on",
    "stage_tuning/demo_supervised_learning.yaml: stage.split": "the demo recipe names the split it trains on",
}

#: Files allowed to spell a stage's output folder instead of ``${paths.<stage>}`` -> why.
SPELLS_OUTPUTS: dict[str, str] = {
    "stage_tuning/demo_evaluate.yaml": "the demo's predictor list: the held-out images' records (another data.name "
                                       "than evaluate's own)",
}


def schema_defaults(klass: type) -> dict:
    """Field name -> default value of a dataclass schema (fields without one left out)."""
    found = {}
    for f in fields(klass):
        if f.default is not MISSING:
            found[f.name] = f.default
        elif f.default_factory is not MISSING:
            found[f.name] = f.default_factory()
    return {k: v for k, v in found.items() if v != "???"}


def _load(path: Path) -> dict:
    text = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in text.items() if k != "defaults"}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def restated(values: dict, baseline: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``values`` whose value equals ``baseline``'s."""
    found = []
    for key, value in values.items():
        if key in baseline and _same(value, baseline[key]):
            found.append(prefix + key)
    return found


def _group_baselines() -> dict[str, tuple[type, str]]:
    """Top-level config key -> (schema, group folder)."""
    return {"data": (schema.DataConfig, "data"), "model": (schema.ModelConfig, "model"),
            "launcher": (schema.LauncherConfig, "launcher"), "paths": (schema.PathsConfig, "paths")}


def stage_baseline(stage: str) -> dict:
    """A stage's settings before any tuning: its schema's defaults, then ``configs/stage/<stage>.yaml``."""
    return {**schema_defaults(schema.stage_schemas()[stage]), **_load(CONFIGS / "stage" / f"{stage}.yaml")}


def restated_values() -> list[str]:
    """Every "<file>: <key>" in configs/ that restates the value it is layered over."""
    found: list[str] = []

    def note(path: Path, keys: list[str]) -> None:
        found.extend(f"{path.relative_to(CONFIGS)}: {k}" for k in keys)

    stages = schema.stage_schemas()
    for path in sorted((CONFIGS / "stage").glob("*.yaml")):
        note(path, restated(_load(path), schema_defaults(stages[path.stem])))
    for key, (klass, folder) in _group_baselines().items():
        for path in sorted((CONFIGS / folder).rglob("*.yaml")):
            note(path, restated(_load(path), schema_defaults(klass)))
    for path in sorted((CONFIGS / "stage_tuning").glob("*.yaml")):
        stage = next(s for s in sorted(stages, key=len, reverse=True) if path.stem.endswith("_" + s))
        values = _load(path)
        note(path, restated(values.get("stage", {}), stage_baseline(stage), "stage."))
        for key, (klass, _) in _group_baselines().items():
            if key != "model":  # a tuning's model.* overrides the model file picked, not the schema
                note(path, restated(values.get(key, {}), schema_defaults(klass), key + "."))
    for path in sorted((CONFIGS / "cluster").glob("*.yaml")):  # read by the pipeline's tunings
        note(path, restated(_load(path).get("stage", {}), stage_baseline("pipeline"), "stage."))
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        values = _load(path)
        for key, (klass, _) in _group_baselines().items():
            if key != "model":
                note(path, restated(values.get(key, {}), schema_defaults(klass), key + "."))
    return [r for r in found if r not in EXCEPTIONS]


def _values(tree) -> list[str]:
    """Every string value of a parsed YAML tree or schema default."""
    if isinstance(tree, dict):
        return [v for sub in tree.values() for v in _values(sub)]
    if isinstance(tree, list):
        return [v for sub in tree for v in _values(sub)]
    return [tree] if isinstance(tree, str) else []


def test_no_config_file_restates_a_default():
    """Run ``python tests/test_config_once.py`` to list them; remove each (or document it in
    EXCEPTIONS with the reason)."""
    assert restated_values() == []


def test_the_check_finds_a_restated_value():
    assert restated({"variant": "reference", "workers": 2, "follow": False},
                    schema_defaults(schema.DenseCRFStageConfig)) == ["variant", "follow"]
    assert restated({"flag": True}, {"flag": 1}) == []  # true is not the number 1


def test_the_exceptions_are_still_restated():
    """An exception whose value was changed or removed is dead: drop it from the list."""
    global EXCEPTIONS
    saved, EXCEPTIONS = EXCEPTIONS, {}
    try:
        found = set(restated_values())
    finally:
        EXCEPTIONS = saved
    assert set(EXCEPTIONS) <= found, set(EXCEPTIONS) - found


def test_each_stage_output_folder_is_written_once():
    """The stages' output folders (``PathsConfig``): each folder name appears in one setting
    of all the schemas and YAML files; everything else interpolates ``${paths.<stage>}``."""
    paths = schema_defaults(schema.PathsConfig)
    settings = [v for klass in vars(schema).values() if isinstance(klass, type) and hasattr(klass, "__dataclass_fields__")
                for v in _values(schema_defaults(klass))]
    settings += [v for path in CONFIGS.rglob("*.yaml") if str(path.relative_to(CONFIGS)) not in SPELLS_OUTPUTS
                 for v in _values(_load(path))]
    for stage in ("detic_labeling", "pixel_grouping", "dense_crf", "part_ranking", "proposal_learning",
                  "part_distillation", "pipeline"):
        folder = [part for part in paths[stage].split("/") if "${" not in part][-1]
        holders = [v for v in settings if "/" in v and folder in v.split("/")]
        assert holders == [paths[stage]], (stage, holders)


def test_stage_inputs_read_the_named_outputs():
    """Each stage reads the output of the stage before it by name, as the pipeline runs them."""
    chain = {"pixel_grouping": "detic_labeling", "dense_crf": "pixel_grouping", "proposal_learning": "dense_crf",
             "part_ranking": "dense_crf", "part_distillation": "part_ranking", "evaluate": "dense_crf"}
    for stage, before in chain.items():
        assert _load(CONFIGS / "stage" / f"{stage}.yaml")["input"] == f"${{paths.{before}}}", stage
        assert _load(CONFIGS / "stage" / f"{before}.yaml").get("output") in (f"${{paths.{before}}}", None), before


if __name__ == "__main__":
    print("\n".join(restated_values()))
