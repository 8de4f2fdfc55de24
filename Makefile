# The two commands of the README do all the set-up: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test smoke ui clean-results mutation

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: this picks the CPU wheel instead of a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) run_search.py --space search_spaces/faerec.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

smoke: $(STAMP)
	$(PY) run_search.py --space search_spaces/smoke.yaml $(ARGS)

ui: $(STAMP)
	bash mlflow/server.sh

# Not part of `make test`: one plausible bug at a time in a copy, against its test file.
mutation: $(STAMP)
	$(PY) tests/mutation_check.py $(ARGS)
