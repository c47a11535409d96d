# The two commands: `make run` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
RUN_DIR ?= runs/default
COMPARE_DIR ?= runs/compare
PYTEST_ARGS ?=

.PHONY: install run compare test test-fast bench constraints clean

# Exact versions from constraints.txt (those the suite passes with), so a fresh machine
# next year builds what was tested; `pip install` of the package alone keeps setup.py's ranges.
$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing ssr_jax and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install -e '.[test,hf]' -c constraints.txt > $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	@touch $(STAMP)

install: $(STAMP)

# Kept current: after upgrading packages in $(VENV) and passing `make test`, rewrite the pins
# from the venv (everything installed except ssr_jax itself) and commit constraints.txt.
constraints:
	@test -x $(PY) || (echo "no $(VENV); run make install first"; exit 1)
	@(echo "# Exact versions \`make test\` passes with; \`make install\` installs these."; \
	  echo "# Kept current: regenerate with \`make constraints\` (pip freeze of $(VENV))."; \
	  $(PY) -m pip freeze --exclude-editable --exclude ssr_jax | LC_ALL=C sort -f) > constraints.txt
	@echo "wrote constraints.txt ($$(grep -c '==' constraints.txt) pins)"

# The main job end to end on the embedded default corpus.
run: install
	$(VENV)/bin/ssr-jax default-run --out_dir=$(RUN_DIR)

# Does SSR help? The objective comparison on the embedded default (~30 min on 2 CPU cores;
# rerun to resume): MODEL_DIR/report.md, results.json and plots.
compare: install
	$(VENV)/bin/ssr-jax compare --gin_file=gin/compare/default.gin --gin.MODEL_DIR="'$(COMPARE_DIR)'"

# The whole suite (CI runs this); `make test-fast` skips the few tests marked slow.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every benchmark, side by side with Hugging Face where it applies: bench/RESULTS.md.
bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info
