# hf_ssam — `make test` and `make demo` set up .venv on first use; `make test-min` sets up .venv-min.
PY := .venv/bin/python
PY_MIN := .venv-min/bin/python
# Left out of the oldest-versions run (docs/versions.md): the bench scripts, the docs' examples and the recipes
# (tools and examples written for the newest versions, run by `make test`) and the CUDA tests (no GPU in CI; run
# by `make gpu-check`). Everything else runs; the tests that torch 2.6 or transformers 4.x cannot run skip,
# naming the version and the reason: FSDP2 on CPU processes (torch 2.6), loss_is_scaled_for_ga
# (transformers >= 5.19).
MIN_LEFT_OUT := tests/test_bench.py tests/test_bench_gamma_control.py tests/test_docs.py tests/test_recipes.py \
	tests/test_sft_recipe.py tests/test_cuda.py
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv venv-min test test-min test-all demo docs lint clean gpu-check

venv: .venv/.installed

.venv/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# pytest-xdist shares the test files out over PYTEST_WORKERS processes; all tests of one file run in one process
# (--dist loadfile), so a file's torchrun launch or bench scripts, set up once per file, run once.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

test: venv
	$(PY) -m pytest -q $(XDIST)

# The oldest supported versions (requirements-min.txt, the lower bounds in pyproject.toml).
venv-min: .venv-min/.installed

.venv-min/.installed: requirements-min.txt pyproject.toml
	test -x $(PY_MIN) || python3 -m venv .venv-min
	$(PY_MIN) -m pip install --quiet --upgrade pip
	$(PY_MIN) -m pip install --quiet -r requirements-min.txt
	$(PY_MIN) -m pip install --quiet --no-deps -e .
	touch $@

test-min: venv-min
	$(PY_MIN) -m pytest -q $(XDIST) $(addprefix --ignore=,$(MIN_LEFT_OUT))

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

demo: venv
	$(PY) recipes/demo.py

docs: venv
	.venv/bin/mkdocs build --strict --site-dir site

# The GPU verification (CUDA tests, the sync check, step cost on the GPU) in under 8 minutes: outputs/gpu-check/.
# Without CUDA: one line, exit 0. Builds .venv only where there is none.
gpu-check:
	@command -v $(PY) >/dev/null || $(MAKE) --no-print-directory venv
	@$(PY) bench/gpu_check.py

lint: venv
	.venv/bin/ruff check .

clean:
	rm -rf site outputs .pytest_cache
