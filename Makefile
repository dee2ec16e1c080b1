# make run  - create .venv if missing, install, serve the app on http://127.0.0.1:8501 (offline, bundled weights)
# make test - create .venv if missing, install runtime + dev requirements, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install install-dev bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# Topcon .fda/.fds layouts; --no-deps: it asks for opencv-python, which would replace opencv-python-headless
	$(PY) -m pip install -q --no-deps "oct-converter>=0.7,<0.8"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port 8501 --server.headless true

test: install-dev
	$(PY) -m pytest -q

bench: install
	$(PY) -m retina_core bench

clean:
	rm -rf $(VENV) .pytest_cache
