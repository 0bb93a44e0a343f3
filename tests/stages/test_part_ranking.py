"""Stage 5 on synthetic records with a tiny proposal model: outputs, <=K rule, resume,
checkpoint selection, and the memory bound of clustering one class of 1M embeddings."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from part_distillation.config import ConfigError, DataConfig, ModelConfig, PartRankingStageConfig, RunConfig
from part_distillation.engine import checkpoint as ckpt
from part_distillation.launch import JobContext
from part_distillation.masks import decode_rles
from part_distillation.stages import part_ranking
from part_distillation.models.checkpoint import build_model
from part_distillation.store import RecordStore
from part_distillation.store.embedding_log import EmbeddingFile, EmbeddingLog

from ..data.part_fixtures import write_part_segments


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage5")
    return write_part_segments(root / "synthetic", root / "records", num_classes=2, images_per_class=4)


@pytest.fixture(scope="module")
def proposal_run(tmp_path_factory):
    """A stage-4 run folder with two checkpoints of the tiny model (random weights, fixed seed)."""
    run = tmp_path_factory.mktemp("proposal_run")
    for iteration, seed in ((10, 0), (20, 1)):
        torch.manual_seed(seed)
        ckpt.save_atomic({"model": build_model("tiny", None).state_dict(), "iteration": iteration},
                         ckpt.checkpoint_path(run, iteration))
    return run


def _cfg(tmp_path, records, proposal_run, **stage):
    # thresholds opened up: the untrained tiny model's foreground probabilities are ~0.5
    settings = dict(input=str(records), output=str(tmp_path / "out"), proposal_run=str(proposal_run),
                    image_size=64, num_clusters=2, n_init=2, min_proposal_score=0.0, min_label_score=0.0)
    settings.update(stage)
    return RunConfig(stage=PartRankingStageConfig(**settings),
                     data=DataConfig(name="synthetic", root=str(tmp_path / "synthetic")),
                     model=ModelConfig(name="mask2former", size="tiny", device="cpu"), seed=0)


def test_writes_part_labels_with_centroids_from_the_newest_checkpoint(tmp_path, records, proposal_run):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, records, proposal_run)
    summary = part_ranking.run(cfg, JobContext())
    folder = part_ranking.work_folder(cfg)
    meta = json.loads((folder / "centroids.json").read_text())
    assert meta["checkpoint"] == str(ckpt.checkpoint_path(proposal_run, 20))
    assert meta["classes_with_parts"], meta
    centroids, _ = part_ranking.load_centroids(folder)
    for c in centroids.values():
        assert c.shape[0] == 2 and np.allclose(np.linalg.norm(c, axis=1), 1, atol=0.2)  # means of unit vectors
    out = list(RecordStore(cfg.stage.output).iter_records())
    assert summary.written == len(out) > 0
    for rec in out:
        masks = decode_rles(rec["part_masks"], size=tuple(rec["fitted_size"]))
        obj = decode_rles([rec["object_mask"]], size=tuple(rec["fitted_size"]))[0]
        assert len(masks) == len(rec["cluster_ids"]) == len(rec["scores"]) == len(rec["part_ratios"])
        assert set(rec["cluster_ids"].tolist()) <= {0, 1} and len(set(rec["cluster_ids"].tolist())) == len(masks)
        assert not (masks & ~obj[None]).any()  # restricted to the object
        assert (masks.sum(0) <= 1).all()  # one label per pixel
        canvas = max(rec["fitted_size"]) ** 2  # the square canvas, as the reference
        np.testing.assert_allclose(rec["part_ratios"], masks.reshape(len(masks), -1).sum(1) / canvas, rtol=1e-6)
        assert rec["object_ratio"] == pytest.approx(masks.any(0).sum() / canvas)
        assert rec["class_index"] in centroids


def test_classes_with_at_most_k_embeddings_get_no_part_classes(tmp_path, records, proposal_run):
    # K larger than any class's embeddings (4 images x at most a few proposals each)
    cfg = _cfg(tmp_path, records, proposal_run, num_clusters=1000, n_init=1)
    summary = part_ranking.run(cfg, JobContext())
    meta = json.loads((part_ranking.work_folder(cfg) / "centroids.json").read_text())
    assert meta["classes_with_parts"] == []
    assert all(0 < n <= 1000 for n in meta["embeddings_per_class"].values())
    assert summary.written == 0 and summary.skipped["no_part_classes"] == summary.seen == 8


def test_selected_iteration_and_missing_checkpoint(tmp_path, records, proposal_run):
    cfg = _cfg(tmp_path, records, proposal_run, checkpoint_iteration=10)
    assert part_ranking.proposal_checkpoint(cfg.stage) == ckpt.checkpoint_path(proposal_run, 10)
    with pytest.raises(ConfigError, match="checkpoint_iteration=5"):
        part_ranking.proposal_checkpoint(_cfg(tmp_path, records, proposal_run, checkpoint_iteration=5).stage)
    with pytest.raises(ConfigError, match="stage.proposal_run"):
        part_ranking.proposal_checkpoint(_cfg(tmp_path, records, tmp_path / "none").stage)


def test_two_jobs_split_the_classes(tmp_path, records, proposal_run):
    classes = []
    for index in range(2):
        cfg = _cfg(tmp_path, records, proposal_run)
        cfg.shard.index, cfg.shard.count = index, 2
        part_ranking.run(cfg, JobContext())
        meta = json.loads((part_ranking.work_folder(cfg) / "centroids.json").read_text())
        classes.append(set(meta["embeddings_per_class"]))
    assert classes[0] and classes[1] and not classes[0] & classes[1]


KILL_SCRIPT = """
import sys, torch
from part_distillation.store import embedding_log
from part_distillation.stages import part_ranking
from part_distillation.launch import JobContext
from tests.stages.test_part_ranking import _cfg
from pathlib import Path
torch.set_num_threads(1)
count = [0]
original = embedding_log.EmbeddingFile.append
def append(self, rows):
    count[0] += 1
    if count[0] == int(sys.argv[4]):
        # half a row, then die: the torn write a kill leaves behind
        with open(self.path, "ab") as f:
            f.write(b"\\0" * 6)
        import os
        os._exit(9)
    return original(self, rows)
