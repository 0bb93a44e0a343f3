"""What a job needs, checked before anything runs: asked of the stage's spec."""
from __future__ import annotations

import pytest

from part_distillation.launch.preflight import PreflightError, check_job
from tests.launch.plans import compose


def test_a_pipeline_may_not_contain_a_stage_that_runs_stages(tmp_path):
    run = compose(tmp_path, "stage=pipeline", "stage.stages=[index,pipeline]")
    with pytest.raises(PreflightError, match="may not contain 'pipeline'"):
        check_job(run)
    with pytest.raises(KeyError, match="unknown stage 'indx'"):
        check_job(compose(tmp_path, "stage=pipeline", "stage.stages=[indx]"))


def test_the_weights_are_required_where_the_job_loads_them(tmp_path):
    from PIL import Image

    images, checkpoint = tmp_path / "images", tmp_path / "model.pth"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    checkpoint.write_bytes(b"")
    weights = ["model=detic_swinb", f"stage.images={images}", f"stage.checkpoint={checkpoint}"]
    check_job(compose(tmp_path, "stage=predict", *weights, "stage.mask_source=whole_image"))
    with pytest.raises(PreflightError, match="model.weights"):
        check_job(compose(tmp_path, "stage=predict", *weights, "stage.mask_source=detic"))
