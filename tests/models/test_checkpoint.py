"""Checkpoint conversion and loading: upstream layouts, the safe unpickler, error messages."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from part_distillation.models import checkpoint as ckpt
from part_distillation.models.checkpoint import (
    DEFAULT_WEIGHTS_PATH,
    SWIN_L_COCO_INSTANCE_URL,
    CheckpointMismatchError,
    UnsafePickleError,
    load_detectron2_pickle,
    load_hub,
    load_project_checkpoint,
    plan_conversion,
    read_detectron2_pickle,
)
from part_distillation.models.mask2former import DEMO_CPU, SWIN_L_COCO_INSTANCE, TINY_FIXTURE, Mask2Former, build_mask2former

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pkl(reference_models) -> Path:
    return reference_models / "m2f_tiny.pkl"


@pytest.fixture(scope="module")
def tiny_state(tiny_pkl) -> dict[str, torch.Tensor]:
    model = build_mask2former(TINY_FIXTURE)
    load_detectron2_pickle(model, tiny_pkl)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    own = model.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


# ------------------------------------------------------------------------ name mapping
def test_every_swin_l_entry_maps_with_matching_shapes(reference_models):
    layout = json.loads((reference_models / "mask2former_swinL_coco_instance_keys.json").read_text())
    shapes = {e["name"]: tuple(e["shape"]) for e in layout["state_dict"]}
    assert len(shapes) == 650
    plan = plan_conversion(shapes)
    assert plan.unmapped == []
    # only the 24 recomputed relative-position indices and the criterion's weight are dropped
    assert len(plan.dropped) == 25 and "criterion.empty_weight" in plan.dropped
    assert all(n.endswith("attn.relative_position_index") for n in plan.dropped if n != "criterion.empty_weight")
    assert {e["name"] for e in layout["state_dict"] if e["kind"] == "buffer"} == set(plan.dropped)

    with torch.device("meta"):
        model = Mask2Former.from_spec(SWIN_L_COCO_INSTANCE)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    produced = {}
    for rename in plan.renames:
        for name, shape in zip(rename.targets, rename.target_shapes(shapes[rename.source])):
            assert name not in produced, f"{name} produced twice"
            produced[name] = shape
    assert {k: target.get(k) for k in produced} == produced  # every target exists with the same shape
    assert set(target) - set(produced) == set(ckpt.UNUSED_MODEL_KEYS)
    # parameter elements are preserved exactly (q/k/v splits neither add nor lose any)
    n_params = sum(int(np.prod(shapes[r.source])) for r in plan.renames)
    assert n_params == layout["summary"]["num_parameter_elements"] == 215_521_989


def test_tiny_pickle_loads_strictly_with_everything_accounted_for(tiny_pkl):
    model = build_mask2former(TINY_FIXTURE)
    report = load_detectron2_pickle(model, tiny_pkl)
    assert report.missing == [] and report.unexpected == [] and report.reinitialised == []
    assert len(report.dropped) == 6  # relative_position_index of the 5 Swin blocks + criterion.empty_weight
    assert report.unused == list(ckpt.UNUSED_MODEL_KEYS)
    assert set(report.loaded) | set(report.unused) == set(model.state_dict())
    raw = ckpt.detectron2_model_state(read_detectron2_pickle(tiny_pkl))
    sd = model.state_dict()
    qkv = raw["backbone.layers.2.blocks.1.attn.qkv.weight"]
    block = "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.1.attention."
    np.testing.assert_array_equal(sd[block + "k_proj.weight"].numpy(), qkv[qkv.shape[0] // 3: 2 * qkv.shape[0] // 3])
    np.testing.assert_array_equal(sd["class_predictor.bias"].numpy(), raw["sem_seg_head.predictor.class_embed.bias"])
    assert "model.pixel_level_module.encoder.hidden_states_norms.stage4.weight" in report.loaded


def test_old_layout_without_pixel_decoder_prefix_loads_identically(tiny_pkl, tiny_state, tmp_path):
    raw = ckpt.detectron2_model_state(read_detectron2_pickle(tiny_pkl))
    old = {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): v for k, v in raw.items()}
    assert sum(k.startswith("sem_seg_head.pixel_decoder.") for k in old) == 0
    assert sum(k.startswith("sem_seg_head.") and not k.startswith("sem_seg_head.predictor.") for k in old) == 53
    path = tmp_path / "old_layout.pkl"
    with open(path, "wb") as f:  # plain dict, protocol 2 (bytes go through _codecs.encode)
        pickle.dump({"model": old, "__author__": "test"}, f, protocol=2)
    model = build_mask2former(TINY_FIXTURE)
    report = load_detectron2_pickle(model, path)
    assert report.missing == [] and report.unexpected == []
    _assert_same_state(model, tiny_state)


def test_changed_relative_position_index_is_refused(tiny_pkl, tmp_path):
    raw = dict(ckpt.detectron2_model_state(read_detectron2_pickle(tiny_pkl)))
    name = "backbone.layers.0.blocks.0.attn.relative_position_index"
    raw[name] = raw[name][::-1].copy()
    path = tmp_path / "bad_index.pkl"
    path.write_bytes(pickle.dumps({"model": raw}))
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        load_detectron2_pickle(build_mask2former(TINY_FIXTURE), path)


def test_unmapped_upstream_entry_is_named(tmp_path):
    path = tmp_path / "extra.pkl"
    path.write_bytes(pickle.dumps({"model": {"sem_seg_head.predictor.something_new.weight": np.zeros(3, np.float32)}}))
    with pytest.raises(CheckpointMismatchError, match="something_new"):
        load_detectron2_pickle(build_mask2former(TINY_FIXTURE), path)


# --------------------------------------------------------------------------- unpickler
class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": OrderedDict(w=np.zeros(2)), "x": _Exploit(marker)}))
    with pytest.raises(UnsafePickleError) as error:
        read_detectron2_pickle(path)
    message = str(error.value)
    assert str(path) in message and f"{os.system.__module__}.system" in message and "refusing" in message
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):  # also through the loader
        load_detectron2_pickle(build_mask2former(TINY_FIXTURE), path)
    assert not marker.exists()


def test_project_checkpoint_that_would_run_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Exploit(marker)}, path)
    with pytest.raises(UnsafePickleError, match=f"{path}: refusing to load.*Do not load it"):
        load_project_checkpoint(build_mask2former(TINY_FIXTURE), path)
    assert not marker.exists()


def test_truncated_weight_files_are_one_line_errors_naming_the_file(tiny_state, tmp_path):
    whole = tmp_path / "model.pth"
    torch.save(tiny_state, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError) as error:
        load_project_checkpoint(build_mask2former(TINY_FIXTURE), cut)
    assert str(error.value).startswith(f"{cut}: not a readable PyTorch file") and "\n" not in str(error.value)
    pkl = tmp_path / "cut.pkl"
    pkl.write_bytes(pickle.dumps({"model": OrderedDict(w=np.zeros(64))}, protocol=2)[:60])
    with pytest.raises(CheckpointMismatchError, match=f"{pkl}: not a readable pickle .*download it again"):
        read_detectron2_pickle(pkl)


@pytest.mark.parametrize("payload", [
    lambda: {"model": {"w": torch.zeros(2)}},  # a torch tensor needs torch's rebuild functions
    lambda: {"model": {}, "f": eval},  # builtins.eval
    lambda: {"model": {}, "s": {1, 2}},  # sets are not in a detectron2 checkpoint either
])
def test_unpickler_refuses_globals_outside_the_allow_list(tmp_path, payload):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(payload(), protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global"):
        read_detectron2_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_reads_plain_data_and_numpy(tmp_path, protocol):
    data = {"model": OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1, 2], np.int64)),
            "__author__": "x", "matching_heuristics": True, "n": 3, "f": 0.5, "none": None, "t": (1, "a"),
            "l": [b"bytes"], "s": np.float64(2.5)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    back = read_detectron2_pickle(path)
    assert back.keys() == data.keys() and isinstance(back["model"], OrderedDict)
    np.testing.assert_array_equal(back["model"]["a"], data["model"]["a"])
    assert back["model"]["b"].dtype == np.int64 and back["l"] == [b"bytes"] and back["s"] == 2.5


# ----------------------------------------------------------------------------- errors
def test_wrong_model_names_the_first_mismatched_shapes(tiny_pkl):
    demo = build_mask2former(DEMO_CPU.with_num_classes(3))  # same names mostly, other widths
    with pytest.raises(CheckpointMismatchError) as error:
        load_detectron2_pickle(demo, tiny_pkl)
    message = str(error.value)
    assert "does not fit this model" in message and str(tiny_pkl) in message
    assert "model.pixel_level_module.decoder.encoder.layers.0.fc1.weight: checkpoint (1024, 64) vs model (256, 64)" in message


def test_wrong_model_names_missing_and_unexpected_entries(tiny_pkl):
    shallower = build_mask2former(dataclasses.replace(TINY_FIXTURE, decoder_layers=3))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected 22 entries \['model\.transformer_module\.decoder\.layers\.3\."):
        load_detectron2_pickle(shallower, tiny_pkl)
    report = load_detectron2_pickle(shallower, tiny_pkl, strict=False)
    assert report.missing == [] and len(report.unexpected) == 22  # one decoder layer
    assert all(k.startswith("model.transformer_module.decoder.layers.3.") for k in report.unexpected)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    expected = tmp_path / DEFAULT_WEIGHTS_PATH
    with pytest.raises(FileNotFoundError) as error:
        load_detectron2_pickle(build_mask2former(TINY_FIXTURE), expected)
    message = str(error.value)
    assert str(expected) in message and SWIN_L_COCO_INSTANCE_URL in message
    with pytest.raises(FileNotFoundError, match="convert_weights.py"):
        load_project_checkpoint(build_mask2former(TINY_FIXTURE), tmp_path / "nothing.pth")


def test_class_head_of_another_size_needs_an_explicit_reinit(tiny_pkl, tiny_state):
    model = build_mask2former(TINY_FIXTURE, num_classes=1)
    with pytest.raises(CheckpointMismatchError, match="reinit_class_head=True"):
        load_detectron2_pickle(model, tiny_pkl)
    report = load_detectron2_pickle(model, tiny_pkl, reinit_class_head=True)
    assert report.reinitialised == ["class_predictor.bias", "class_predictor.weight"]
    assert report.missing == [] and report.unexpected == []
    assert "re-initialised 2: class_predictor.bias, class_predictor.weight" in report.summary()
    sd = model.state_dict()
    assert sd["class_predictor.weight"].shape == (2, TINY_FIXTURE.hidden_dim)
    for key, value in tiny_state.items():
        if not key.startswith("class_predictor."):
            assert torch.equal(sd[key], value), key
    # the same option on a same-sized head starts a fresh head too
    same = build_mask2former(TINY_FIXTURE)
    load_detectron2_pickle(same, tiny_pkl, reinit_class_head=True)
    assert not torch.equal(same.class_predictor.weight, tiny_state["class_predictor.weight"])


def test_reinit_keeps_an_object_conditioned_head_conditioned(tiny_pkl, tiny_state):
    """Stage 6 loads the COCO weights into a C x K + 1 head that must stay object-conditioned."""
    model = build_mask2former(TINY_FIXTURE, num_classes=3 * 2, parts_per_class=2)
    load_detectron2_pickle(model, tiny_pkl, reinit_class_head=True)
    assert model.parts_per_class == 2 and model.class_predictor.out_features == 7
    out = model(torch.zeros(1, 3, 64, 64), object_class=torch.tensor([1]))
    assert out["pred_logits"].shape[-1] == 3


# ------------------------------------------------------------------ project checkpoints
def test_project_checkpoint_round_trip(tiny_state, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(tiny_state, path)
    model = build_mask2former(TINY_FIXTURE)
    report = load_project_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == [] and report.unused == []
    _assert_same_state(model, tiny_state)
    wrapped = tmp_path / "wrapped.pth"  # engine-style {"model": ..., "iteration": ...}, saved from DDP
    torch.save({"model": {"module." + k: v for k, v in tiny_state.items()}, "iteration": 7}, wrapped)
    model = build_mask2former(TINY_FIXTURE)
    load_project_checkpoint(model, wrapped)
    _assert_same_state(model, tiny_state)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_project_checkpoint(build_mask2former(DEMO_CPU.with_num_classes(3)), path)


def test_convert_weights_tool(tiny_pkl, tiny_state, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_weights", REPO / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "tiny.pth"
    assert tool.main([str(tiny_pkl), str(out), "--spec", "tiny_fixture"]) == 0
    assert "wrote 260 entries" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert "model.pixel_level_module.encoder.swin.layernorm.weight" not in state
    model = build_mask2former(TINY_FIXTURE)
    report = load_project_checkpoint(model, out)
    assert report.unused == list(ckpt.UNUSED_MODEL_KEYS)
    for key, value in tiny_state.items():
        if key not in ckpt.UNUSED_MODEL_KEYS:
            assert torch.equal(model.state_dict()[key], value), key
    # checked against the wrong architecture: refused, nothing written
    assert tool.main([str(tiny_pkl), str(tmp_path / "no.pth"), "--spec", "swin_l_coco_instance"]) == 1
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "no.pth").exists()


def test_hub_loading_without_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as error:
        load_hub("facebook/mask2former-swin-large-coco-instance", local_files_only=True, cache_dir=tmp_path)
    message = str(error.value)
    assert "facebook/mask2former-swin-large-coco-instance" in message and "network" in message
    assert "load_detectron2_pickle" in message


def test_hub_loader_reads_a_saved_transformers_directory(tiny_state, tmp_path):
    model = build_mask2former(TINY_FIXTURE)
    model.load_state_dict(tiny_state)
    model.save_pretrained(tmp_path)
    loaded, report = load_hub(str(tmp_path), local_files_only=True)
    assert isinstance(loaded, Mask2Former) and report.missing == [] and report.unexpected == []
    _assert_same_state(loaded, tiny_state)
