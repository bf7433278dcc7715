.PHONY: install demo test bench clean
VENV := .venv
BIN := $(VENV)/bin

install: $(BIN)/dicomfl

$(BIN)/dicomfl: pyproject.toml deployments/install.sh
	bash deployments/install.sh
	@touch $@

demo: install
	$(BIN)/dicomfl demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python benchmarks/ingest_bench.py
	$(BIN)/python benchmarks/train_bench.py
	taskset -c 0 $(BIN)/python benchmarks/synth_bench.py

clean:
	rm -rf runs .pytest_cache
