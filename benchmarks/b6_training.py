"""B6: training step time and peak memory per image on CPU (forward + backward + clipping +
AdamW step), the engine's real loss (``stages.training.reference_criterion``: 12544 points per
mask, oversample 3, importance ratio 0.0) and optimiser, backbone and pixel-decoder encoder
frozen by name as the reference does (frozen modules follow ``train()``: drop-path acts).

Two configs: the tiny (demo) model at batch ``--batch`` and the Swin-L reference config
(``swin_l_coco_instance``: 200 queries, 9 decoder layers, one foreground class) at batch 1.
Weights are random (no checkpoint here): the step's cost does not depend on their values.
Images are random 640x640 (``--size``); targets 4 random-box parts.

Baseline in the same run: the forward pass alone in eval mode without gradients (what
inference costs), so ``train/forward`` says what training adds.

Wall time is what the machine gave; the process CPU time per step (all threads) is printed
too, as wall time on a shared, oversubscribed machine says little. Memory: each config is measured in a fresh spawned process; ``peak_gb`` is that process's
peak resident set (``ru_maxrss``) minus its resident set just before the model is built, so
it counts the weights, gradients, AdamW state, activations and allocator slack of the step
(process RSS, not torch's allocator statistics, which CPU tensors do not keep).

    .venv/bin/python benchmarks/b6_training.py            # tiny + Swin-L at batch 1 (minutes, ~10 GB)
    .venv/bin/python benchmarks/b6_training.py --quick    # tiny only (Swin-L reported as skipped)
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import limit_threads, threads_from_argv  # noqa: E402

limit_threads(threads_from_argv())

import torch  # noqa: E402


def _batch(batch_size: int, size: int) -> dict:
    from part_distillation.models.mask2former import preprocess_images

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


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(size_name: str, batch_size: int, size: int, repeats: int, threads: int) -> dict:
    """One config's step times (median of ``repeats`` after one warm-up) and memory; run in a child."""
    from part_distillation.engine.optim import build_adamw, clip_grad_norm
    from part_distillation.models.checkpoint import build_model
    from part_distillation.stages.training import mask2former_loss, reference_criterion
    from part_distillation.models.mask2former import MODEL_SIZES

    limit_threads(threads)
    torch.manual_seed(0)
    batch = _batch(batch_size, size)
    rss_before = _rss_gb()
    model = build_model(size_name, None, num_classes=1)
    model.freeze(("backbone", "encoder"), frozen_mode="train")  # the reference's freezing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = build_adamw(model)
    loss_fn = mask2former_loss(reference_criterion(1), torch.device("cpu"))

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
    cpu_times = {"train": [], "infer": []}
    load_before = os.getloadavg()[0]
    train_step()  # warm-up (also allocates the AdamW state)
    infer_step()
    for _ in range(repeats):  # interleaved
        for name, step in (("train", train_step), ("infer", infer_step)):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    train_s = statistics.median(times["train"]) / batch_size
    infer_s = statistics.median(times["infer"]) / batch_size
    return {"spec": MODEL_SIZES[size_name], "size": size, "batch": batch_size, "train_s_per_image": train_s,
            "infer_s_per_image": infer_s, "ratio": train_s / infer_s, "train_times": times["train"],
            "train_cpu_s_per_image": statistics.median(cpu_times["train"]) / batch_size,
            "load": (load_before, os.getloadavg()[0]),
            "peak_gb": _peak_rss_gb() - rss_before, "params_m": total / 1e6, "trainable_m": trainable / 1e6}


def measure_in_child(*args) -> dict:
    """``measure`` in a fresh spawned process, so that its peak RSS is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2, help="the tiny model's batch (Swin-L: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny model only; Swin-L is reported as skipped")
    mode.add_argument("--full", action="store_true", help="tiny and Swin-L (the default)")
    mode.add_argument("--swinl", action="store_true", help=argparse.SUPPRESS)  # the old flag: now the default
    args = parser.parse_args()
    configs = [("tiny", args.batch, args.repeats)]
    if not args.quick:
        configs.append(("swinl", 1, max(1, args.repeats - 1)))
    rows = []
    for size_name, batch, repeats in configs:
        r = measure_in_child(size_name, batch, args.size, repeats, args.threads)
        rows.append(r)
        print(f"{r['spec']:>22} ({r['params_m']:.1f} M parameters, {r['trainable_m']:.1f} M trainable) "
              f"{r['size']}px batch {r['batch']}, {args.threads} threads: train {r['train_s_per_image']:.3f} "
              f"s/image ({1 / r['train_s_per_image']:.2f} images/s; steps "
              f"{', '.join(f'{t:.2f}' for t in r['train_times'])} s; process CPU {r['train_cpu_s_per_image']:.2f} "
              f"s/image), forward-only {r['infer_s_per_image']:.3f} s/image, train/forward {r['ratio']:.2f}x, "
              f"peak RSS increase {r['peak_gb']:.2f} GB; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}",
              flush=True)
    tiny = rows[0]
    swinl = rows[1] if len(rows) > 1 else None
    swinl_fields = (f"swinl_s_per_image={swinl['train_s_per_image']:.2f} swinl_peak_gb={swinl['peak_gb']:.2f} "
                    f"swinl_cpu_s_per_image={swinl['train_cpu_s_per_image']:.2f}"
                    if swinl else "swinl_s_per_image=skipped swinl_peak_gb=skipped")
    print(f"B6 tiny_images_per_s={1 / tiny['train_s_per_image']:.2f} tiny_train_over_forward={tiny['ratio']:.2f} "
          f"{swinl_fields}")


if __name__ == "__main__":
    main()
