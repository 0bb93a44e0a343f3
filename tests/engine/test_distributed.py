"""Two processes (gloo) and one process accumulating twice train the same parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import toy

#: Tolerance: the two runs sum the same per-sample gradients in a different order
#: (all_reduce of two halves vs accumulation), so float32 rounding may differ in the last bits.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = toy.train(run_dir, max_iter=6, global_batch=4, per_device_batch=2, period=3, noise=False)
        assert trainer.accum == 1
        torch.save({"model": trainer.module.state_dict(), "loss": trainer.metrics["total_loss"]},
                   f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path / "ddp_final")),
                       nprocs=2, join=True, start_method="spawn")
    single = toy.train(tmp_path / "single", max_iter=6, global_batch=4, per_device_batch=2, period=3, noise=False)
    assert single.accum == 2
    ranks = [torch.load(tmp_path / f"ddp_final.rank{r}", weights_only=True) for r in range(2)]
    for name, value in single.module.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], ranks[1]["model"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=RTOL, atol=ATOL, msg=name)
    assert ranks[0]["loss"] == pytest.approx(single.metrics["total_loss"], rel=1e-5)
    # the checkpoint of the 2-process run holds both ranks' RNG states
    from part_distillation.engine import checkpoint as ckpt

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ddp"))
    assert state["world_size"] == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
