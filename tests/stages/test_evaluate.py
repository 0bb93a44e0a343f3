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
from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation import during_training, scoring
from part_distillation.evaluation.evaluator import metrics
from part_distillation.evaluation.predictors import ColourKMeansPredictor, ModelPredictor
from part_distillation.launch import JobContext
from part_distillation.masks import encode_rles
from part_distillation.stages import evaluate
from part_distillation.store import ConfigMismatchError, RecordStore, ShardWriter
from part_distillation.store.schemas import PART_SEGMENTS
from part_distillation.store.sharding import key_shard

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
    # records are one label per pixel: both AR settings are their masks
    for setting in ("overlapping", "one-label"):
        assert reference[setting] == strict[setting]   # every record mask overlaps a part
        assert reference[setting] == reference["one-label"]
    if how == "truth":
        assert reference["overlapping"]["AR@10"] == pytest.approx(100.0)
        assert reference["C-mIoU"] == pytest.approx(100.0)
        assert strict["overlapping"]["AR@10"] == pytest.approx(100.0)
        assert strict["C-mIoU"] == pytest.approx(100.0)   # matched on val, evaluated on train
        assert summary["skipped"] == {}
    else:
        assert 0 < reference["C-mIoU"] < 90 and 0 < reference["overlapping"]["AR@10"] < 90
    folder = Path(cfg.stage.output) / "records_dense_crf"
    table = (folder / "metrics.md").read_text()
    assert table.startswith("| protocol | masks | AR@1 | AR@10 | C-mIoU | A-mIoU |")
    assert "| strict | overlapping |" in table and "| strict | one-label |" in table
    assert (folder / "per_class.csv").read_text().startswith("object_class,class_name,mIoU_reference,mIoU_strict")
    combined = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert combined.startswith("| predictor | protocol | masks | AR@1 | AR@10 | C-mIoU | A-mIoU |")
    over, one = strict["overlapping"], strict["one-label"]
    assert (f"| records_dense_crf | strict | overlapping | {over['AR@1']:.1f} | {over['AR@10']:.1f} | – | – | – |"
            in combined)
    assert (f"| records_dense_crf | strict | one-label | {one['AR@1']:.1f} | {one['AR@10']:.1f} | "
            f"{strict['C-mIoU']:.1f} | {strict['A-mIoU']:.1f} | {strict['bestIoU']:.1f} |") in combined
    if how == "truth":
        assert strict["bestIoU"] == reference["bestIoU"] == pytest.approx(100.0)
    assert summary["metrics"]["records_dense_crf"]["strict"]["C-mIoU"] == strict["C-mIoU"]
    assert summary["metrics_table"] == combined
    assert combined.rstrip().endswith("Scored on split `train`; the strict protocol matched clusters to parts on `val`.")
    assert (Path(cfg.stage.output) / "per_class.csv").read_text().startswith(
        "predictor,object_class,class_name,mIoU_reference,mIoU_strict")


@pytest.fixture(scope="module")
def one_supercategory(tmp_path_factory):
    """The synthetic dataset with every part category under one super-category, as
    PartImageNet groups ImageNet classes (two classes, one super-category "Thing")."""
    root = tmp_path_factory.mktemp("one_supercategory")
    for split in ("train", "val"):
        make_synthetic_dataset(root, num_classes=2, images_per_class=3, size=64, seed=1, parts_per_class=3,
                               split=split)
        path = root / "annotations" / f"{split}.json"
        data = json.loads(path.read_text())
        for category in data["categories"]:
            category["supercategory"] = "Thing"
            category["name"] = "Thing " + category["part"]
        path.write_text(json.dumps(data))
    return root


