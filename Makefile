PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# The venv is rebuilt when the dependency files change.
$(STAMP): pyproject.toml requirements-torch.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-torch.txt
	$(BIN)/pip install -q -e '.[test,train]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/filip demo

# The HTML report test renders in Debian's chromium; the script installs it where it can (root,
# apt) and otherwise says why, and that one test skips.
test: $(STAMP)
	sh scripts/install-chromium.sh
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-output
