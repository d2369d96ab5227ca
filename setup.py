"""Build hook: setuptools runs the cffi builders for the host's kernel backend.

The KVM binding is built on Linux and the libvmmapi binding on FreeBSD; each
builder compiles against the headers installed on the host (cffi API mode),
so struct layouts come from the system compiler.
"""

import sys

from setuptools import setup

if sys.platform.startswith("linux"):
    cffi_modules = ["libvmmapi_ffi/kvm_build.py:ffibuilder"]
elif sys.platform.startswith("freebsd"):
    cffi_modules = ["libvmmapi_ffi/vmmapi_build.py:ffibuilder"]
else:
    cffi_modules = []

setup(cffi_modules=cffi_modules)
