# The two commands of the README: `make demo` and `make test`. Both install what is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
# Debian's python3 matches the python3-libnbd bindings the venv borrows from the system.
SYSPY  := /usr/bin/python3

.PHONY: setup demo test lint bench clean guest

setup: $(VENV)/.done

$(VENV)/.done: requirements.txt pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	$(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

# The small Linux guest with qemu-guest-agent that the quiescing tests boot (cached).
guest: setup
	bash scripts/build-test-guest.sh

test: setup lint guest
	$(VENV)/bin/pytest -q

bench: setup
	@command -v restic >/dev/null || DEBIAN_FRONTEND=noninteractive $$([ "$$(id -u)" -eq 0 ] || echo sudo) apt-get install -y -q --no-install-recommends restic
	$(PY) benchmarks/bench_backup.py

clean:
	rm -rf $(VENV) .pytest_cache
