"""``bhyvepy -r FILE -o config.dump=1`` prints the tree the restore would run with."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from harness import REPO, guest_rom

pytestmark = pytest.mark.guest


def _bhyvepy(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "bhyvepy", *args], env=env, capture_output=True,
                          text=True, timeout=60, **kw)


def test_dump_of_a_restore_shows_snapshot_config_with_overrides(kvm, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    vm = subprocess.Popen([sys.executable, "-m", "bhyvepy", "-m", "64M", "-s", "0,hostbridge",
                           "-s", "31,lpc", "-l", "com1,/dev/null", "-l", f"bootrom,{guest_rom('counter')}",
                           "-o", f"rundir={tmp_path}", "dumpvm"], env=env)
    try:
        ckp = tmp_path / "s.ckp"
        for _ in range(100):
            if (tmp_path / "dumpvm").exists():
                break
            time.sleep(0.1)
        r = subprocess.run([sys.executable, "-m", "bhyvepy.ctl", "--vm=dumpvm", f"--suspend={ckp}",
                            f"--rundir={tmp_path}"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert vm.wait(60) == 5
    finally:
        if vm.poll() is None:
            vm.kill()
    out = _bhyvepy("-r", str(ckp), "-o", "config.dump=1", "-l", "com1,stdio")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert "name=dumpvm" in lines                 # from the snapshot
    assert "memory.size=64M" in lines             # from the snapshot
    assert "lpc.com1.path=stdio" in lines         # the command line's override
    assert "pci.0.31.0.device=lpc" in lines
