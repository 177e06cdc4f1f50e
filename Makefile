PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup test demo bench clean

# Installs into the active Python. torch is installed only when missing, so a CUDA build a user
# already has is kept; the pinned 2.13.0 is the CPU wheel this project is tested with.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[train,eval,dev]"

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: setup
	$(PYTHON) -m recipes.demo

clean:
	rm -rf outputs runs .pytest_cache
