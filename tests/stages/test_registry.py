"""The stage registry (``stages/__init__.py``): every stage declared once, by its own module,
and one answer to every question about a stage."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from part_distillation import stages
from part_distillation.config import config_dir, stage_schemas
from part_distillation.inference import RunInfo
from tests.helpers import REPO_ROOT

STAGES_DIR = REPO_ROOT / "part_distillation" / "stages"


def test_every_stage_is_declared_once_by_its_own_module():
    declared = {p.stem: len(re.findall(r"^SPEC = StageSpec\(", p.read_text(), re.M)) for p in STAGES_DIR.glob("*.py")}
    assert {name for name, n in declared.items() if n} == set(stages.names())
    assert all(n <= 1 for n in declared.values()), declared
    assert set(stages.names()) == {p.stem for p in (Path(config_dir()) / "stage").glob("*.yaml")}
    for name in stages.names():
        spec = stages.spec(name)
        assert spec.name == name and spec.schema is stage_schemas()[name]
        assert stages.module_of(name) == f"part_distillation.stages.{name}"
        assert callable(stages.get(name))


def test_a_stage_is_found_by_name_and_an_unknown_one_names_the_known_ones():
    assert stages.spec("dense_crf").kind == stages.SHARDED
    with pytest.raises(KeyError, match="unknown stage 'dense_crfs'; known: collage, dense_crf"):
        stages.spec("dense_crfs")


def test_looking_a_stage_up_imports_that_stage_only():
    code = ("import sys; from part_distillation import stages; stages.spec('index'); "
            "loaded = sorted(m for m in sys.modules if m.startswith('part_distillation.stages.')); "
            "assert loaded == ['part_distillation.stages.index', 'part_distillation.stages.shard_io'], loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_answers_keep_the_intent_of_the_tables_they_replace():
    def having(test) -> set[str]:
        return {name for name in stages.names() if test(stages.spec(name))}

    assert having(lambda s: s.kind == stages.SHARDED) == {"index", "detic_labeling", "pixel_grouping", "dense_crf",
                                                          "part_ranking", "evaluate", "predict"}
    # the two baselines train like stages 4 and 6: complete at their final checkpoint
    assert having(lambda s: s.kind == stages.TRAINING) == {"proposal_learning", "part_distillation",
                                                           "supervised_learning", "fewshot_learning"}
    assert having(lambda s: s.kind == stages.DRIVER) == {"pipeline"}
    assert having(lambda s: s.reads_image_tree) == {"index", "detic_labeling"}
    assert having(lambda s: not s.reported) == {"pipeline", "report", "status"}
    assert having(lambda s: s.merged_file) == {"evaluate", "predict"}


@pytest.mark.parametrize("name, stage, loads", [
    ("detic_labeling", {"source": "detic"}, True), ("detic_labeling", {"source": "mask2former"}, True),
    ("detic_labeling", {"source": "grabcut"}, False), ("predict", {"mask_source": "detic"}, True),
    ("predict", {"mask_source": "whole_image"}, False), ("pixel_grouping", {}, True),
    ("proposal_learning", {}, True), ("part_distillation", {}, True), ("part_ranking", {}, False),
    ("index", {}, False), ("supervised_learning", {}, False)])
def test_whether_a_job_loads_the_weights_is_its_stages_answer(name, stage, loads):
    run = SimpleNamespace(stage=SimpleNamespace(name=name, **stage))
    assert stages.loads_weights(run) is loads


def test_the_model_a_training_run_holds_is_its_schemas_answer():
    assert RunInfo("proposal_learning").kind == "proposal"
    assert RunInfo("part_distillation").kind == "part_distillation"
    for baseline in ("supervised_learning", "fewshot_learning"):
        assert RunInfo(baseline, {"stage": {"variant": "proposal"}}).kind == "proposal"
        assert RunInfo(baseline, {"stage": {"variant": "semantic"}}).kind == "semantic"
    assert RunInfo("dense_crf").kind is None and RunInfo(None).kind is None
