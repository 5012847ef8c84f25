# codi-lightning: `make demo` runs the CPU demo end to end, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first as a matched pair; override for another build,
# e.g. `make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# configs/demo.yaml writes under demo_out/; these send every path to $(DEMO_OUT)
# (`--trainer.callbacks.dirpath` sets the last callback of the config: its ModelCheckpoint)
DEMO_PATHS = --trainer.default_root_dir $(DEMO_OUT) \
	--trainer.logger.init_args.save_dir $(DEMO_OUT)/logs \
	--trainer.callbacks.dirpath $(DEMO_OUT)/checkpoints \
	--data.train_shards '$(DEMO_OUT)/shards/train-{000000..000003}.tar' \
	--data.val_shards $(DEMO_OUT)/shards/val-000000.tar \
	--data.predict_output $(DEMO_OUT)/predictions

.PHONY: install test test-all lint format demo bench-quality bench-quality-photos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,ui]"
	touch $@

test: install
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format: install
	$(PY) -m ruff check --fix src tests bench
	$(PY) -m ruff format src tests bench

demo: install
	$(PY) -m codi_lightning.demo --out $(DEMO_OUT)
	$(VENV)/bin/codi-lightning fit --config configs/demo.yaml $(DEMO_PATHS)
	$(VENV)/bin/codi-lightning validate --config configs/demo.yaml $(DEMO_PATHS) --ckpt_path $(DEMO_OUT)/checkpoints/last.ckpt
	$(VENV)/bin/codi-lightning test --config configs/demo.yaml $(DEMO_PATHS) --ckpt_path $(DEMO_OUT)/checkpoints/last.ckpt
	$(VENV)/bin/codi-lightning predict --config configs/demo.yaml $(DEMO_PATHS) --ckpt_path $(DEMO_OUT)/checkpoints/last.ckpt --data.predict_images $(DEMO_OUT)/lowres
	$(PY) -m codi_lightning.demo --out $(DEMO_OUT) --report --cli $(VENV)/bin/codi-lightning

# the few-step claim on the digits testbed (docs/results.md); QUICK=1: the same code on a
# few steps (under 2 min)
QUICK ?=
bench-quality: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) bench/quality.py $(if $(QUICK),--quick) $(if $(FLOW),--flow) $(if $(ABLATIONS),--ablations) $(if $(INPAINT),--inpaint)

# the second panel: 4x SR of photo patches (docs/results_photos.md); 41 min on 2 cores
bench-quality-photos: install
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) bench/quality_photos.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