@pytest.mark.integration
def test_partimagenet_miou_is_keyed_by_imagenet_class_not_supercategory(one_supercategory, tmp_path):
    # "truth" records number each class's parts 1..3 its own way: cluster 0 is a different part
    # in each class. Keyed by ImageNet class every cluster maps to its part; pooled under the
    # one super-category the vote of one class mislabels the other's clusters.
    records = tmp_path / "records"
    _write_records(one_supercategory, records, ["train", "val"], "truth")
    common = [f"data.root={one_supercategory}", f"stage.input={records}", "stage.split=train",
              "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[10]"]
    cfg = _cfg(*common, f"paths.root={tmp_path / 'by_class'}")
    evaluate.run(cfg, JobContext())
    by_class = _metrics(cfg)
    assert by_class["object_key"] == "imagenet_class"
    assert by_class["reference"]["C-mIoU"] == pytest.approx(100.0)
    folder = Path(cfg.stage.output)
    rows = (folder / "records_dense_crf" / "per_class.csv").read_text().splitlines()
    names = dict(line.split("\t") for line in (one_supercategory / "words.txt").read_text().splitlines())
    assert len(rows) == 3 and {r.split(",")[0] for r in rows[1:]} == set(names)   # one row per ImageNet class
    assert {r.split(",")[1] for r in rows[1:]} == set(names.values())             # named by class name
    assert "keyed by: ImageNet class (wnid)" in (folder / "metrics.md").read_text()
    assert len((folder / "per_class.csv").read_text().splitlines()) == 3

    cfg = _cfg(*common, f"paths.root={tmp_path / 'by_supercategory'}", "stage.object_key=supercategory")
    evaluate.run(cfg, JobContext())
    pooled = _metrics(cfg)
    assert pooled["object_key"] == "supercategory"
    assert pooled["reference"]["C-mIoU"] < 60
    assert list(pooled["reference"]["per_class_mIoU"]) == ["Thing"]
    assert "keyed by: PartImageNet super-category" in (Path(cfg.stage.output) / "metrics.md").read_text()


@pytest.mark.integration
def test_images_without_records_count_as_finding_nothing(synthetic, tmp_path):
    records = tmp_path / "records"
    _write_records(synthetic, records, ["train"], "truth")   # nothing for the matching split
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[10]")
    summary = evaluate.run(cfg, JobContext()).as_dict()
    assert summary["skipped"] == {"records_dense_crf:no_prediction": 6}
    assert _metrics(cfg)["skipped"] == {}   # the evaluation split had its records
    # the skips are said in the files too, never a silently empty score
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path / 'swapped'}", f"stage.input={records}",
               "stage.split=val", "stage.match_split=train", "stage.num_clusters=4", "stage.top_k=[10]")
    evaluate.run(cfg, JobContext())
    assert _metrics(cfg)["skipped"] == {"no_prediction": 6}
    line = "skipped 6 of 6 samples (scored as finding nothing): no_prediction 6"
    assert line in (Path(cfg.stage.output) / "records_dense_crf" / "metrics.md").read_text()
    assert f"records_dense_crf: {line}" in (Path(cfg.stage.output) / "metrics.md").read_text()
    cfg = _cfg(f"data.root={synthetic}", f"paths.root={tmp_path}", f"stage.input={records}",
               "stage.split=train", "stage.match_split=val", "stage.num_clusters=4", "stage.top_k=[10]")
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
        settings = ["one-label"] if label == "part_distillation" else ["overlapping", "one-label"]
        assert [s for s in ("overlapping", "one-label") if s in one["strict"]] == settings
        assert one["strict"]["one-label"] == _metrics(cfg, label)["strict"]["one-label"]
        figures[label] = tuple([one[p]["one-label"][m] for p in ("reference", "strict") for m in ("AR@1", "AR@10")] +
                               [one[p][m] for p in ("reference", "strict") for m in ("C-mIoU", "A-mIoU")])
        assert all(np.isfinite(figures[label])), (label, figures[label])
    assert figures["records_dense_crf"][1] == pytest.approx(100.0)  # the true parts (3 per image)
    assert figures["records_dense_crf"][4] == pytest.approx(100.0)
    assert len(set(figures.values())) == 4   # every predictor scores differently
    table = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert all(f"| {label} | {p} | one-label |" in table for label in labels for p in ("reference", "strict"))
    assert all((f"| {label} | {p} | overlapping |" in table) == (label != "part_distillation")
               for label in labels for p in ("reference", "strict"))
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
    evaluate_fn = during_training.training_evaluation(stage, "part_distillation", class_wnids=halves["wnids"])
    model.train()
    got = evaluate_fn(SimpleNamespace(module=model))
    assert model.training
    assert set(got) == {f"{p}/{m}" for p in ("reference", "strict")
                        for m in ("one-label/AR@1", "one-label/AR@10", "one-label/AR@50", "one-label/AR@100",
                                  "one-label/AR@200", "C-mIoU", "A-mIoU", "bestIoU")}
    assert all(0 <= v <= 100 for v in got.values())
    # the same figures as the stage's code on the same two images of each half
    predictor = ModelPredictor(TrainedModel(model, "part_distillation", image_size=64,
                                            class_wnids=tuple(halves["wnids"])), "pd")
    samples = {s: list(itertools.islice(open_part_dataset("partimagenet", halves["root"], s,
                                                          halves["root"] / "train").samples(), 2))
               for s in ("train_eval", "train_match")}
    assert {s.supercategory for s in samples["train_eval"]} == {"rover", "lantern"}   # halves interleave classes
    assert {s.object_class for s in samples["train_eval"]} == set(halves["wnids"])    # keyed by ImageNet class
    want = scoring.evaluate_in_memory(predictor, samples, "train_eval", "train_match", num_parts=7,
                                       at_test_size=True)   # PartImageNet-style: at the test resolution
    assert got == scoring.flat_metrics(want)
    with pytest.raises(ConfigError, match="stage.eval_root"):
        during_training.training_evaluation(ProposalLearningStageConfig(output="x", eval_period=5), "proposal")


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
    assert "strict/C-mIoU" in messages[-1] and "reference/one-label/AR@10" in messages[-1]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/strict/one-label/AR@10")] == [2, 4]
    assert json.loads((run_dir / "classes.json").read_text())["wnids"] == list(list_image_tree(data_root).wnids)
    model = TrainedModel.load(run_dir)
    assert model.kind == "part_distillation" and model.image_size == 64 and model.class_index("n90000002") == 1
    eval_cfg = _cfg(f"data.root={data_root}", f"paths.root={tmp_path}", f"stage.image_root={data_root}/train",
                    "stage.split=train_eval", "stage.match_split=train_match", "stage.top_k=[1,10]",
                    f"stage.predictors=[part_distillation:{run_dir}]", "model.device=cpu")
    summary = evaluate.run(eval_cfg, JobContext()).as_dict()
    strict = summary["metrics"]["part_distillation"]["strict"]
    assert summary["written"] == 4 and np.isfinite([strict["one-label"]["AR@10"], strict["C-mIoU"]]).all()


