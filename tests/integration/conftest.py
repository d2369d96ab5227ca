import pytest

from harness import GuestRun, kvm_usable


@pytest.fixture
def kvm():
    ok, why = kvm_usable()
    if not ok:
        pytest.skip(why)


@pytest.fixture
def guest(tmp_path, kvm):
    runs: list[GuestRun] = []

    def start(rom, **kw) -> GuestRun:
        r = GuestRun(tmp_path, rom, **kw)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.close()
