import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "integration"))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "unit"))

from conftest_vmm import skip_freebsd_vmm_items  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Tests marked freebsd_vmm need the real vmm.ko: skip them (with the
    # reason) everywhere else.
    skip_freebsd_vmm_items(items)
