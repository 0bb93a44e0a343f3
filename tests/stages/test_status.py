"""Stage ``status``: where each stage of the pipeline stands, from the stores (no SLURM here).

The table itself (rows before any run): tests/launch/test_status.py."""
from __future__ import annotations

import pytest

from part_distillation.data.synthetic import make_synthetic_dataset
from tests.helpers import run_entry


@pytest.mark.integration
def test_status_shows_records_bad_inputs_and_the_error_of_a_failed_local_run(tmp_path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_classes=2, images_per_class=3, size=48)
    first_class = sorted(p for p in (data / "train").iterdir() if p.is_dir())[0]
    (first_class / "broken.JPEG").write_bytes(b"not a jpeg")  # index records it as a bad input
    detic = tmp_path / "pseudo_labels" / "object_labels" / "synthetic_train" / "detic_predictions"
    (detic / "shards" / "00000-of-00001.rec").mkdir(parents=True)  # stage 3's shard file cannot be opened
    args = ["experiment=demo", f"paths.root={tmp_path}", f"data.root={data}", f"hydra.run.dir={tmp_path}/run"]
    failed = run_entry(*args, "stage.stages=[index,detic_labeling]")
    assert failed.returncode != 0 and "Is a directory" in failed.stderr, failed.stderr[-2000:]

    shown = run_entry("stage=status", *args, check=True)
    lines = {line.split()[1]: line for line in shown.stdout.splitlines() if line[:1].isdigit()}
    assert list(lines) == ["index", "detic_labeling"], shown.stdout
    index = lines["index"].split()
    # 7 records (the bad file is recorded with ok: false), 1 bad input, by reason
    assert index[2:7] == ["1/1", "0", "0", "0", "7"] and index[7] == "1", shown.stdout
    detic_row = lines["detic_labeling"].split()
    assert detic_row[2:7] == ["0/1", "0", "1", "0", "0"], shown.stdout
    assert "Is a directory" in lines["detic_labeling"], shown.stdout

