# hf_ssam — `make test` and `make demo` set up .venv on first use.
PY := .venv/bin/python
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-all demo docs lint clean gpu-check

venv: .venv/.installed

.venv/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q

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