def test_training_evaluation_refuses_a_missing_split_before_training(halves):
    from part_distillation.config import ProposalLearningStageConfig

    stage = ProposalLearningStageConfig(output="x", eval_period=5, eval_root=str(halves["root"]), eval_split="val")
    with pytest.raises(ConfigError, match="stage.eval_split=val.*no annotation file for split 'val'"):
        during_training.training_evaluation(stage, "proposal")


@pytest.mark.integration
def test_semantic_baseline_run_is_a_predictor(halves, tmp_path):
    """A supervised semantic-part run scores like any model; without its folder the entry is refused."""
    run = write_run(tmp_path / "semantic", "semantic", data_root=halves["root"], parts_per_class=6)
    cfg = _model_cfg(halves, tmp_path, f"[semantic:{run}]")
    evaluate.run(cfg, JobContext())
    result = json.loads((Path(cfg.stage.output) / "metrics.json").read_text())["predictors"]["semantic"]
    assert result["images"] == 4 and np.isfinite(result["reference"]["one-label"]["AR@10"])
    with pytest.raises(ConfigError, match="needs its run folder"):
        evaluate.check(_model_cfg(halves, tmp_path / "other", "[semantic]"))


# --------------------------------------------------------------------------- per-image AR, AR settings

def _pascal_two_objects(tmp_path) -> tuple[Path, Path]:
    """Pascal-Part: image 1 holds two dogs side by side (their torso = the whole dog), image 2 one
    dog whose left half is its torso and right half its tail; 8 x 10 pixels each."""
    from PIL import Image

    from tests.data.test_pascal_part import write_mat

    voc, parts = tmp_path / "VOC2012", tmp_path / "Annotations_Part"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    parts.mkdir()
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000001\n2008_000002\n")
    left, right = np.zeros((8, 10), bool), np.zeros((8, 10), bool)
    left[2:6, 0:5], right[2:6, 5:10] = True, True
    write_mat(parts / "2008_000001.mat", [("dog", left, [("torso", left)]), ("dog", right, [("torso", right)])])
    write_mat(parts / "2008_000002.mat", [("dog", left | right, [("torso", left), ("tail", right)])])
    for name in ("2008_000001", "2008_000002"):
        Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    return voc, parts


