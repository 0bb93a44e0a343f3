# The two commands of the README. Both create the environment when it is missing and
# are safe to run again.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-12)

.PHONY: demo test test-fast venv bench clean-demo reliability

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# The real-photo check first, so that the demo's last stage (report) covers both runs; the
# demo then ends with the evaluation table (the report's first section) and where report.md is.
DEMO_REPORT = $${PD_DEMO_ROOT:-demo_output}/report.md

demo: venv
	$(PY) -m part_distillation experiment=photos
	$(PY) -m part_distillation experiment=demo
	@echo; awk '/^## /{show = ($$0 == "## Evaluation")} show' "$(DEMO_REPORT)"; echo "Report: $(DEMO_REPORT)"

# The demo's outputs (demo_output/ or $PD_DEMO_ROOT) removed: a demo made by a version with other
# demo settings is refused ("made with other settings") rather than overwritten.
clean-demo:
	rm -rf "$${PD_DEMO_ROOT:-demo_output}"

test: venv
	$(PY) -m pytest -q

# The edit-run loop: every test that runs no stage, subprocess or training loop
# (the integration tier is decided by tests/tiers.py).
test-fast: venv
	$(PY) -m pytest -q -m "not integration"

reliability: venv
	$(PY) tools/reliability.py

bench: venv
	for b in benchmarks/b*_*.py; do $(PY) $$b || exit 1; done
