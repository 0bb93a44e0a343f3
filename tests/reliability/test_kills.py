"""Kill -9 at random moments in every stage of the demo pipeline, rerun, get the same output.

One uninterrupted run of the (shrunken) demo pipeline is the reference (session
fixture). Each seed then runs a *lineage* in its own folder: start the pipeline
command, wait until it enters a target stage (its ``pipeline: stage <name>`` log
line), sleep a seeded random fraction of that stage's reference duration, SIGKILL it,
check that every store reopens clean and holds only records equal to the reference's,
then start the same command again with the next stage as target, until every stage
was a target; a last rerun completes the pipeline. Its final output must equal the
reference: every stage's records (decoded, per key, order-independent, paths made
relative to the root), the synthetic dataset's files byte for byte, the part-ranking
centroids, both training runs' final weights bitwise (``stage.deterministic=true``)
and the evaluation metrics; no shard holds a torn frame and no output-looking file
is left that the reference does not have (temporary files are hidden ``.*.tmp``).

The lineages of the seeds run side by side (one core each; ``OMP_NUM_THREADS=1``).
"""
from __future__ import annotations

import concurrent.futures
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.demo_runs import (
    STAGES, PipelineProcess, Snapshot, assert_partial_output_is_reference, assert_same_output,
)

pytestmark = pytest.mark.integration

SEEDS = (0, 1)

@dataclass
class Kill:
    seed: int
    target: str
    stage: str
    delay: float


def kill_lineage(root: Path, seed: int, reference: Snapshot) -> list[Kill]:
    """Kill the pipeline once per target stage (seeded random moments), rerun to completion."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    position = 0  # index of the next stage to target
    while position < len(STAGES):
        target = STAGES[position]
        run = PipelineProcess(root)
        if not run.wait_for_stage(target):
            run.finish()  # ended before reaching it: fails with the log unless the run completed
            break
        delay = rng.uniform(0.02, 0.9) * reference.durations[target]
        time.sleep(delay)
        stage = run.kill()
        if stage is None:  # it finished meanwhile
            run.finish()
            break
        kills.append(Kill(seed, target, stage, round(delay, 2)))
        assert_partial_output_is_reference(root, reference)
        position = STAGES.index(stage) + 1
    PipelineProcess(root).finish()
    assert_same_output(root, reference)
    return kills


def test_kill_in_every_stage_then_rerun_gives_the_uninterrupted_output(uninterrupted, tmp_path, tally):
    with concurrent.futures.ThreadPoolExecutor(len(SEEDS)) as pool:
        lineages = [pool.submit(kill_lineage, tmp_path / f"seed{seed}", seed, uninterrupted) for seed in SEEDS]
        kills = [k for f in lineages for k in f.result()]
    for k in kills:
        print(f"seed {k.seed}: target {k.target}, killed in {k.stage} after {k.delay} s")
    tally.add("kills", len(kills))
    killed_in = {k.stage for k in kills}
    assert killed_in == set(STAGES), f"no kill landed in {sorted(set(STAGES) - killed_in)}"
