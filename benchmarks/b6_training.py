"""B6: training step time and peak memory per image on CPU (forward + backward + AdamW step,
frozen backbone and pixel-decoder encoder), the engine's real loss and optimiser.

Baseline in the same run: the forward pass alone in eval mode without gradients (what
inference costs), so the ratio says what training adds. Images are random 640x640
(``--size``), targets 4 random-box parts, the reference's 12544 points per mask.

    .venv/bin/python benchmarks/b6_training.py            # the tiny (demo) model
    .venv/bin/python benchmarks/b6_training.py --swinl    # also Swin-L at batch 1 (slow, ~10 GB)
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from part_distillation.engine.optim import build_adamw, clip_grad_norm
from part_distillation.engine.recipe import mask2former_loss, reference_criterion
from part_distillation.models.mask2former import build_mask2former, preprocess_images


def _batch(batch_size: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        masks = torch.zeros(4, size, size)
        for k in range(4):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[k, y:y + size // 3, x:x + size // 3] = 1
        targets.append({"labels": torch.zeros(4, dtype=torch.int64), "masks": masks})
    batch = preprocess_images(images)
    return {"pixel_values": batch.pixel_values, "targets": targets}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def measure(spec: str, batch_size: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_mask2former(spec, num_classes=1)
    model.freeze(backbone=True, pixel_decoder_encoder=True)
    optimizer = build_adamw(model)
    loss_fn = mask2former_loss(reference_criterion(1), torch.device("cpu"))
    batch = _batch(batch_size, size)
    rss_before = _peak_gb()

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sum(loss_fn(model, batch).values()).backward()
        clip_grad_norm(model.parameters(), 0.01)
        optimizer.step()

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(batch["pixel_values"])

    times = {"train": [], "infer": []}
    train_step()  # warm-up
    infer_step()
    for _ in range(repeats):  # interleaved
        for name, step in (("train", train_step), ("infer", infer_step)):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    train_s = statistics.median(times["train"]) / batch_size
    infer_s = statistics.median(times["infer"]) / batch_size
    return {"spec": spec, "size": size, "batch": batch_size, "train_s_per_image": train_s,
            "infer_s_per_image": infer_s, "ratio": train_s / infer_s, "peak_gb": _peak_gb(),
            "peak_gb_before": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--swinl", action="store_true", help="also the Swin-L reference config at batch 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure("demo_cpu", args.batch, args.size, args.repeats)]
    if args.swinl:
        rows.append(measure("swin_l_coco_instance", 1, args.size, max(1, args.repeats - 1)))
    for r in rows:
        print(f"{r['spec']:>22} {r['size']}px batch {r['batch']}: train {r['train_s_per_image']:.3f} s/image "
              f"({1 / r['train_s_per_image']:.2f} images/s), forward-only {r['infer_s_per_image']:.3f} s/image, "
              f"train/forward {r['ratio']:.2f}x, peak process RSS {r['peak_gb']:.2f} GB")
    tiny = rows[0]
    swinl = rows[1] if len(rows) > 1 else None
    print(f"B6 tiny_images_per_s={1 / tiny['train_s_per_image']:.2f} "
          f"tiny_train_over_forward={tiny['ratio']:.2f} "
          f"swinl_s_per_image={swinl['train_s_per_image']:.2f} swinl_peak_gb={swinl['peak_gb']:.2f}"
          if swinl else
          f"B6 tiny_images_per_s={1 / tiny['train_s_per_image']:.2f} tiny_train_over_forward={tiny['ratio']:.2f} "
          f"swinl_s_per_image=skipped swinl_peak_gb=skipped")


if __name__ == "__main__":
    main()
