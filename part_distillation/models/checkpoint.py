"""Loading Mask2Former weights: detectron2 model-zoo pickles, the Hugging Face hub, project checkpoints.

* :func:`read_detectron2_pickle` reads a detectron2 ``.pkl`` with a restricted unpickler
  that builds only plain containers, numbers, strings and numpy arrays; any other
  global in the file is refused (a pickle can otherwise run arbitrary code).
* :func:`convert_detectron2_state_dict` renames upstream Mask2Former entries to the
  transformers 5 module names (splitting fused q/k/v projections). Every upstream entry
  must map or be on the explicit list of dropped buffers; nothing is invented.
* The loaders are strict by default and return a :class:`LoadReport` naming what was
  loaded, dropped, re-initialised, missing and unexpected.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointMismatchError, UnsafePickleError
from .mask2former import PIXEL_MEAN, PIXEL_STD, Mask2Former
from part_distillation.state_file import first_line, load_tensor_file, model_state, read_model_state

SWIN_L_COCO_INSTANCE_URL = (
    "https://dl.fbaipublicfiles.com/maskformer/mask2former/coco/instance/"
    "maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_e5f453.pkl"
)
DEFAULT_WEIGHTS_PATH = Path("weights/mask2former/instance/swinL_i21k_q200_e100.pkl")
# File name the pipeline expects -> where to download it from.
KNOWN_WEIGHTS = {DEFAULT_WEIGHTS_PATH.name: SWIN_L_COCO_INSTANCE_URL}

CLASS_HEAD_PREFIX = "class_predictor."
# Model entries that no checkpoint in upstream layout provides and the forward never
# uses: SwinModel's final LayerNorm (the backbone returns the per-stage norms instead).
UNUSED_MODEL_KEYS = (
    "model.pixel_level_module.encoder.swin.layernorm.weight",
    "model.pixel_level_module.encoder.swin.layernorm.bias",
)


# --------------------------------------------------------------------------- unpickler
def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} refused: only numpy.ndarray is allowed")
    return np.ndarray.__new__(subtype, shape, dtype)


def _frombuffer(buffer, dtype, shape, order):
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused (only latin1)")
    return text.encode("latin1", errors)


try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _scalar


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused (only plain numeric dtypes)")
    return _scalar(dtype, data) if data is not None else _scalar(dtype)


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _reconstruct
    _ALLOWED_GLOBALS[(_mod, "scalar")] = _numpy_scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_mod, "_frombuffer")] = _frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays from Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global '{module}.{name}'. A detectron2 checkpoint "
                "holds only dicts, lists, tuples, strings, numbers and numpy arrays; this file asks for "
                "more and may execute code when loaded. Do not load it."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing persistent id {pid!r} (not a detectron2 pickle)")


def read_detectron2_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a detectron2 ``.pkl`` safely; returns the top-level dict."""
    path = Path(path)
    _require_file(path, kind="detectron2 Mask2Former weights (.pkl)")
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            raise CheckpointMismatchError(f"{path}: not a readable pickle (truncated or damaged: "
                                          f"{first_line(error)}); download it again") from None
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict at the top of the pickle, got {type(obj).__name__}")
    return obj


