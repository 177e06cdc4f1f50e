PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup sandbox-tools test demo bench clean

# Installs into the active Python. torch is installed only when missing, so a CUDA build a user
# already has is kept; the pinned 2.13.0 is the CPU wheel this project is tested with.
setup: sandbox-tools
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[train,eval,dev]"

# bubblewrap isolates generated code (eval.sandbox); without it the sandbox refuses to run programs.
sandbox-tools:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else \
	    echo "note: bubblewrap (bwrap) is missing and needs root to install (apt-get install bubblewrap);" \
	         "until then HumanEval and the code reward refuse to execute generated code"; \
	  fi; }

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: setup
	$(PYTHON) -m llama4_sparse.recipes.demo

clean:
	rm -rf outputs runs .pytest_cache
