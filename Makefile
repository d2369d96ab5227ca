# bhyvepy: `make demo` runs the main job, `make test` runs the test suite.
# Both create (or reuse) a virtual environment in .venv and install what they need.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
UNAME  := $(shell uname -s)

ifeq ($(UNAME),Linux)
FFI_BUILDER := libvmmapi_ffi/kvm_build.py
else
FFI_BUILDER := libvmmapi_ffi/vmmapi_build.py
endif

.PHONY: all venv ffi guests demo test test-unit test-guests bench lint-man sysdeps clean

all: venv ffi guests

# System packages the guest tests use (SeaBIOS firmware).  Installed only when
# we are root on a Debian-like system and they are missing; without them the
# tests that need them skip and say why.
sysdeps:
	@if [ "$(UNAME)" = Linux ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; \
	  [ -f /usr/share/seabios/bios.bin ] || need="$$need seabios"; \
	  $(PYTHON) -c 'import ensurepip' 2>/dev/null || need="$$need python3-venv"; \
	  command -v ip >/dev/null || need="$$need iproute2"; \
	  if [ -n "$$need" ]; then \
	    echo "installing system packages:$$need"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null) \
	      || echo "warning: could not install$$need; tests needing them will skip"; \
	  fi; \
	fi

$(STAMP): pyproject.toml setup.py | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# Build the cffi extension in place so the source tree is importable as is.
ffi: $(STAMP)
	cd $(CURDIR) && $(VPY) $(FFI_BUILDER)

guests:
	$(MAKE) -C tests/guests

demo: all
	$(VPY) demo/run_demo.py

test: all
	$(VPY) -m pytest -q -rs -p no:cacheprovider tests

test-unit: all
	$(VPY) -m pytest -q tests/unit

test-guests: all
	$(VPY) -m pytest -q tests/integration

bench: all
	$(VPY) bench/exits.py

lint-man:
	for m in man/*.[0-9]; do groff -mdoc -ww -z $$m || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info bhyvepy/vmm/_kvm_ffi* bhyvepy/vmm/_vmmapi_ffi*
	$(MAKE) -C tests/guests clean