def test_pascal_part_ar_is_per_image_sharded_and_resumable(tmp_path):
    """Two strips of the union of image 1's dogs are exactly the two dogs: per image, top-1 finds
    one of its 2 parts and top-10 both (AR@1 50, AR@10 100 over the 4 parts). Scored per object
    (the old way), each dog's own two strips cut it unevenly (IoU 0.4 and 0.6): AR@1 40, AR@10 65."""
    voc, parts = _pascal_two_objects(tmp_path)
    common = [f"data.root={voc}", f"paths.root={tmp_path}", "stage.dataset=pascal_part",
              f"stage.dataset_root={voc}", f"stage.annotations_root={parts}", "stage.split=val",
              "stage.predictors=[strips]", "stage.num_clusters=2", "stage.top_k=[1,10]", "shard.count=2"]
    # jobs take whole images by the one sharding rule (store/sharding.py) on the image's state key;
    # image 1: two dogs, its AR state and one state per dog; image 2: one object, one state
    names = ("2008_000001", "2008_000002")
    owner = {name: key_shard(f"val/image:{voc / 'JPEGImages' / name}.jpg", 2) for name in names}
    expected = [[0, 0], [0, 0]]
    for name, (objects, states) in zip(names, ((2, 3), (1, 1))):
        expected[owner[name]][0] += objects
        expected[owner[name]][1] += states
    first = evaluate.run(_cfg(*common, "shard.index=0"), JobContext()).as_dict()
    assert [first["seen"], first["written"]] == expected[0]
    second = evaluate.run(cfg := _cfg(*common, "shard.index=1"), JobContext()).as_dict()
    assert [second["seen"], second["written"]] == expected[1]
    result = _metrics(cfg, "strips")
    assert result["images"] == 2 and result["objects"] == 3
    for protocol in ("reference", "strict"):
        for setting in ("overlapping", "one-label"):
            assert result[protocol][setting]["AR@1"] == pytest.approx(50.0)
            assert result[protocol][setting]["AR@10"] == pytest.approx(100.0)
    assert np.isfinite(result["reference"]["C-mIoU"])   # mIoU per object, matched on the same split
    table = (Path(cfg.stage.output) / "metrics.md").read_text()
    assert "| strips | reference | overlapping | 50.0 | 100.0 | – | – |" in table
    assert "| strips | reference | one-label | 50.0 | 100.0 |" in table
    again = evaluate.run(_cfg(*common, "shard.index=0"), JobContext()).as_dict()
    assert again["written"] == 0 and again["already_done"] == expected[0][1]
    # the same samples each taken as an image of its own: the per-object figures
    from dataclasses import replace

    from part_distillation.evaluation.predictors import StripsPredictor

    samples = [replace(s, path=f"{s.path}#{s.key}") for s in open_part_dataset("pascal_part", voc, "val", None,
                                                                                 parts).samples()]
    alone = scoring.evaluate_in_memory(StripsPredictor(2), {"val": samples}, "val", None, 50, top_k=(1, 10))
    assert alone["images"] == 3 and alone["strict"]["overlapping"] == pytest.approx({"AR@1": 40.0, "AR@10": 65.0})


class _ObjectFinder:
    """A class-conditioned stand-in: for each object its own mask, score 1 (one-label only)."""

    label, num_clusters, last_skip = "finder", 1, None
    ar_settings = ("one-label",)
    proposal_type = False

    def __call__(self, sample, frame=None):
        from part_distillation.evaluation.evaluator import Prediction

        return Prediction(masks=sample.object_mask[None], scores=np.ones(1), clusters=np.zeros(1, np.int64))

    def image_prediction(self, samples, predictions, frame=None):
        return None


