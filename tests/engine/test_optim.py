import torch
from torch import nn

from part_distillation.engine.optim import build_adamw, clip_grad_norm, param_groups
from part_distillation.models.mask2former import build_mask2former


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_no_decay_on_norms_and_embeddings():
    groups = {g["name"]: g for g in param_groups(Tiny(), 0.05)}
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0
    # a plain nn.Parameter level embedding is decayed, as the reference's pixel decoder's
    assert sorted(groups["decay"]["param_names"]) == ["level_embed", "linear.bias", "linear.weight"]
    assert sorted(groups["no_decay"]["param_names"]) == ["embed.weight", "gn.bias", "gn.weight",
                                                          "norm.bias", "norm.weight"]


def test_pixel_decoder_level_embed_is_decayed_and_decoder_embeddings_are_not():
    model = build_mask2former("tiny_fixture", num_classes=1)
    model.freeze(())
    decay = {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0.05 for n in g["param_names"]}
    no_decay = {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert "model.pixel_level_module.decoder.level_embed" in decay  # nn.Parameter: the reference decays it
    assert {"model.transformer_module.level_embed.weight", "model.transformer_module.queries_embedder.weight",
            "model.transformer_module.queries_features.weight"} <= no_decay  # nn.Embedding
    assert any(n.endswith("relative_position_bias_table") for n in no_decay)


def test_backbone_learning_rate_is_scaled_by_the_multiplier():
    model = build_mask2former("tiny_fixture", num_classes=1)
    model.freeze(())  # the baselines train everything
    optimizer = build_adamw(model, lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
    backbone = [g for g in optimizer.param_groups if g["name"].startswith("backbone")]
    rest = [g for g in optimizer.param_groups if not g["name"].startswith("backbone")]
    assert {g["name"] for g in backbone} == {"backbone_decay", "backbone_no_decay"}
    assert all(n.startswith("model.pixel_level_module.encoder.") for g in backbone for n in g["param_names"])
    assert not any(n.startswith("model.pixel_level_module.encoder.") for g in rest for n in g["param_names"])
    assert all(abs(g["lr"] - 1e-5) < 1e-12 and g["lr_scale"] == 0.1 for g in backbone)
    assert all(g["lr"] == 1e-4 and g["lr_scale"] == 1.0 for g in rest)
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once


def test_mask2former_groups_cover_trainable_parameters_once():
    model = build_mask2former("tiny_fixture", num_classes=1)
    model.freeze(("backbone", "encoder"))
    optimizer = build_adamw(model)
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    no_decay = {n for g in optimizer.param_groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert "model.transformer_module.queries_embedder.weight" in no_decay
    assert any("layernorm" in n.lower() or "norm" in n for n in no_decay)
    assert not any("backbone" in n or "pixel_level_module.encoder" in n for n in names)
    assert all(g["lr"] == 1e-4 for g in optimizer.param_groups)


def test_clip_over_all_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # total norm 5
    norm = clip_grad_norm([a, b], 0.01)
    assert float(norm) == 5.0
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.006, 0.0, 0.008]), atol=1e-7)
