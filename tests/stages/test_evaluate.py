"""Stage `evaluate` on the synthetic dataset: true parts score 100, the strip baseline less."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from part_distillation.__main__ import config_dir
from part_distillation.config import ConfigError, validate
from part_distillation.data.frame import ImageFrame
from part_distillation.data.partimagenet import PartImageNetDataset
from part_distillation.data.part_datasets import open_part_dataset
from part_distillation.data.synthetic import make_synthetic_dataset, write_split_halves
from part_distillation.evaluation.predictors import ColourKMeansPredictor, ModelPredictor
from part_distillation.launch import JobContext
from part_distillation.masks import encode_rles
from part_distillation.stages import evaluate
from part_distillation.store import ConfigMismatchError, RecordStore, ShardWriter
from part_distillation.store.schemas import PART_SEGMENTS

from tests.model_runs import write_run


def _cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return validate(compose(config_name="config", overrides=["stage=evaluate", *overrides]))


def _strips(mask: np.ndarray, k: int) -> list[np.ndarray]:
    """The object's box cut into k equal strips along its longer side (the trivial baseline)."""
    ys, xs = np.nonzero(mask)
    axis, lo, hi = (1, xs.min(), xs.max() + 1) if np.ptp(xs) >= np.ptp(ys) else (0, ys.min(), ys.max() + 1)
    edges = np.linspace(lo, hi, k + 1).round().astype(int)
    coords = np.arange(mask.shape[axis])
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        band = (coords >= a) & (coords < b)
        out.append(mask & (band[None, :] if axis == 1 else band[:, None]))
    return out


def _write_records(root: Path, out: Path, splits: list[str], how: str) -> None:
    with ShardWriter(out, 0, 1, stage="dense_crf", config={"how": how}, schema=PART_SEGMENTS) as writer:
        for split in splits:
            _write_split(writer, PartImageNetDataset(root / "annotations" / f"{split}.json", root / split,
                                                     objects_file=root / "annotations" / f"objects_{split}.json"), how)


def _write_split(writer, dataset, how):
    for image in dataset:
        parts = dataset.part_masks(image.id)
        obj = dataset.object_mask(image.id)
        frame = ImageFrame.fit((image.height, image.width))
        if how == "truth":  # part i of its class -> id i + 1, the same in every image of the class
            order = np.argsort(parts.category_ids)
            masks, ids = parts.masks[order], np.arange(1, len(order) + 1)
        else:
            masks = np.stack(_strips(obj, 4))
            ids = np.arange(1, 5)
        writer.write({"key": image.path, "path": image.path, "wnid": image.wnid, "class_index": 0,
                      "class_name": image.object_class, **frame.as_record(),
                      "object_mask": encode_rles(frame.masks_to_fitted(obj[None]))[0],
                      "object_score": 1.0, "object_ratio": float(obj.mean()),
                      "part_masks": encode_rles(frame.masks_to_fitted(masks)), "part_ids": ids})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for split in ("train", "val"):
        make_synthetic_dataset(root, num_classes=2, images_per_class=3, size=64, seed=1, parts_per_class=3,
                               split=split)
    return root


