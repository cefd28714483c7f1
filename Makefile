# Two commands do all the set-up: `make demo` and `make test` (both create .venv when missing).
PY := .venv/bin/python
STAMP := .venv/.installed

export RAY_AUTH_MODE ?= disabled
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
# Idle OpenMP threads sleep instead of spinning: torch on 2 shared cores (beside Ray workers) stays fast.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-integration bench gpu-check docs server cluster cluster-down clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/reals demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The production topology on localhost (PostgreSQL or SQLite, Prefect server, 2 Ray nodes, moto S3), end to end.
test-integration: $(STAMP)
	REALS_INTEGRATION=1 $(PY) -m pytest -q tests/integration

# Each benchmark as a script (its folder first on sys.path) with the repository importable (`bench.train_sit`).
bench: $(STAMP)
	@for b in bench/*.py; do [ $$b = bench/gpu.py ] && continue; echo "== $$b"; PYTHONPATH=$(CURDIR) $(PY) $$b || exit 1; done

# One JSON document of GPU figures (SiT-B/2, SiT-XL/2, DiT-XL/2 training, encode, sampling); under 8 min on an H100.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu

# The docs site into site/ (the command and config reference is generated from the code at build time).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

server: $(STAMP)
	.venv/bin/reals serve --with-server

# The production topology in DIR (default runs/cluster); S3 credentials from this shell's AWS_* variables.
DIR ?= runs/cluster
cluster: $(STAMP)
	.venv/bin/reals cluster up --dir $(DIR)

cluster-down: $(STAMP)
	.venv/bin/reals cluster down --dir $(DIR)

clean:
	rm -rf runs site