def test_class_conditioned_predictions_are_pooled_per_image_for_ar(tmp_path):
    """Each dog of image 1 found alone is a top-1 hit per object (AR@1 100 on that image); per image the
    two dogs' predictions compete for one slot: AR@1 50."""
    voc, parts = _pascal_two_objects(tmp_path)
    samples = list(open_part_dataset("pascal_part", voc, "val", None, parts).samples())
    assert [s.key for s in samples] == ["2008_000001/0", "2008_000001/1", "2008_000002/0"]
    result = scoring.evaluate_in_memory(_ObjectFinder(), {"val": samples[:2]}, "val", None, num_parts=50,
                                         top_k=(1, 10))
    assert result["images"] == 1 and result["objects"] == 2
    assert "one-label" in result["strict"] and "overlapping" not in result["strict"]
    assert result["strict"]["one-label"]["AR@1"] == pytest.approx(50.0)
    assert result["strict"]["one-label"]["AR@10"] == pytest.approx(100.0)
    assert result["reference"]["C-mIoU"] == pytest.approx(100.0)   # per object: each dog is its torso


class _TwoSettings:
    """A proposal model's prediction: the overlapping set holds the whole object besides its halves,
    which one label per pixel leaves without a pixel (so that set drops it)."""

    label, num_clusters, last_skip = "proposal", 2, None

    def __init__(self):
        from part_distillation.evaluation.evaluator import AR_SETTINGS

        self.ar_settings = AR_SETTINGS
        self.proposal_type = True

    def __call__(self, sample, frame=None):
        from part_distillation.evaluation.evaluator import Prediction

        obj = sample.object_mask
        cols = np.nonzero(obj.any(0))[0]
        left = obj.copy()
        left[:, cols[len(cols) // 2]:] = False
        halves = np.stack([left, obj & ~left])
        return Prediction(masks=halves, scores=np.array([0.8, 0.7]), clusters=np.arange(2),
                          overlapping=Prediction(masks=np.concatenate([obj[None], halves]),
                                                 scores=np.array([0.9, 0.8, 0.7])))

    def image_prediction(self, samples, predictions, frame=None):
        return predictions[0] if len(samples) == 1 else None


def test_proposals_are_scored_overlapping_and_one_label_side_by_side(tmp_path):
    """Image 2's dog is one part per half: the one-label halves find both (AR@1 50, AR@10 100); the
    overlapping set's best proposal is the whole dog (IoU 0.5 with each half): AR@1 5, AR@10 100.
    Both rows in the table, overlapping first; the mIoU on the one-label row."""
    voc, parts = _pascal_two_objects(tmp_path)
    samples = list(open_part_dataset("pascal_part", voc, "val", None, parts).samples())[2:]
    result = scoring.evaluate_in_memory(_TwoSettings(), {"val": samples}, "val", None, num_parts=50,
                                         top_k=(1, 10))
    strict = result["strict"]
    assert strict["one-label"] == pytest.approx({"AR@1": 50.0, "AR@10": 100.0})
    assert strict["overlapping"] == pytest.approx({"AR@1": 5.0, "AR@10": 100.0})
    table = evaluate.markdown_table(result, (1, 10)).splitlines()
    assert table[0] == "| protocol | masks | AR@1 | AR@10 | C-mIoU | A-mIoU | bestIoU |"
    reference = result["reference"]
    assert reference["bestIoU"] == strict["bestIoU"] == pytest.approx(100.0)   # the one-label halves: the parts
    assert table[2:4] == ["| reference | overlapping | 5.0 | 100.0 | – | – | – |",
                          f"| reference | one-label | 50.0 | 100.0 | {reference['C-mIoU']:.1f} | "
                          f"{reference['A-mIoU']:.1f} | {reference['bestIoU']:.1f} |"]
    assert scoring.flat_metrics(result, (1, 10))["strict/overlapping/AR@1"] == pytest.approx(5.0)


# --------------------------------------------------------------------------- test resolution

def test_partimagenet_is_scored_at_the_test_resolution_other_datasets_at_the_original_size():
    from part_distillation.evaluation.evaluator import PartEvaluator
    from part_distillation.evaluation.predictors import RecordsPredictor, StripsPredictor

    assert scoring.scores_at_test_size("partimagenet") and not scoring.scores_at_test_size("pascal_part")
    assert scoring.scores_at_test_size("pascal_part", "test")
    assert not scoring.scores_at_test_size("partimagenet", "original")
    obj = np.zeros((32, 48), bool)
    obj[8:24, 8:40] = True
    left, right = obj.copy(), obj.copy()
    left[:, 24:], right[:, :24] = False, False
    sample = PartSample(key="0", path="/x/n1_0.JPEG", object_class="n1", wnid="n1", object_mask=obj,
                                 part_masks=np.stack([left, right]), part_ids=np.array([0, 1]))
    evaluator = PartEvaluator(num_parts=2, num_clusters=2, top_k=(10,))
    original, _ = scoring.score_sample(StripsPredictor(2), evaluator, sample)
    scaled, _ = scoring.score_sample(StripsPredictor(2), evaluator, sample, at_test_size=True)
    assert original["ar_strict"]["one-label"]["gt_areas"].tolist() == [256, 256]
    # 32 x 48 -> 427 x 640 (longer side 640 for what is not a PartDistillation model): x 13.3 per axis
    assert scaled["ar_strict"]["one-label"]["gt_areas"].sum() == pytest.approx(512 * (640 / 48) ** 2, rel=0.02)
    assert scaled["confusion_strict"].sum() == 427 * 640
    # a stage record (fitted 640) gives its masks at the test resolution without the original size
    frame = ImageFrame.fit((32, 48))
    record = {"key": "r", "path": "/x/n1_0.JPEG", **frame.as_record(),
              "part_masks": encode_rles(frame.masks_to_fitted(np.stack([left, right]))), "part_ids": [1, 2]}
    records = RecordsPredictor({"/x/n1_0.JPEG": record}, "records", 2)
    state, skip = scoring.score_sample(records, evaluator, sample, at_test_size=True)
    assert skip is None and state["ar_strict"]["one-label"]["overlaps"].min() == pytest.approx(1.0)


def test_an_image_of_several_objects_is_scored_at_the_test_resolution_as_one_frame(tmp_path):
    """Pascal-Part image 1 (two dogs, 8 x 10) scored at the test size (stage.score_size=test): the
    objects' states and the image's AR state, the strips made on the union of the dogs included,
    all at 512 x 640; the union's two strips are still exactly the two dogs."""
    from part_distillation.evaluation.evaluator import PartEvaluator
    from part_distillation.evaluation.predictors import RecordsPredictor, StripsPredictor

    voc, parts = _pascal_two_objects(tmp_path)
    group = list(open_part_dataset("pascal_part", voc, "val", None, parts).samples())[:2]
    predictor = StripsPredictor(2)
    evaluator = PartEvaluator(num_parts=50, num_clusters=2, top_k=(1, 10), ar_settings=predictor.ar_settings)
    states, skips = scoring.score_image(predictor, evaluator, group, at_test_size=True)
    assert not skips and [s["key"] for s in states] == ["image:" + group[0].path, *[s.key for s in group]]
    for setting in ("overlapping", "one-label"):
        ar = states[0]["ar_strict"][setting]
        assert ar["gt_areas"].tolist() == [20 * 64 ** 2, 20 * 64 ** 2]   # each dog 4 x 5, x 64 per axis
        assert ar["overlaps"].max() == pytest.approx(1.0)
    assert all(s["confusion_strict"].sum() == 512 * 640 for s in states[1:])
    result = scoring.evaluate_in_memory(predictor, {"val": group}, "val", None, 50, top_k=(1, 10),
                                         at_test_size=True)
    assert result["strict"]["overlapping"] == pytest.approx({"AR@1": 50.0, "AR@10": 100.0})
    # no record of the image: each object is a counted skip (the image's AR state is none), found nothing
    missing = RecordsPredictor({}, "records", 2)
    states, skips = scoring.score_image(missing, evaluator, group, at_test_size=True)
    assert skips == ["no_prediction"] * 2 and "skip" not in states[0]
    assert [s["skip"] for s in states[1:]] == ["no_prediction"] * 2
    assert states[0]["ar_strict"]["one-label"]["gt_areas"].sum() == 2 * 20 * 64 ** 2
    assert metrics(states, top_k=(1, 10))["skipped"] == {"no_prediction": 2}