def _metrics(cfg, label="records_dense_crf") -> dict:
    return json.loads((Path(cfg.stage.output) / label / "metrics.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("how", ["truth", "strips"])
def test_evaluate_records_both_protocols(synthetic, tmp_path, how):
    records = tmp_path / "records"
    _write_records(synthetic, records, ["train", "val"], how)
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[1,10]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    metrics = _metrics(cfg)
    assert metrics["images"] == 6
    reference, strict = metrics["reference"], metrics["strict"]
    if how == "truth":
        assert reference["AR@10"] == pytest.approx(100.0)
        assert reference["C-mIoU"] == pytest.approx(100.0)
        assert strict["AR@10"] == pytest.approx(100.0)
        assert strict["C-mIoU"] == pytest.approx(100.0)   # matched on val, evaluated on train
        assert summary["skipped"] == {}
    else:
        assert 0 < reference["C-mIoU"] < 90 and 0 < reference["AR@10"] < 90
    folder = Path(cfg.stage.output) / "records_dense_crf"
    table = (folder / "metrics.md").read_text()
    assert table.startswith("| protocol | AR@1 | AR@10 | C-mIoU | A-mIoU |") and "| strict |" in table
    assert (folder / "per_class.csv").read_text().startswith("object_class,mIoU_reference,mIoU_strict")
    combined = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert combined.startswith("| predictor | protocol | AR@1 | AR@10 | C-mIoU | A-mIoU |")
    assert f"| records_dense_crf | strict | {strict['AR@1']:.1f} | {strict['AR@10']:.1f} |" in combined
    assert summary["metrics"]["records_dense_crf"]["strict"]["C-mIoU"] == strict["C-mIoU"]
    assert summary["metrics_table"] == combined
    assert (Path(cfg.stage.output) / "per_class.csv").read_text().startswith(
        "predictor,object_class,mIoU_reference,mIoU_strict")


@pytest.mark.integration
def test_images_without_records_count_as_finding_nothing(synthetic, tmp_path):
    records = tmp_path / "records"
    _write_records(synthetic, records, ["train"], "truth")   # nothing for the matching split
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[10]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    assert summary["skipped"] == {"records_dense_crf:no_prediction": 6}
    strict = _metrics(cfg)["strict"]
    assert strict["C-mIoU"] < 50   # every cluster maps to part 0 when the matching split saw nothing


# --------------------------------------------------------------------------- trained models

@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """A synthetic train split of 2 classes x 4 images and its two halves (train_match, train_eval)."""
    root = tmp_path_factory.mktemp("halves")
    made = make_synthetic_dataset(root, num_classes=2, images_per_class=4, size=64, seed=3, parts_per_class=3)
    write_split_halves(root, "train")
    runs = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    return {"root": root, "wnids": made.wnids,
            "proposal": write_run(runs / "proposal", "proposal", data_root=root),
            "part_distillation": write_run(runs / "pd", "part_distillation", data_root=root, wnids=made.wnids,
                                           parts_per_class=3)}


def _model_cfg(halves, tmp_path, predictors: str, *more: str):
    records = tmp_path / "records"
    if not records.exists():
        _write_records(halves["root"], records, ["train"], "truth")
    return _cfg(f"data.root={halves['root']}", f"paths.root={tmp_path}", f"stage.input={records}",
                f"stage.image_root={halves['root']}/train", "stage.split=train_eval", "stage.match_split=train_match",
                "stage.num_clusters=4", "stage.top_k=[1,10]", f"stage.predictors={predictors}",
                f"stage.proposal_run={halves['proposal']}", f"stage.part_distillation_run={halves['part_distillation']}",
                "model.device=cpu", *more)


@pytest.mark.integration
def test_trained_models_records_and_strips_side_by_side(halves, tmp_path):
    cfg = _model_cfg(halves, tmp_path, "[records,proposal,part_distillation,strips]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    assert summary["seen"] == 8 and summary["written"] == 4 * 8 and summary["skipped"] == {}
    result = json.loads((Path(cfg.stage.output) / "metrics.json").read_text())
    assert result["split"] == "train_eval" and result["match_split"] == "train_match"
    labels = ["records_dense_crf", "proposal", "part_distillation", "strips"]
    assert list(result["predictors"]) == labels
    figures = {}
    for label in labels:
        one = result["predictors"][label]
        assert one["images"] == 4   # the 4 images of train_eval; train_match only matches
        assert one["strict"]["AR@10"] == _metrics(cfg, label)["strict"]["AR@10"]
        figures[label] = tuple(one[p][m] for p in ("reference", "strict") for m in ("AR@1", "AR@10", "C-mIoU", "A-mIoU"))
        assert all(np.isfinite(figures[label])), (label, figures[label])
    assert figures["records_dense_crf"][1:4] == pytest.approx((100.0, 100.0, 100.0))  # the true parts (3 per image)
    assert len(set(figures.values())) == 4   # every predictor scores differently
    table = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert all(f"| {label} | {p} |" in table for label in labels for p in ("reference", "strict"))
    # a best/worst-class collage per predictor: 2 classes -> 2 rows, each 2 images x (prediction, truth)
    from PIL import Image

    for label in labels:
        collage = Path(cfg.stage.output) / f"collage_{label}.png"
        assert str(collage) in summary["collages"]
        assert Image.open(collage).size == (140 + 2 * 2 * (192 + 4), 2 * (192 + 4))
    # resumable: a second run finds every state written
    again = evaluate.run(cfg, JobContext()).as_dict()
    assert again["written"] == 0 and again["already_done"] == 32
    # stage.output is a store as every stage's: this config's manifest, closed shards (no records)
    top = RecordStore(cfg.stage.output).summary()
    assert top["stage"] == "evaluate" and top["shards_missing_summary"] == [] and top["records"] == 0
    with pytest.raises(ConfigMismatchError, match="stage.predictors"):   # another list is another config
        evaluate.run(_model_cfg(halves, tmp_path, "[strips]"), JobContext())


def test_check_names_the_bad_entry(halves, tmp_path):
    with pytest.raises(ConfigError, match="unknown kind 'proposals'"):
        evaluate.check(_model_cfg(halves, tmp_path, "[proposals]"))
    with pytest.raises(ConfigError, match=r"stage.predictors entry 'proposal:.*nothing': no checkpoint under path="):
        evaluate.check(_model_cfg(halves, tmp_path, f"[proposal:{tmp_path}/nothing]"))
    with pytest.raises(ConfigError, match="holds no stage output"):
        evaluate.check(_model_cfg(halves, tmp_path, f"[records:{tmp_path}]"))
    with pytest.raises(ConfigError, match="takes no path"):
        evaluate.check(_model_cfg(halves, tmp_path, "[strips:x]"))
    with pytest.raises(ConfigError, match=r"entry 'part_distillation': no checkpoint under stage.part_distillation_run="):
        evaluate.check(_model_cfg(halves, tmp_path, "[part_distillation]", f"stage.part_distillation_run={tmp_path}"))
    cfg = _model_cfg(halves, tmp_path, f"[proposal:{halves['part_distillation']}]")
    evaluate.check(cfg)  # the checkpoint exists; what it is shows when it is loaded
    with pytest.raises(ConfigError, match="is a part_distillation model, not proposal"):
        evaluate.run(cfg, JobContext())
    with pytest.raises(ConfigError, match="the colour_kmeans baseline takes no path"):
        evaluate.check(_model_cfg(halves, tmp_path, "[colour_kmeans:x]"))
    cfg = _model_cfg(halves, tmp_path, "[records,strips,records,colour_kmeans]")
    specs = evaluate.parse_predictors(cfg.stage)
    assert [s.label for s in specs] == ["records_dense_crf", "strips", "records_dense_crf_2", "colour_kmeans"]
    baseline = evaluate.build_predictor(specs[-1], cfg)
    assert specs[-1].path is None and isinstance(baseline, ColourKMeansPredictor)
    assert baseline.num_clusters == cfg.stage.num_clusters


def test_training_evaluation_scores_the_live_model(halves):
    from part_distillation.config import PartDistillationStageConfig, ProposalLearningStageConfig
    from part_distillation.inference import TrainedModel

    model = TrainedModel.load(halves["part_distillation"]).model
    stage = PartDistillationStageConfig(output="x", eval_period=5, eval_root=str(halves["root"]),
                                        eval_split="train_eval", eval_match_split="train_match",
                                        eval_image_root=str(halves["root"] / "train"), eval_max_images=2,
                                        image_size=64, parts_per_class=3)
    evaluate_fn = evaluate.training_evaluation(stage, "part_distillation", class_wnids=halves["wnids"])
    model.train()
    got = evaluate_fn(SimpleNamespace(module=model))
    assert model.training
    assert set(got) == {f"{p}/{m}" for p in ("reference", "strict")
                        for m in ("AR@1", "AR@10", "AR@50", "AR@100", "AR@200", "C-mIoU", "A-mIoU", "bestIoU")}
    assert all(0 <= v <= 100 for v in got.values())
    # the same figures as the stage's code on the same two images of each half
    predictor = ModelPredictor(TrainedModel(model, "part_distillation", image_size=64,
                                            class_wnids=tuple(halves["wnids"])), "pd")
    samples = {s: list(itertools.islice(open_part_dataset("partimagenet", halves["root"], s,
                                                          halves["root"] / "train").samples(), 2))
               for s in ("train_eval", "train_match")}
    assert {s.object_class for s in samples["train_eval"]} == {"rover", "lantern"}   # halves interleave classes
    want = evaluate.evaluate_in_memory(predictor, samples, "train_eval", "train_match", num_parts=7)
    assert got == evaluate.flat_metrics(want)
    with pytest.raises(ConfigError, match="stage.eval_root"):
        evaluate.training_evaluation(ProposalLearningStageConfig(output="x", eval_period=5), "proposal")


@pytest.mark.integration
def test_stage6_scores_its_model_while_training_and_its_run_folder_after(tmp_path, caplog):
    """A PartDistillation model trained 4 iterations by the stage itself: periodic evaluation logs and
    writes eval/ scalars at iterations 2 and 4; the run folder then evaluates as a predictor."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from part_distillation.data.imagenet import list_image_tree
    from part_distillation.inference import TrainedModel
    from part_distillation.stages import part_distillation
    from tests.data.part_fixtures import write_part_labels
    from tests.stages.part_distillation_job import config

    torch.set_num_threads(1)
    data_root = tmp_path / "synthetic"
    records = write_part_labels(data_root, tmp_path / "records", num_classes=2, images_per_class=2, size=64)
    write_split_halves(data_root, "train")
    run_dir = tmp_path / "run"
    cfg = config(records, data_root, run_dir, max_iter=4, steps=[3], checkpoint_period=4, eval_period=2,
                 eval_root=str(data_root), eval_split="train_eval", eval_match_split="train_match",
                 eval_image_root=str(data_root / "train"), eval_max_images=2)
    with caplog.at_level(logging.INFO, logger="part_distillation"):
        part_distillation.run(cfg, JobContext())
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[eval] iter")]
    assert [m.split(":")[0] for m in messages] == ["[eval] iter 2", "[eval] iter 4"]
    assert "strict/C-mIoU" in messages[-1] and "reference/AR@10" in messages[-1]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/strict/AR@10")] == [2, 4]
    assert json.loads((run_dir / "classes.json").read_text())["wnids"] == list(list_image_tree(data_root).wnids)
    model = TrainedModel.load(run_dir)
    assert model.kind == "part_distillation" and model.image_size == 64 and model.class_index("n90000002") == 1
    eval_cfg = _cfg(f"data.root={data_root}", f"paths.root={tmp_path}", f"stage.image_root={data_root}/train",
                    "stage.split=train_eval", "stage.match_split=train_match", "stage.top_k=[1,10]",
                    f"stage.predictors=[part_distillation:{run_dir}]", "model.device=cpu")
    summary = evaluate.run(eval_cfg, JobContext()).as_dict()
    strict = summary["metrics"]["part_distillation"]["strict"]
    assert summary["written"] == 4 and np.isfinite([strict["AR@10"], strict["C-mIoU"]]).all()


def test_training_evaluation_refuses_a_missing_split_before_training(halves):
    from part_distillation.config import ProposalLearningStageConfig

    stage = ProposalLearningStageConfig(output="x", eval_period=5, eval_root=str(halves["root"]), eval_split="val")
    with pytest.raises(ConfigError, match="stage.eval_split=val.*no annotation file for split 'val'"):
        evaluate.training_evaluation(stage, "proposal")


@pytest.mark.integration
def test_semantic_baseline_run_is_a_predictor(halves, tmp_path):
    """A supervised semantic-part run scores like any model; without its folder the entry is refused."""
    run = write_run(tmp_path / "semantic", "semantic", data_root=halves["root"], parts_per_class=6)
    cfg = _model_cfg(halves, tmp_path, f"[semantic:{run}]")
    evaluate.run(cfg, JobContext())
    result = json.loads((Path(cfg.stage.output) / "metrics.json").read_text())["predictors"]["semantic"]
    assert result["images"] == 4 and np.isfinite(result["reference"]["AR@10"])
    with pytest.raises(ConfigError, match="needs its run folder"):
        evaluate.check(_model_cfg(halves, tmp_path / "other", "[semantic]"))
