"""The suite's tally counts only known kinds (a typo must not vanish from the line)."""
import pytest

from tests.reliability.conftest import Tally


def test_tally_counts_and_prints_known_kinds():
    t = Tally()
    t.add("kills", 2)
    t.add("lost")
    assert t.line() == "RELIABILITY kills=2 requeues=0 bad_inputs=0 lost=1"
    with pytest.raises(ValueError, match="unknown tally kind"):
        t.add("kill")
