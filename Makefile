# Two entry points: `make demo` (the embedded default job) and `make test`. Each sets itself up.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test install data clean

install: $(STAMP)

# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Fashion-MNIST from Debian when absent and possible; otherwise the demo downloads it or says how to get it.
data:
	@if [ ! -f $(FASHION_MNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; the demo will try to download Fashion-MNIST"; \
	fi

demo: install data
	$(VENV)/bin/transferkit demo

# Two workers (pytest-xdist): most of the suite's time is short processes starting Python and importing torch and
# transformers, or waiting on them, so two cores run two tests side by side (16 -> 13 min here). Each test module stays
# on one worker (--dist loadscope): the module-scoped fixtures (the kill -9 reference run, trained runs) run once.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(VENV) runs .pytest_cache
