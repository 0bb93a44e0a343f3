"""B8: peak memory of the object-conditioned class head at ImageNet-21k size.

The stage-two class head is Linear(256, 22,000 x 8 + 1) applied to 200 queries at each
of 10 decoder predictions (docs/method.md#stage-6). Two ways, one training step each
(head forward at every layer, a cross-entropy over each image's K + 1 logits, backward):

* before: every layer's full logits, then each image's K + 1 columns gathered (the old
  ``condition_outputs``);
* after: each image's K + 1 weight rows selected once, then the product
  (``models.conditioned.conditioned_head``, what ``Mask2Former.forward`` does).

Peak memory: the largest total size of live tensors created during the step (forward and
backward, gradients included), measured by ``tests/memory.py``'s ``PeakTensorMemory``
(a dispatch mode that counts every new storage until it is freed); the head's own
parameters and the input queries are not counted. The head's gradient (one dense tensor
of the head's size) is part of both figures.

    .venv/bin/python benchmarks/b6_conditioned_head.py            # 22,000 x 8 classes, batch 1
    .venv/bin/python benchmarks/b6_conditioned_head.py --batch 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import limit_threads, threads_from_argv, timed  # noqa: E402

limit_threads(threads_from_argv())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from part_distillation.models.conditioned import conditioned_head, select_object_logits  # noqa: E402
from tests.memory import PeakTensorMemory  # noqa: E402


def step(head, queries, objects, parts, select_rows_first):
    if select_rows_first:
        logits = conditioned_head(head, queries, objects, parts)
    else:
        logits = [select_object_logits(head(q), objects, parts) for q in queries]
    targets = torch.zeros(logits[0].shape[:2], dtype=torch.long)
    loss = sum(F.cross_entropy(lg.transpose(1, 2), targets) for lg in logits)
    loss.backward()


def measure(args, select_rows_first):
    torch.manual_seed(0)
    head = torch.nn.Linear(args.dim, args.objects * args.parts + 1)
    queries = [torch.randn(args.batch, args.queries, args.dim, requires_grad=True) for _ in range(args.layers)]
    objects = torch.randint(0, args.objects, (args.batch,))
    with PeakTensorMemory() as memory:
        seconds, _ = timed(lambda: step(head, queries, objects, args.parts, select_rows_first))
    head_bytes = (head.weight.numel() + head.bias.numel()) * head.weight.element_size()
    return memory.peak, head_bytes, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=22_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"head Linear({args.dim}, {args.objects} x {args.parts} + 1), {args.queries} queries, "
          f"{args.layers} layers, batch {args.batch}")
    after, head_bytes, t_after = measure(args, True)
    before, _, t_before = measure(args, False)
    mb = 1e6
    print(f"head parameters: {head_bytes / mb:.1f} MB (its gradient is the same size)")
    print(f"before (full logits, then gather): peak {before / mb:.1f} MB, {t_before:.2f} s")
    print(f"after  (rows first):               peak {after / mb:.1f} MB, {t_after:.2f} s")
    print(f"B8 peak_before_mb={before / mb:.1f} peak_after_mb={after / mb:.1f} "
          f"beyond_grad_after_mb={(after - head_bytes) / mb:.2f} ratio={before / after:.1f}")


if __name__ == "__main__":
    main()