embedding_log.EmbeddingFile.append = append
part_ranking.run(_cfg(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])), JobContext())
"""


def test_killed_cluster_pass_resumes_to_the_same_result(tmp_path, records, proposal_run):
    torch.set_num_threads(1)
    reference = _cfg(tmp_path / "ref", records, proposal_run)
    part_ranking.run(reference, JobContext())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "run"), str(records),
                             str(proposal_run), "3"], env=env, cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == 9
    cfg = _cfg(tmp_path / "run", records, proposal_run)
    folder = part_ranking.work_folder(cfg)
    assert not (folder / "centroids.json").exists()
    done_before = len((folder / "progress.tsv").read_text().splitlines())
    assert done_before >= 2
    part_ranking.run(cfg, JobContext())
    ref_folder = part_ranking.work_folder(reference)
    for path in sorted(ref_folder.glob("class_*.f32")):
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    a, _ = part_ranking.load_centroids(folder)
    b, _ = part_ranking.load_centroids(ref_folder)
    assert a.keys() == b.keys()
    for c in a:
        np.testing.assert_array_equal(a[c], b[c])
    got = {r["key"]: r for r in RecordStore(cfg.stage.output).iter_records()}
    want = {r["key"]: r for r in RecordStore(reference.stage.output).iter_records()}
    assert got.keys() == want.keys()
    for key in got:
        assert got[key]["part_masks"] == want[key]["part_masks"]
        np.testing.assert_array_equal(got[key]["cluster_ids"], want[key]["cluster_ids"])


def test_batched_passes_give_the_results_of_one_image_at_a_time(tmp_path, records, proposal_run):
    """batch_size 3 (8 images: batches of 3, 3, 2, mixing classes) against batch_size 1:
    the same embeddings and centroids (float32, atol 1e-5: batched kernels may round
    differently), and the same part masks and cluster ids (exactly), scores (rtol 1e-5)."""
    torch.set_num_threads(1)
    runs = {}
    for batch_size in (1, 3):
        cfg = _cfg(tmp_path / f"batch{batch_size}", records, proposal_run, batch_size=batch_size)
        summary = part_ranking.run(cfg, JobContext())
        folder = part_ranking.work_folder(cfg)
        runs[batch_size] = (summary, folder, {r["key"]: r for r in RecordStore(cfg.stage.output).iter_records()})
    (one, one_folder, one_records), (three, three_folder, three_records) = runs[1], runs[3]
    assert one.written == three.written > 0 and one.extra["cluster_pass_images"] == 8
    files = sorted(p.name for p in one_folder.glob("class_*.f32"))
    assert files and files == sorted(p.name for p in three_folder.glob("class_*.f32"))
    for name in files:
        a = np.fromfile(one_folder / name, dtype=np.float32)
        b = np.fromfile(three_folder / name, dtype=np.float32)
        assert a.shape == b.shape and len(a) > 0
        np.testing.assert_allclose(b, a, atol=1e-5)
    a, _ = part_ranking.load_centroids(one_folder)
    b, _ = part_ranking.load_centroids(three_folder)
    assert a.keys() == b.keys() and a
    for c in a:
        np.testing.assert_allclose(b[c], a[c], atol=1e-5)
    assert one_records.keys() == three_records.keys()
    for key, want in one_records.items():
        got = three_records[key]
        assert got["part_masks"] == want["part_masks"], key
        np.testing.assert_array_equal(got["cluster_ids"], want["cluster_ids"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5)


def test_model_batches_keep_record_order_and_pass_bad_images_and_declined_records_through(tmp_path, records):
    """with_model_outputs: every record once, in order; declined ones with None, unreadable
    images with their error; the model sees batches of at most batch_size images."""
    items = list(RecordStore(records).iter_records())
    items[2] = {**items[2], "path": str(tmp_path / "missing.png")}
    seen_batches = []

    class Model:
        def __call__(self, pixels):
            seen_batches.append(pixels.shape[0])
            b = pixels.shape[0]
            return {"pred_logits": torch.arange(b, dtype=torch.float32)[:, None, None].expand(b, 3, 2),
                    "pred_masks": torch.zeros(b, 3, 4, 4), "query_embeddings": torch.zeros(b, 3, 5)}

    declined = {items[0]["key"], items[5]["key"]}
    out = list(part_ranking.with_model_outputs(items, lambda r: r["key"] not in declined, Model(),
                                               torch.device("cpu"), 64, 2))
    assert [r["key"] for r, _ in out] == [r["key"] for r in items]
    assert out[0][1] is None and out[5][1] is None
    assert isinstance(out[2][1], (part_ranking.BadImageError, FileNotFoundError))
    ran = [(r, result) for r, result in out if isinstance(result, tuple)]
    assert len(ran) == len(items) - 3 and seen_batches == [2, 2, 1]
    # each image gets its own row of the batch: batch position 0, 1, 0, 1, 0
    assert [int(result[1][0][0, 0]) for _, result in ran] == [0, 1, 0, 1, 0]
    for record, (inputs, (_, _, _, sizes)) in ran:
        assert inputs.frame.fitted == tuple(record["fitted_size"]) and sizes["output_size"] == inputs.frame.fitted


# --------------------------------------------------------------------------- memory bound

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _peak_rise(fn):
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out = fn()
    stop.set()
    thread.join()
    return out, max(peak[0], _rss()) - base


def test_one_class_of_a_million_embeddings_stays_within_the_memory_bound(tmp_path):
    """Cluster pass: appending 1M embeddings (2,000 images x 500) raises RSS by < 32 MiB.
    K-means from the file: < 2.5 x N x D x 4 bytes + 64 MiB (the bound in the stage's docstring)."""
    torch.set_num_threads(1)
    n, dim, per_image = 1_000_000, 64, 500
    work = EmbeddingLog(tmp_path / "work", Path("model.pth"))
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, dim, generator=generator), dim=1)

    def stream():
        for i in range(n // per_image):
            labels = torch.randint(0, 8, (per_image,), generator=generator)
            x = centres[labels] + 0.05 * torch.randn(per_image, dim, generator=generator)
            work.add(f"image{i}", 3, torch.nn.functional.normalize(x, dim=1))

    _, stream_rise = _peak_rise(stream)
    assert len(EmbeddingFile(work.folder / "class_3.f32", dim)) == n
    assert stream_rise < 32 * 2**20, stream_rise / 2**20
    (centroids, counts), cluster_rise = _peak_rise(
        lambda: part_ranking.cluster_classes(work, [3], 8, 1, 0, torch.device("cpu")))
    bound = 2.5 * n * dim * 4 + 64 * 2**20
    assert counts == {3: n} and centroids[3].shape == (8, dim)
    assert cluster_rise < bound, (cluster_rise / 2**20, bound / 2**20)
    # the clusters found are the 8 generating centres (means of unit vectors: normalise to compare)
    found = torch.nn.functional.normalize(torch.from_numpy(centroids[3]), dim=1)
    nearest = torch.cdist(found, centres).min(1)
    assert nearest.values.max() < 0.01 and len(set(nearest.indices.tolist())) == 8
    print(f"memory: stream rise {stream_rise / 2**20:.1f} MiB, k-means rise {cluster_rise / 2**20:.1f} MiB "
          f"(data {n * dim * 4 / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB)")


# --------------------------------------------------------------------------- purity

def _fake_outputs(num_parts_seen, noise=0.15, dim=16):
    """A controlled stand-in for the proposal model: one query per true part (its mask as
    logits ±10, foreground logit 3) with the embedding of that part class (a fixed random
    prototype per (object class, part id)) plus noise, and two junk queries (nearly empty random
    masks, foreground logit -3)."""
    prototypes = {}
    generator = torch.Generator().manual_seed(0)

    def outputs(model, batch, device):
        return [one_image(inputs) for inputs in batch]

    def one_image(inputs):
        h, w = inputs.frame.fitted
        queries, logits, embeddings = [], [], []
        cls = inputs.class_index
        for mask, part in zip(inputs.part_masks, inputs.part_ids):
            key = (cls, int(part))
            if key not in prototypes:
                prototypes[key] = torch.randn(dim, generator=generator)
            queries.append(torch.where(torch.from_numpy(mask), 10.0, -10.0))
            logits.append([3.0, 0.0])
            embeddings.append(prototypes[key] + noise * torch.randn(dim, generator=generator))
            num_parts_seen.add(key)
        for _ in range(2):
            queries.append(torch.randn(h, w, generator=generator) * 10 - 25)  # rarely positive
            logits.append([-3.0, 0.0])
            embeddings.append(torch.randn(dim, generator=generator))
        sizes = dict(padded_size=(h, w), image_size=(h, w), output_size=(h, w))
        return torch.tensor(logits), torch.stack(queries), torch.stack(embeddings), sizes

    return outputs


def _purity(confusion: np.ndarray) -> float:
    """Majority-vote purity of a (clusters x true parts) pixel confusion matrix."""
    return float(confusion.max(1).sum() / confusion.sum())


def test_clusters_match_the_true_part_classes_far_better_than_random(tmp_path, records, proposal_run, monkeypatch):
    """With embeddings that separate the true parts, the clusters recover them: majority-vote
    purity (pixels) per class against random cluster ids for the same masks."""
    seen = set()
    monkeypatch.setattr(part_ranking, "model_outputs", _fake_outputs(seen))
    original_init = part_ranking.RankingInput.__init__

    def init(self, record, size):
        original_init(self, record, size)
        self.class_index = int(record["class_index"])

    monkeypatch.setattr(part_ranking.RankingInput, "__init__", init)
    cfg = _cfg(tmp_path, records, proposal_run, num_clusters=4, n_init=10, min_proposal_score=0.3,
               min_label_score=0.1, classifier="l2")
    part_ranking.run(cfg, JobContext())
    truth = {r["key"]: r for r in RecordStore(records).iter_records()}
    rng = np.random.default_rng(0)
    purities, random_purities, mask_purities, random_mask_purities = [], [], [], []
    for cls in sorted({c for c, _ in seen}):
        parts = sorted(p for c, p in seen if c == cls)
        confusion = np.zeros((4, len(parts)))
        random_confusion = np.zeros((20, 4, len(parts)))
        mask_confusion = np.zeros((4, len(parts)))  # each output mask counted once, by its majority part
        random_mask_confusion = np.zeros((20, 4, len(parts)))
        for rec in RecordStore(cfg.stage.output).iter_records():
            if rec["class_index"] != cls:
                continue
            size = tuple(rec["fitted_size"])
            masks = decode_rles(rec["part_masks"], size=size)
            true_masks = decode_rles(truth[rec["key"]]["part_masks"], size=size)
            true_ids = truth[rec["key"]]["part_ids"].tolist()
            overlap = (masks[:, None] & true_masks[None]).reshape(len(masks), len(true_masks), -1).sum(-1)
            for i, cluster in enumerate(rec["cluster_ids"]):
                random_ids = rng.integers(0, 4, size=20)
                majority = parts.index(true_ids[int(overlap[i].argmax())])
                mask_confusion[cluster, majority] += 1
                random_mask_confusion[np.arange(20), random_ids, majority] += 1
                for j, part in enumerate(true_ids):
                    confusion[cluster, parts.index(part)] += overlap[i, j]
                    random_confusion[np.arange(20), random_ids, parts.index(part)] += overlap[i, j]
        purities.append(_purity(confusion))
        random_purities.append(np.mean([_purity(c) for c in random_confusion]))
        mask_purities.append(_purity(mask_confusion))
        random_mask_purities.append(np.mean([_purity(c) for c in random_mask_confusion]))
    print(f"purity per class: pixels {np.round(purities, 3).tolist()} (random {np.round(random_purities, 3).tolist()}), "
          f"masks {np.round(mask_purities, 3).tolist()} (random {np.round(random_mask_purities, 3).tolist()})")
    assert len(purities) == 2
    assert min(purities) > 0.95 and min(mask_purities) > 0.9
    # pixels favour the large body part even at random; per mask the gap is wide
    assert min(purities) - max(random_purities) > 0.15
    assert min(mask_purities) - max(random_mask_purities) > 0.4


def test_seed_script_runs_two_jobs_in_process_with_the_demo_settings(tmp_path, records, proposal_run):
    """sh_files/part_ranking/run.sh with PD_LAUNCHER=basic PD_EXPERIMENT=demo JOBS=2: both
    jobs of the array run here, with the demo's K=4 and 128-pixel canvas, and exit 0."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PD_LAUNCHER": "basic", "PD_EXPERIMENT": "demo", "JOBS": "2", "PD_PYTHON": sys.executable,
           "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "labels"
    result = subprocess.run(["bash", str(repo / "sh_files/part_ranking/run.sh"), f"paths.root={tmp_path}",
                             f"stage.input={records}", f"stage.proposal_run={proposal_run}", f"stage.output={out}",
                             "model=mask2former_tiny",  # the model of the proposal_run fixture (last one wins)
                             "stage.min_proposal_score=0", "stage.min_label_score=0",
                             f"hydra.sweep.dir={tmp_path}/sweep"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metas = [json.loads((out / "part_classes" / f"{i}-of-2" / "centroids.json").read_text()) for i in range(2)]
    assert [m["num_clusters"] for m in metas] == [4, 4]
    assert sum(len(m["embeddings_per_class"]) for m in metas) == 2
    written = list(RecordStore(out).iter_records())
    assert written and all(set(r["cluster_ids"].tolist()) <= set(range(4)) for r in written)


def test_refuses_to_split_a_class_over_jobs(tmp_path, records, proposal_run):
    cfg = _cfg(tmp_path, records, proposal_run)
    cfg.shard.by = "image"
    with pytest.raises(ConfigError, match="shard.by=class"):
        part_ranking.run(cfg, JobContext())
    assert not (tmp_path / "out").exists()


def test_preflight_checks_the_proposal_checkpoint_not_the_coco_weights(tmp_path, records, proposal_run):
    from part_distillation.launch import check_job

    cfg = _cfg(tmp_path, records, proposal_run)
    cfg.model.weights = str(tmp_path / "absent.pkl")  # not used by this stage
    check_job(cfg)
    with pytest.raises(ConfigError, match="stage.proposal_run"):
        check_job(_cfg(tmp_path, records, tmp_path / "no_run"))


def _class_of(cfg, centroids) -> int:
    """The object class whose centroids the label pass was given."""
    saved, _ = part_ranking.load_centroids(part_ranking.work_folder(cfg))
    return next(c for c, v in saved.items() if np.array_equal(v, centroids.cpu().numpy()))


def test_an_image_left_with_no_part_is_skipped_with_a_reason(tmp_path, records, proposal_run, monkeypatch):
    """The label pass's IoU-with-the-object filter has no fallback: an image can come out with
    nothing (here: class 0's images, an IoU threshold no mask reaches). Skipped ``no_parts``
    and counted, never a crash (it was: ``cannot reshape array of size 0``)."""
    from dataclasses import replace

    from part_distillation.models import part_ranking as ranking

    real = ranking.label_pass
    cfg = _cfg(tmp_path, records, proposal_run)

    def label_pass(*args, settings, **kwargs):
        if _class_of(cfg, args[3]) == 0:
            settings = replace(settings, min_object_iou=1.0)
        return real(*args, settings=settings, **kwargs)

    monkeypatch.setattr(ranking, "label_pass", label_pass)
    summary = part_ranking.run(cfg, JobContext())
    assert summary.skipped == {"no_parts": 4} and summary.written == 4 and summary.seen == 8
    store = RecordStore(cfg.stage.output)
    assert store.summary()["skipped"] == {"no_parts": 4}
    assert {r["class_index"] for r in store.iter_records()} == {1}


def test_ratios_are_over_the_square_canvas_and_stage_6_filters_on_them(tmp_path, records, proposal_run, monkeypatch):
    """``part_ratios`` = part area / canvas², ``object_ratio`` = union of the kept parts /
    canvas² (the reference's denominators); stage 6's load filters (>= 0.05 both) read them."""
    from part_distillation.config import PartDistillationStageConfig
    from part_distillation.data.part_records import PartRecordDataset, RecordFilter
    from part_distillation.models import part_ranking as ranking
    from part_distillation.postprocess import InstancePredictions

    canvas = 128 * 128  # the fixture's images are square, fitted to 128; objects of 1069..2774 pixels
    sizes = {0: (900, 400), 1: (400, 300)}
    cfg = _cfg(tmp_path, records, proposal_run)

    def label_pass(class_logits, mask_logits, queries, centroids, object_mask, **kwargs):
        """Crafted parts: the object's first pixels, in two parts of the class's sizes."""
        first, second = sizes[_class_of(cfg, centroids)]
        flat = torch.nonzero(object_mask.flatten()).flatten()
        assert len(flat) >= first + second
        masks = torch.zeros((2, object_mask.numel()), dtype=torch.bool)
        masks[0, flat[:first]] = True
        masks[1, flat[first:first + second]] = True
        return InstancePredictions(masks.reshape(2, *object_mask.shape), torch.tensor([0.9, 0.8]),
                                   torch.tensor([0, 1]), torch.tensor([0, 1]))

    monkeypatch.setattr(ranking, "label_pass", label_pass)
    part_ranking.run(cfg, JobContext())
    out = list(RecordStore(cfg.stage.output).iter_records())
    assert len(out) == 8
    for rec in out:
        assert tuple(rec["fitted_size"]) == (128, 128) and "area_ratios" not in rec
        want = sizes[rec["class_index"]]
        np.testing.assert_allclose(rec["part_ratios"], np.array(want) / canvas, rtol=1e-6)
        assert rec["object_ratio"] == pytest.approx(sum(want) / canvas)
    stage6 = PartDistillationStageConfig()
    dataset = PartRecordDataset([cfg.stage.output], filter=RecordFilter(
        min_object_ratio=stage6.min_object_area_ratio, inclusive=True, min_part_ratio=stage6.min_part_area_ratio))
    # class 0: object 1300 / 16384 = 0.079 kept, its parts 0.055 kept and 0.024 dropped; class 1:
    # object 700 / 16384 = 0.043 dropped (over the object its parts would be 57% and 43%)
    assert len(dataset) == 4 and dataset.filtered_out == 4
    for index in range(len(dataset)):
        record = dataset.record(index)
        assert record["class_index"] == 0 and dataset.filter.part_indices(record).tolist() == [0]


def test_other_images_are_labelled_with_the_part_classes_of_a_finished_run(tmp_path, records, proposal_run,
                                                                            monkeypatch):
    """``stage.part_classes``: held-out images get the training run's part classes (its centroids,
    the same proposal model), with no clustering of their own."""
    torch.set_num_threads(1)
    trained = _cfg(tmp_path / "train", records, proposal_run)
    part_ranking.run(trained, JobContext())
    expected = {r["key"]: r["cluster_ids"].tolist() for r in RecordStore(trained.stage.output).iter_records()}
    monkeypatch.setattr(part_ranking, "cluster_step", lambda *a, **k: pytest.fail("clustered again"))
    other = _cfg(tmp_path / "heldout", records, proposal_run, part_classes=trained.stage.output)
    summary = part_ranking.run(other, JobContext())
    labelled = {r["key"]: r["cluster_ids"].tolist() for r in RecordStore(other.stage.output).iter_records()}
    assert labelled == expected and summary.written == len(expected) > 0   # same images here: same labels
    assert not part_ranking.work_folder(other).exists()
    with pytest.raises(ConfigError, match="same proposal model"):   # ranked with another checkpoint
        part_ranking.run(_cfg(tmp_path / "older", records, proposal_run, checkpoint_iteration=10,
                              part_classes=trained.stage.output), JobContext())
    with pytest.raises(ConfigError, match="holds no part classes"):
        part_ranking.run(_cfg(tmp_path / "none", records, proposal_run, part_classes=str(tmp_path)), JobContext())
