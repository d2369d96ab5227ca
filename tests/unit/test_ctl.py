"""bhyvepyctl: option parsing, usage, --snapshot-info, and the nvlist protocol
over real UNIX sockets -- against a fake VM server and against bhyvepy's own
control server (with a stand-in machine)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bhyvepy import ctl
from bhyvepy.config import ConfigTree
from bhyvepy.errors import BhyveExit
from bhyvepy.snapshot import control
from bhyvepy.snapshot.checkpoint import CheckpointError, CheckpointResult
from bhyvepy.snapshot.fileformat import MemRegion, Section, write_snapshot
from bhyvepy.snapshot.nvlist import Descriptor, recv_nvlist, send_nvlist


# --------------------------------------------------------------------------
# option parsing and usage
# --------------------------------------------------------------------------

def test_checkpoint_and_suspend_forms():
    o = ctl.parse(["--vm=web", "--checkpoint=/tmp/x"])
    assert (o.vm, o.checkpoint, o.suspend) == ("web", "/tmp/x", False)
    o = ctl.parse(["--vm", "web", "--suspend", "snap"])
    assert (o.vm, o.checkpoint, o.suspend) == ("web", "snap", True)
    assert ctl.parse(["--vm=a", "--force-poweroff", "--force-reset"]).force_reset
    assert ctl.parse(["--vm=a", "--status", "--rundir=/r"]).rundir == "/r"
    assert ctl.parse(["--vm=a", "--status"]).rundir == "/var/run/bhyve"


def test_unique_prefixes_are_accepted_like_getopt_long():
    o = ctl.parse(["--vm=a", "--check=f"])
    assert o.checkpoint == "f" and not o.suspend
    assert ctl.parse(["--vm=a", "--susp", "f"]).suspend


@pytest.mark.parametrize("argv, message", [
    ([], ""),
    (["--checkpoint=f"], ""),                                   # no --vm
    (["--vm=a", "--checkpoint=f", "--suspend=g"], ""),          # only one of the two
    (["--vm=a", "--checkpoint=f", "--checkpoint=g"], ""),
    (["--vm=a", "--bogus"], "unknown option -- bogus"),
    (["--vm=a", "--force"], "ambiguous option -- force"),
    (["--vm=a", "--status=1"], "option doesn't take an argument -- status"),
    (["--vm"], "option requires an argument -- vm"),
    (["--vm=a", "--checkpoint="], "empty snapshot file name"),
])
def test_usage_errors_print_usage_on_stderr_and_exit_1(argv, message, capsys):
    assert ctl.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "Usage: bhyvepyctl --vm=<vmname>" in err
    assert "--suspend=<filename>" in err       # vm-bhyve greps for "--suspend="
    if message:
        assert err.startswith(f"bhyvepyctl: {message}\n")
    else:
        assert err.startswith("Usage:")


def test_snapshot_info_needs_no_vm():
    o = ctl.parse(["--snapshot-info=f"])
    assert o.vm is None and o.snapshot_info == "f" and not o.talks_to_vm


# --------------------------------------------------------------------------
# --snapshot-info
# --------------------------------------------------------------------------

def _write_snapshot(path: Path) -> None:
    mem = bytearray(1 << 20)
    mem[0x5000:0x5010] = b"some guest bytes"
    meta = {"basic metadata": {"ncpus": 2, "vmname": "infovm", "memflags": 0},
            "backend": "kvm", "host": {"hostname": "h", "system": "Linux", "release": "6"},
            "config": {"name": "infovm"},
            "emulations": {"uart-com1": "uart", "virtio-blk-pci-0-3-0": "virtio-blk"}}
    write_snapshot(str(path), metadata=meta,
                   kern_structs=[Section("vm", 1, b"k" * 20), Section("vlapic", 1, b"l" * 300)],
                   devices=[Section("uart-com1", 1, b"u" * 19),
                            Section("virtio-blk-pci-0-3-0", 2, b"b" * 77)],
                   memory=[MemRegion(0, mem)])


def test_snapshot_info_lists_everything(tmp_path, capsys):
    path = tmp_path / "s"
    _write_snapshot(path)
    assert ctl.main([f"--snapshot-info={path}"]) == 0
    out = capsys.readouterr().out
    assert "vmname: infovm" in out and "ncpus: 2" in out
    assert "memsize: 1048576 (1 MiB)" in out and "backend: kvm" in out
    lines = out.splitlines()
    blk = next(ln for ln in lines if "virtio-blk-pci-0-3-0" in ln)
    assert "virtio-blk" in blk.split()[1:] and "version 2" in blk and "size 77" in blk
    assert blk.endswith("checksum ok")
    assert any("vlapic" in ln and "size 300" in ln and "checksum ok" in ln for ln in lines)
    assert any(ln.strip().startswith("gpa 0x0") and "data 4096" in ln and "checksum ok" in ln
               for ln in lines)
    assert lines[-1] == "status: valid"


def test_snapshot_info_names_a_damaged_section(tmp_path, capsys):
    path = tmp_path / "s"
    _write_snapshot(path)
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"u" * 19)
    raw[pos + 5] ^= 1
    path.write_bytes(bytes(raw))
    assert ctl.main(["--snapshot-info", str(path)]) == 65
    out = capsys.readouterr().out
    uart = next(ln for ln in out.splitlines() if "uart-com1" in ln)
    assert uart.endswith("checksum checksum mismatch")
    assert next(ln for ln in out.splitlines() if "virtio-blk-pci" in ln).endswith("checksum ok")
    assert "status: INVALID: checksum mismatch in section 'uart-com1'" in out


def test_snapshot_info_reports_damaged_memory(tmp_path, capsys):
    path = tmp_path / "s"
    _write_snapshot(path)
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"some guest bytes")
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))
    assert ctl.main([f"--snapshot-info={path}"]) == 65
    out = capsys.readouterr().out
    assert "status: INVALID: checksum mismatch in memory region at gpa 0x0" in out


def test_snapshot_info_on_garbage_and_missing_files(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a snapshot at all")
    assert ctl.main([f"--snapshot-info={junk}"]) == 65
    assert "status: INVALID: not a bhyvepy snapshot (bad magic)" in capsys.readouterr().out
    assert ctl.main([f"--snapshot-info={tmp_path / 'nope'}"]) == 1
    assert "No such file or directory" in capsys.readouterr().err


# --------------------------------------------------------------------------
# the protocol, against a fake VM
# --------------------------------------------------------------------------

class FakeVm:
    """Listens on <rundir>/<name> and answers one nvlist per connection."""

    def __init__(self, rundir: Path, name: str, answer) -> None:
        self.path = str(rundir / name)
        self.answer = answer
        self.requests: list[dict] = []
        self.fddir_stat: list[os.stat_result] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                req = recv_nvlist(conn)
                fd = req.get("fddir")
                if isinstance(fd, Descriptor):
                    self.fddir_stat.append(os.fstat(fd.fd))
                    os.close(fd.fd)
                self.requests.append(req)
                reply = self.answer(req)
                if reply is not None:
                    send_nvlist(conn, reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_vm(tmp_path):
    made = []

    def start(answer, name="vm1"):
        v = FakeVm(tmp_path, name, answer)
        made.append(v)
        return v

    yield start
    for v in made:
        v.close()


def test_checkpoint_sends_basename_and_directory_descriptor(fake_vm, tmp_path, capsys,
                                                             monkeypatch):
    vm = fake_vm(lambda req: {"status": "ok"})
    sub = tmp_path / "snaps"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", "--checkpoint=snaps/today"]) == 0
    (req,) = vm.requests
    assert req["cmd"] == "checkpoint" and req["filename"] == "today" and req["suspend"] is False
    (st,) = vm.fddir_stat
    assert stat.S_ISDIR(st.st_mode) and st.st_ino == sub.stat().st_ino
    assert capsys.readouterr() == ("", "")


def test_plain_file_name_is_relative_to_the_callers_directory(fake_vm, tmp_path, monkeypatch):
    vm = fake_vm(lambda req: {})
    monkeypatch.chdir(tmp_path)
    assert ctl.main(["--vm", "vm1", "--rundir", str(tmp_path), "--suspend", "s1"]) == 0
    assert vm.requests[0]["suspend"] is True and vm.requests[0]["filename"] == "s1"
    assert vm.fddir_stat[0].st_ino == tmp_path.stat().st_ino


def test_error_answer_is_printed_and_fails(fake_vm, tmp_path, capsys):
    fake_vm(lambda req: {"error": "Failed to snapshot nvme-pci-0-4-0: not supported"})
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", f"--checkpoint={tmp_path}/x"]) == 1
    assert capsys.readouterr().err == \
        "bhyvepyctl: Failed to snapshot nvme-pci-0-4-0: not supported\n"


def test_no_answer_is_a_failure(fake_vm, tmp_path, capsys):
    fake_vm(lambda req: None)          # bhyve 14 closes without answering
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", f"--checkpoint={tmp_path}/x"]) == 1
    assert "closed the connection without answering" in capsys.readouterr().err


def test_no_vm_listening(tmp_path, capsys):
    assert ctl.main(["--vm=ghost", f"--rundir={tmp_path}", "--force-reset"]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to VM 'ghost' at {tmp_path}/ghost" in err


def test_missing_target_directory(fake_vm, tmp_path, capsys):
    vm = fake_vm(lambda req: {})
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", f"--checkpoint={tmp_path}/no/x"]) == 1
    assert "No such file or directory" in capsys.readouterr().err and vm.requests == []


def test_force_and_status_commands(fake_vm, tmp_path, capsys):
    vm = fake_vm(lambda req: {"status": "ok", "vmname": "vm1", "state": "running", "ncpus": 2})
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", "--status"]) == 0
    assert "vmname: vm1\nstate: running\nncpus: 2\n" == capsys.readouterr().out
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", "--force-poweroff"]) == 0
    assert ctl.main(["--vm=vm1", f"--rundir={tmp_path}", "--force-reset"]) == 0
    assert [r["cmd"] for r in vm.requests] == ["status", "force-poweroff", "force-reset"]


# --------------------------------------------------------------------------
# bhyvepy's control server, with a stand-in machine
# --------------------------------------------------------------------------

class StubMachine:
    def __init__(self, name: str, rundir: Path) -> None:
        self.config = ConfigTree()
        self.config.set_value("name", name)
        self.config.set_value("rundir", str(rundir))
        self.exit_status = None
        self.exits: list[tuple[int, str]] = []
        self.vcpus = [object(), object()]
        self.mem = SimpleNamespace(regions=[SimpleNamespace(size=64 << 20)])

    def request_exit(self, status: int, message: str = "") -> None:
        self.exits.append((status, message))


@pytest.fixture
def server(tmp_path, monkeypatch):
    calls: list[dict] = []
    outcome: dict = {}

    def fake_checkpoint(m, path, *, dir_fd=None, suspend=False, progress=True):
        calls.append({"path": path, "suspend": suspend,
                      "dir": os.fstat(dir_fd).st_ino if dir_fd is not None else None})
        if "error" in outcome:
            raise CheckpointError(outcome["error"])
        return CheckpointResult(path=path, metadata={}, paused_seconds=0.01, total_seconds=0.02,
                                suspended=suspend)

    monkeypatch.setattr(control, "checkpoint", fake_checkpoint)
    rundir = tmp_path / "run"
    m = StubMachine("vm2", rundir)
    srv = control.start_control_server(m)
    yield SimpleNamespace(m=m, srv=srv, calls=calls, outcome=outcome, rundir=rundir)
    srv.close()


def _ask(rundir: Path, nvl: dict) -> dict:
    return ctl.request(str(rundir), "vm2", nvl, timeout=10)


def _exits(m: StubMachine, n: int) -> list:
    """The machine's exits once there are ``n``: the server ends the VM only
    after the answer is on its way, so the client may see it first."""
    deadline = time.monotonic() + 10
    while len(m.exits) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return m.exits


def test_server_creates_rundir_and_a_private_socket(server):
    assert stat.S_IMODE(server.rundir.stat().st_mode) == 0o755
    st = os.stat(server.rundir / "vm2")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_server_checkpoint_through_bhyvepyctl(server, tmp_path):
    assert ctl.main(["--vm=vm2", f"--rundir={server.rundir}", f"--checkpoint={tmp_path}/c"]) == 0
    assert server.calls == [{"path": "c", "suspend": False, "dir": tmp_path.stat().st_ino}]
    assert server.m.exits == []


def test_server_suspend_exits_5_after_answering(server, tmp_path):
    assert ctl.main(["--vm=vm2", f"--rundir={server.rundir}", f"--suspend={tmp_path}/c"]) == 0
    assert server.calls[0]["suspend"] is True
    assert _exits(server.m, 1) == [(5, "suspended")]


def test_server_reports_a_failed_checkpoint_and_keeps_the_vm(server, tmp_path, capsys):
    server.outcome["error"] = "Failed to snapshot struct vlapic: kernel says no"
    assert ctl.main(["--vm=vm2", f"--rundir={server.rundir}", f"--suspend={tmp_path}/c"]) == 1
    assert "kernel says no" in capsys.readouterr().err
    assert server.m.exits == []


@pytest.mark.parametrize("request_, error", [
    ({}, "request without a 'cmd'"),
    ({"cmd": 7}, "'cmd' is not a string"),
    ({"cmd": "launch-missiles"}, "unknown command 'launch-missiles'"),
    ({"cmd": "checkpoint", "suspend": False}, "without a 'filename'"),
    ({"cmd": "checkpoint", "filename": "x"}, "without a 'suspend' bool"),
    ({"cmd": "checkpoint", "filename": "x", "suspend": 1}, "without a 'suspend' bool"),
    ({"cmd": "checkpoint", "filename": "x", "suspend": False}, "without an 'fddir'"),
    ({"cmd": "checkpoint", "filename": "x", "suspend": False, "fddir": 3}, "not a descriptor"),
])
def test_server_answers_bad_requests_with_errors(server, request_, error):
    reply = _ask(server.rundir, request_)
    assert error in reply["error"]
    assert server.calls == [] and server.m.exits == []


def test_server_survives_garbage_and_silent_clients(server, monkeypatch):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(server.rundir / "vm2"))
    s.sendall(b"\x6c\x00\x00" + b"\xff" * 16)      # header announcing a huge nvlist
    s.settimeout(10)
    assert "malformed request" in recv_nvlist(s)["error"]
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(server.rundir / "vm2"))
    s.sendall(b"GET / HTTP/1.0\r\nHost: vm\r\n\r\n")
    assert "bad nvlist magic" in recv_nvlist(s)["error"]
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(server.rundir / "vm2"))
    s.close()                                          # says nothing at all
    assert _ask(server.rundir, {"cmd": "status"})["vmname"] == "vm2"


def test_server_absolute_name_without_fddir(server, tmp_path):
    assert _ask(server.rundir, {"cmd": "checkpoint", "filename": f"{tmp_path}/abs",
                                "suspend": False}) == {"status": "ok", "paused_ms": 10}
    assert server.calls[0]["path"] == f"{tmp_path}/abs" and server.calls[0]["dir"] is None


def test_server_force_commands_end_the_vm_after_answering(server):
    assert _ask(server.rundir, {"cmd": "force-poweroff"}) == {"status": "ok"}
    assert _exits(server.m, 1) == [(1, "forced poweroff")]
    assert _ask(server.rundir, {"cmd": "force-reset"}) == {"status": "ok"}
    assert _exits(server.m, 2) == [(1, "forced poweroff"), (0, "forced reset")]


def test_server_status(server):
    reply = _ask(server.rundir, {"cmd": "status"})
    assert reply == {"status": "ok", "state": "running", "vmname": "vm2", "ncpus": 2,
                     "memsize": 64 << 20}


def test_socket_removed_at_close(tmp_path):
    m = StubMachine("vm3", tmp_path)
    srv = control.start_control_server(m)
    assert (tmp_path / "vm3").exists()
    srv.close()
    assert not (tmp_path / "vm3").exists()
    srv.close()                                        # twice is harmless


def test_stale_socket_is_replaced(tmp_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "vm4"))
    dead.close()                                       # left behind, nobody listens
    srv = control.start_control_server(StubMachine("vm4", tmp_path))
    try:
        assert _ask_name(tmp_path, "vm4")["vmname"] == "vm4"
    finally:
        srv.close()


def _ask_name(rundir: Path, name: str) -> dict:
    return ctl.request(str(rundir), name, {"cmd": "status"}, timeout=10)


def test_live_socket_of_another_vm_is_refused(tmp_path):
    first = control.start_control_server(StubMachine("twin", tmp_path))
    try:
        with pytest.raises(BhyveExit) as ei:
            control.start_control_server(StubMachine("twin", tmp_path))
        assert ei.value.status == 71
        assert "another VM named 'twin' is running" in ei.value.message
        assert _ask_name(tmp_path, "twin")["vmname"] == "twin"   # first one untouched
    finally:
        first.close()


def test_non_socket_in_the_way_is_refused(tmp_path):
    (tmp_path / "vm5").write_text("precious")
    with pytest.raises(BhyveExit, match="exists and is not a socket"):
        control.start_control_server(StubMachine("vm5", tmp_path))
    assert (tmp_path / "vm5").read_text() == "precious"


def test_too_long_socket_path_is_refused(tmp_path):
    with pytest.raises(BhyveExit, match="too long"):
        control.start_control_server(StubMachine("v" * 120, tmp_path))
