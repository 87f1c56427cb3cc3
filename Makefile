# `make test` on a fresh Debian 12 machine installs what it needs and runs everything;
# .ci/run runs exactly this.
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test venv lint demo bench bench-scan fault-matrix clean install uninstall

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

venv: $(STAMP)

# Rebuilt when the dependencies or the system packages change.
$(STAMP): pyproject.toml tools/install-system-deps.sh
	bash tools/install-system-deps.sh
	python3 -m venv $(VENV)
	@echo "installing scpd and its test tools into $(VENV) (log: $(VENV)/pip.log)"
	@$(VENV)/bin/pip install --upgrade pip > $(VENV)/pip.log 2>&1 && \
	  $(VENV)/bin/pip install -e '.[test]' >> $(VENV)/pip.log 2>&1 || \
	  { tail -n 40 $(VENV)/pip.log; echo "pip install failed (full log: $(VENV)/pip.log)"; exit 1; }
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py

# The scan at scale, then transfers side by side with OpenSSH scp and rsync (README: Speed).
bench: bench-scan
	$(VENV)/bin/python bench/run.py

bench-scan: $(STAMP)
	$(VENV)/bin/python bench/scan.py

fault-matrix: $(STAMP)
	$(VENV)/bin/python bench/fault_matrix.py

# As root: scpd in its own virtualenv, its units and config directory (README: Install as a
# service). Independent of $(VENV) and of this checkout afterwards. Plain `=`, not `?=`, so
# that a PYTHON in the caller's environment (a pyenv shim the service user cannot run) is
# not picked up by accident; `make install PYTHON=...` still overrides.
APP_DIR = /opt/scpd
BIN_DIR = /usr/local/bin
UNIT_DIR = /etc/systemd/system
CONF_DIR = /etc/scpd
STATE_DIR = /var/lib/scpd
PYTHON = /usr/bin/python3
INSTALL_VARS = APP_DIR='$(APP_DIR)' BIN_DIR='$(BIN_DIR)' UNIT_DIR='$(UNIT_DIR)' \
	CONF_DIR='$(CONF_DIR)' STATE_DIR='$(STATE_DIR)' PYTHON='$(PYTHON)'

install:
	@$(INSTALL_VARS) bash tools/install.sh install

uninstall:
	@$(INSTALL_VARS) bash tools/install.sh uninstall

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
