# One command each, from a fresh clone:  make demo   |   make test
# Both create .venv (CPU pins below), build the compiled modules and run.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: the pinned CPU wheel of torch (a bare "torch" would pull a multi-GB CUDA build).
DEPS   := torch==2.13.0 triton==3.9.0 numpy scipy pycocotools pillow tqdm pyyaml matplotlib \
          pytest pytest-benchmark hypothesis pybind11 cmake ninja onnx==1.23.2 onnxruntime==1.32.0
BUILT  := $(VENV)/.fq-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') CMakeLists.txt setup.py

.PHONY: venv build test bench demo clean

$(VENV)/.fq-deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

venv: $(VENV)/.fq-deps

# Builds fqkernels._cpu always and fqkernels._cuda when nvcc is found (FQ_BUILD_CUDA=0|1 forces).
$(BUILT): $(VENV)/.fq-deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest -q tests

# Benchmark-only baselines: Opacus normally, BackPACK without its (torchvision) dependencies.
$(VENV)/.fq-bench: $(VENV)/.fq-deps
	$(PY) -m pip install -q opacus einops unfoldNd
	$(PY) -m pip install -q --no-deps backpack-for-pytorch
	touch $@

bench: $(BUILT) $(VENV)/.fq-bench
	$(PY) -m pytest -q benchmarks -o python_files="bench_*.py" --benchmark-columns=min,median,mean,rounds

demo: $(BUILT)
	$(VENV)/bin/fqdetr demo --out runs/demo

clean:
	rm -rf build $(BUILT) fqkernels/_cpu*.so fqkernels/_cuda*.so