def detectron2_model_state(obj: Mapping[str, Any], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The name -> array mapping inside a detectron2 checkpoint (``obj['model']`` or obj itself)."""
    state = obj.get("model", obj)
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{source}: 'model' is a {type(state).__name__}, not a mapping")
    out = {}
    for name, value in state.items():
        if not isinstance(value, (np.ndarray, Tensor)):
            raise CheckpointMismatchError(f"{source}: entry {name!r} is a {type(value).__name__}, not an array")
        out[str(name)] = value
    return out


# --------------------------------------------------------------------------- renaming
@dataclass(frozen=True)
class Rename:
    """One upstream entry going to one target entry, or to three (q, k, v chunks along dim 0)."""

    source: str
    targets: tuple[str, ...]

    def target_shapes(self, shape: Iterable[int]) -> list[tuple[int, ...]]:
        shape = tuple(int(s) for s in shape)
        if len(self.targets) == 1:
            return [shape]
        if shape[0] % 3:
            raise CheckpointMismatchError(f"{self.source}: fused q/k/v of shape {shape} does not split in 3")
        return [(shape[0] // 3, *shape[1:])] * 3


# Buffers of upstream checkpoints that the transformers model recomputes itself.
DROPPED_BUFFERS: dict[str, str] = {
    r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$":
        "recomputed from window_size by transformers (non-persistent buffer); checked equal on load",
    r"^criterion\.empty_weight$":
        "loss weight of upstream's criterion, derived from num_classes and the no-object weight",
    r"^pixel_(mean|std)$": "preprocessing constants, applied outside the model; checked equal on load",
}

_BB = "model.pixel_level_module.encoder."
_PD = "model.pixel_level_module.decoder."
_TD = "model.transformer_module."

# (upstream regex, target template(s)); a tuple of three targets splits a fused q/k/v.
_RULES: list[tuple[str, str | tuple[str, str, str]]] = [
    # Swin backbone
    (r"backbone\.patch_embed\.proj\.(weight|bias)", _BB + r"swin.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(weight|bias)", _BB + r"swin.embeddings.norm.\1"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)",
     _BB + r"swin.encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)",
     _BB + r"swin.encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
     _BB + r"swin.encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
     tuple(_BB + rf"swin.encoder.layers.\1.blocks.\2.attention.{p}_proj.\3" for p in "qkv")),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     _BB + r"swin.encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     _BB + r"swin.encoder.layers.\1.blocks.\2.mlp.\3.\4"),
    (r"backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     _BB + r"swin.encoder.layers.\1.downsample.\2"),
    (r"backbone\.norm(\d)\.(weight|bias)", None),  # stage index shifts by one; handled below
    # pixel decoder
    (r"sem_seg_head\.pixel_decoder\.input_proj\.(\d+)\.([01])\.(weight|bias)", _PD + r"input_projections.\1.\2.\3"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.level_embed", _PD + "level_embed"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     _PD + r"encoder.layers.\1.self_attn.\2.\3"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     _PD + r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear1\.(weight|bias)",
     _PD + r"encoder.layers.\1.fc1.\2"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear2\.(weight|bias)",
     _PD + r"encoder.layers.\1.fc2.\2"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     _PD + r"encoder.layers.\1.final_layer_norm.\2"),
    (r"sem_seg_head\.pixel_decoder\.mask_features\.(weight|bias)", _PD + r"mask_projection.\1"),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.weight", _PD + r"\1_\2.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.norm\.(weight|bias)", _PD + r"\1_\2.1.\3"),
    # transformer decoder
    (r"sem_seg_head\.predictor\.query_embed\.weight", _TD + "queries_embedder.weight"),
    (r"sem_seg_head\.predictor\.query_feat\.weight", _TD + "queries_features.weight"),
    (r"sem_seg_head\.predictor\.level_embed\.weight", _TD + "level_embed.weight"),
    (r"sem_seg_head\.predictor\.input_proj\.(\d+)\.(weight|bias)", _TD + r"input_projections.\1.\2"),
    (r"sem_seg_head\.predictor\.decoder_norm\.(weight|bias)", _TD + r"decoder.layernorm.\1"),
    (r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.(weight|bias)",
     _TD + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    (r"sem_seg_head\.predictor\.class_embed\.(weight|bias)", CLASS_HEAD_PREFIX + r"\1"),
    (r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     tuple(_TD + rf"decoder.layers.\1.self_attn.{p}_proj.\2" for p in "qkv")),
    (r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     _TD + r"decoder.layers.\1.self_attn.out_proj.\2"),
    (r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)",
     _TD + r"decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\."
     r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     _TD + r"decoder.layers.\1.cross_attn.\2"),
    (r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)",
     _TD + r"decoder.layers.\1.cross_attn_layer_norm.\2"),
    (r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.linear1\.(weight|bias)", _TD + r"decoder.layers.\1.fc1.\2"),
    (r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.linear2\.(weight|bias)", _TD + r"decoder.layers.\1.fc2.\2"),
    (r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.norm\.(weight|bias)",
     _TD + r"decoder.layers.\1.final_layer_norm.\2"),
]
_COMPILED = [(re.compile(pattern + "$"), target) for pattern, target in _RULES]
_DROPPED = [re.compile(p) for p in DROPPED_BUFFERS]


def modernise_name(name: str) -> str:
    """Older layout: pixel-decoder entries were ``sem_seg_head.X``, now ``sem_seg_head.pixel_decoder.X``."""
    if name.startswith("sem_seg_head.") and not name.startswith(
        ("sem_seg_head.predictor.", "sem_seg_head.pixel_decoder.")
    ):
        return "sem_seg_head.pixel_decoder." + name[len("sem_seg_head."):]
    return name


def _rename(name: str) -> tuple[str, ...] | None:
    for pattern, target in _COMPILED:
        match = pattern.match(name)
        if not match:
            continue
        if target is None:  # backbone.norm{i} -> hidden_states_norms.stage{i+1}
            stage, kind = int(match.group(1)), match.group(2)
            return (f"{_BB}hidden_states_norms.stage{stage + 1}.{kind}",)
        if isinstance(target, tuple):
            return tuple(match.expand(t) for t in target)
        return (match.expand(target),)
    return None


@dataclass
class ConversionPlan:
    """How each upstream entry maps; ``dropped`` and ``unmapped`` hold upstream names."""

    renames: list[Rename] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def plan_conversion(names: Iterable[str]) -> ConversionPlan:
    """Map upstream detectron2 Mask2Former names (either layout) to transformers names."""
    plan = ConversionPlan()
    for name in names:
        modern = modernise_name(name)
        if any(p.match(modern) for p in _DROPPED):
            plan.dropped.append(name)
            continue
        targets = _rename(modern)
        if targets is None:
            plan.unmapped.append(name)
        else:
            plan.renames.append(Rename(name, targets))
    return plan


def convert_detectron2_state_dict(
    state: Mapping[str, np.ndarray | Tensor], source: str = "checkpoint"
) -> tuple[dict[str, Tensor], ConversionPlan]:
    """Rename (and split) upstream entries into a transformers state dict.

    Raises :class:`CheckpointMismatchError` naming every upstream entry that has no
    mapping. Dropped buffers are returned in the plan, not in the state dict.
    """
    plan = plan_conversion(state.keys())
    if plan.unmapped:
        raise CheckpointMismatchError(
            f"{source}: {len(plan.unmapped)} entries have no transformers counterpart (not a Swin Mask2Former "
            f"checkpoint?): {', '.join(plan.unmapped[:10])}{' ...' if len(plan.unmapped) > 10 else ''}"
        )
    out: dict[str, Tensor] = {}
    for rename in plan.renames:
        value = torch.as_tensor(np.ascontiguousarray(state[rename.source]))
        rename.target_shapes(value.shape)  # raises when a fused q/k/v does not split in 3
        pieces = (value,) if len(rename.targets) == 1 else tuple(p.clone() for p in torch.chunk(value, 3, dim=0))
        for target, piece in zip(rename.targets, pieces):
            if target in out:
                raise CheckpointMismatchError(f"{source}: two upstream entries map to {target}")
            out[target] = piece
    return out, plan


# --------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What a load did, by entry name."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model entries the checkpoint did not fill
    unexpected: list[str] = field(default_factory=list)  # checkpoint entries the model has no place for
    dropped: list[str] = field(default_factory=list)  # upstream buffers the model recomputes
    reinitialised: list[str] = field(default_factory=list)  # class head entries re-initialised on request
    unused: list[str] = field(default_factory=list)  # model entries the forward never uses, not in the checkpoint

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {len(self.loaded)} entries"]
        for label, names in (("dropped (recomputed)", self.dropped), ("re-initialised", self.reinitialised),
                             ("unused by the model, left as built", self.unused), ("MISSING", self.missing),
                             ("UNEXPECTED", self.unexpected)):
            if names:
                shown = ", ".join(names[:5]) + (f" ... (+{len(names) - 5})" if len(names) > 5 else "")
                parts.append(f"{label} {len(names)}: {shown}")
        return "; ".join(parts)


def _require_file(path: Path, kind: str) -> None:
    if path.is_file():
        return
    url = KNOWN_WEIGHTS.get(path.name)
    if url is not None:
        hint = f"Download {url} and save it as {path}."
    elif kind.startswith("detectron2"):
        hint = (f"The reference weights (COCO instance, Swin-L) are {SWIN_L_COCO_INSTANCE_URL}, "
                f"expected at {DEFAULT_WEIGHTS_PATH}.")
    else:
        hint = ("Project checkpoints are written by the training stages, or converted from a detectron2 .pkl "
                "with tools/convert_weights.py.")
    raise FileNotFoundError(f"{kind} not found at {path}. {hint}")


def check_fits(
    model: nn.Module,
    state: Mapping[str, Tensor],
    report: LoadReport,
    *,
    strict: bool = True,
    reinit_class_head: bool = False,
) -> dict[str, Tensor]:
    """Compare a state dict with the model by name and shape, filling ``report``; copies nothing.

    Works on a model built on the ``meta`` device. Returns the entries to load.
    """
    if reinit_class_head:
        report.reinitialised = sorted(k for k in state if k.startswith(CLASS_HEAD_PREFIX))
        state = {k: v for k, v in state.items() if not k.startswith(CLASS_HEAD_PREFIX)}
    target = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        hint = ""
        if all(m.startswith(CLASS_HEAD_PREFIX) for m in mismatched):
            hint = " (a different number of classes: pass reinit_class_head=True to start a new class head)"
        raise CheckpointMismatchError(
            f"{report.source} does not fit this model: {len(mismatched)} shape mismatches, first: "
            + "; ".join(mismatched[:5]) + hint
        )
    report.unexpected = sorted(k for k in state if k not in target)
    missing = [k for k in target if k not in state and not (reinit_class_head and k.startswith(CLASS_HEAD_PREFIX))]
    report.unused = [k for k in missing if k in UNUSED_MODEL_KEYS]
    report.missing = [k for k in missing if k not in UNUSED_MODEL_KEYS]
    if strict and (report.missing or report.unexpected):
        raise CheckpointMismatchError(
            f"{report.source} does not fit this model: missing {len(report.missing)} entries "
            f"{report.missing[:5]}, unexpected {len(report.unexpected)} entries {report.unexpected[:5]}"
        )
    usable = {k: v for k, v in state.items() if k in target}
    report.loaded = sorted(usable)
    return usable


def _fit(
    model: nn.Module, state: Mapping[str, Tensor], report: LoadReport, *, strict: bool, reinit_class_head: bool
) -> LoadReport:
    """Check, copy, and start a new class head when asked: the shared end of the loaders."""
    if reinit_class_head and not isinstance(model, Mask2Former):
        raise TypeError("reinit_class_head needs a part_distillation Mask2Former")
    usable = check_fits(model, state, report, strict=strict, reinit_class_head=reinit_class_head)
    model.load_state_dict(usable, strict=False)
    if reinit_class_head:  # same size and conditioning, fresh weights
        model.reset_class_head(parts_per_class=model.parts_per_class)
    return report


_INDEX = re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$")


def _check_dropped(model: nn.Module, raw: Mapping[str, Any], plan: ConversionPlan, source: str) -> None:
    """Dropped buffers must agree with what the model computes, so dropping them loses nothing."""
    buffers = dict(model.named_buffers())
    for name in plan.dropped:
        modern = modernise_name(name)
        value = np.asarray(raw[name])
        match = _INDEX.match(modern)
        if match:
            own = buffers.get(match.expand(
                _BB + r"swin.encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_index"))
            if own is not None and own.device.type != "meta" and (
                own.numel() != value.size or not np.array_equal(own.cpu().numpy().reshape(-1), value.reshape(-1))
            ):
                raise CheckpointMismatchError(f"{source}: {name} differs from the index the model computes")
        elif modern in ("pixel_mean", "pixel_std"):
            expected = PIXEL_MEAN if modern == "pixel_mean" else PIXEL_STD
            if not np.allclose(value.reshape(-1), expected, atol=1e-3):
                raise CheckpointMismatchError(
                    f"{source}: {name} = {value.reshape(-1).tolist()} differs from the preprocessing {expected}")


def load_detectron2_pickle(
    model: nn.Module,
    path: str | os.PathLike = DEFAULT_WEIGHTS_PATH,
    *,
    strict: bool = True,
    reinit_class_head: bool = False,
) -> LoadReport:
    """Load an upstream detectron2 Mask2Former ``.pkl`` (either pixel-decoder layout) into ``model``.

    ``reinit_class_head`` skips the checkpoint's class head (e.g. COCO's 81 outputs when the
    model has 1 + 1 or C*K + 1) and starts a fresh one; the report lists it.
    """
    path = Path(path)
    raw = detectron2_model_state(read_detectron2_pickle(path), str(path))
    state, plan = convert_detectron2_state_dict(raw, str(path))
    _check_dropped(model, raw, plan, str(path))
    report = LoadReport(source=str(path), dropped=list(plan.dropped))
    return _fit(model, state, report, strict=strict, reinit_class_head=reinit_class_head)


def load_project_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    reinit_class_head: bool = False,
) -> LoadReport:
    """Load a project checkpoint: ``torch.save`` of a state dict, or of ``{"model": state_dict, ...}``."""
    path = Path(path)
    _require_file(path, kind="project checkpoint")
    return load_project_state(model, read_model_state(path), str(path), strict=strict,
                              reinit_class_head=reinit_class_head)


def load_project_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    *,
    strict: bool = True,
    reinit_class_head: bool = False,
) -> LoadReport:
    """:func:`load_project_checkpoint` of a state dict already read (``state_file.read_model_state``),
    so a caller that looked at the weights first does not read the file twice."""
    return _fit(model, model_state(state, source), LoadReport(source=source), strict=strict,
                reinit_class_head=reinit_class_head)


def load_hub(
    model_id: str,
    *,
    strict: bool = True,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Mask2Former, LoadReport]:
    """A Mask2Former from the Hugging Face hub (``transformers`` ``from_pretrained``); needs network or a cache."""
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        model, info = Mask2Former.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise OSError(
            f"could not load {model_id!r} from the Hugging Face hub: it needs network access or a cached copy "
            f"(offline mode: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}"
            f"{', local_files_only=True' if local_files_only else ''}). Download it where there is network "
            f"(e.g. `hf download {model_id}`) or load the detectron2 weights with load_detectron2_pickle "
            f"({SWIN_L_COCO_INSTANCE_URL} -> {DEFAULT_WEIGHTS_PATH}). Cause: {error}"
        ) from error
    report = LoadReport(source=f"hub:{model_id}")
    missing = sorted(info.get("missing_keys", ()))
    report.unused = [k for k in missing if k in UNUSED_MODEL_KEYS]
    report.missing = [k for k in missing if k not in UNUSED_MODEL_KEYS]
    report.unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())]
    if mismatched:
        raise CheckpointMismatchError(f"{report.source}: shape mismatches, first: {'; '.join(mismatched[:5])}")
    if strict and (report.missing or report.unexpected):
        raise CheckpointMismatchError(
            f"{report.source}: missing {report.missing[:5]}, unexpected {report.unexpected[:5]}")
    loaded = set(model.state_dict()) - set(missing)
    report.loaded = sorted(loaded)
    return model, report


def load_initial_weights(model: Mask2Former, weights: str | os.PathLike) -> LoadReport:
    """Initialise a freshly built model from ``weights`` (detectron2 ``.pkl`` or a project
    checkpoint), its class head re-initialised (a training stage sizes its own head)."""
    loader = load_detectron2_pickle if str(weights).endswith(".pkl") else load_project_checkpoint
    return loader(model, weights, reinit_class_head=True)


def build_model(size: str, weights: str | os.PathLike | None = None, num_classes: int = 1,
                parts_per_class: int | None = None) -> Mask2Former:
    """The Mask2Former of ``model.size`` with a fresh ``num_classes`` + 1 class head
    (object-conditioned when ``parts_per_class`` = K is given: ``num_classes`` = objects x K);
    the other weights from ``weights`` when given (:func:`load_initial_weights`). An
    EfficientNet backbone starts from its ImageNet weights (``models.mask2former``)."""
    from .mask2former import build_mask2former, spec_name_for_size

    model = build_mask2former(spec_name_for_size(size), num_classes=num_classes, parts_per_class=parts_per_class)
    if weights:
        load_initial_weights(model, weights)
    return model


__all__ = [
    "CheckpointMismatchError", "ConversionPlan", "DEFAULT_WEIGHTS_PATH", "DROPPED_BUFFERS", "KNOWN_WEIGHTS",
    "LoadReport", "Rename", "build_model", "load_initial_weights", "SWIN_L_COCO_INSTANCE_URL", "UNUSED_MODEL_KEYS", "UnsafePickleError",
    "check_fits", "convert_detectron2_state_dict", "detectron2_model_state", "load_detectron2_pickle", "load_hub",
    "load_project_checkpoint", "load_project_state", "load_tensor_file", "model_state", "modernise_name",
    "plan_conversion", "read_detectron2_pickle", "read_model_state",
]
