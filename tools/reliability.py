"""Run the reliability suite (``tests/reliability``) and print its counts last.

``make reliability`` calls this. The last line is
``RELIABILITY kills=… requeues=… bad_inputs=… lost=…``; the exit status is pytest's,
or 1 when any record was lost even though every test passed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kills", "requeues", "bad_inputs", "lost")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tally_file = Path(tmp) / "tally.json"
        env = {**os.environ, "PD_RELIABILITY": "1", "PD_RELIABILITY_TALLY": str(tally_file)}
        # a private basetemp: pytest prunes other sessions' folders under the shared default
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/reliability",
                              f"--basetemp={tmp}/pytest", *argv],
                             cwd=REPO_ROOT, env=env)
        counts = json.loads(tally_file.read_text()) if tally_file.is_file() else {}
    print("RELIABILITY " + " ".join(f"{k}={counts.get(k, 0)}" for k in KINDS), flush=True)
    if rc == 0 and counts.get("lost", 0):
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
