# fuselip_med: install, demo and tests. CPU machines get the local CPU torch first (no CUDA wheels);
# machines that already have a torch (e.g. a CUDA build) keep it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP := $(PYTHON) -m pip

.PHONY: install demo lint test test-slow bench gpu-wheels

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"

demo: install
	fuselip-med finetune --recipe rocov2_demo

lint: install
	$(PYTHON) -m ruff check .

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

bench: install
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PYTHON) $$script || exit 1; done

# Wheels for a GPU machine without network (CPython 3.12, manylinux x86-64; never torch or its nvidia-*/triton):
# copy the checkout with .whl/ there and run benchmarks/gpu_check.sh, which installs them next to its torch.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py --out .whl --python-version 3.12 --extra test
