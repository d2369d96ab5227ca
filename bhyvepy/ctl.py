"""``bhyvepyctl``: bhyvectl(8)'s checkpoint controls for bhyvepy VMs.

Options follow bhyvectl: long options only, ``--opt=value`` or ``--opt
value``, unique prefixes accepted (``getopt_long``), ``--vm=NAME``
mandatory for anything that talks to a VM, usage on stderr with status 1.
vm-bhyve decides whether snapshots are supported by looking for
``--suspend=`` in that usage text.

The parser is the standard library's ``getopt.gnu_getopt`` with an empty
short-option string, which is ``getopt_long(argc, argv, "", ...)``: the
same spellings, prefixes and argument forms.  click (used elsewhere in the
project) cannot stand in: it prints its own usage and error formats, exits
2 on usage errors and has no notion of a mandatory ``--vm`` that is waived
for ``--snapshot-info``; argparse likewise rewrites messages and statuses.

Requests go to the VM's control socket ``<rundir>/<vmname>`` (see
:mod:`bhyvepy.snapshot.control`) as bhyvectl sends them: ``filename`` is the
file's basename and ``fddir`` a descriptor of its directory, so relative
names are relative to the caller's working directory.  Unlike bhyve 14's
bhyvectl, bhyvepyctl waits for the VM's answer and exits non-zero when the
VM reports a failure.  Exit statuses: 0 success, 1 usage or a failed
request, 65 (EX_DATAERR) for a snapshot that ``--snapshot-info`` finds
invalid.
"""

from __future__ import annotations

import getopt
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from bhyvepy.snapshot.control import DEFAULT_RUNDIR
from bhyvepy.snapshot.nvlist import Descriptor, NvlistError, recv_nvlist, send_nvlist

__all__ = ["main", "usage_text", "parse", "CtlOptions", "format_report", "request"]

PROG = "bhyvepyctl"
EX_DATAERR = 65

LONGOPTS = ["vm=", "checkpoint=", "suspend=", "snapshot-info=", "force-reset", "force-poweroff",
            "status", "rundir="]


def usage_text(prog: str = PROG) -> str:
    pad = " " * (len(prog) + 8)
    return (
        f"Usage: {prog} --vm=<vmname>\n"
        f"{pad}[--checkpoint=<filename> | --suspend=<filename>]\n"
        f"{pad}[--force-reset]\n"
        f"{pad}[--force-poweroff]\n"
        f"{pad}[--status]\n"
        f"{pad}[--rundir=<directory>]   (default {DEFAULT_RUNDIR})\n"
        f"       {prog} --snapshot-info=<filename>\n"
    )


class UsageError(Exception):
    """Bad command line: the message (may be empty) then the usage text, status 1."""


@dataclass
class CtlOptions:
    vm: str | None = None
    checkpoint: str | None = None
    suspend: bool = False
    snapshot_info: str | None = None
    force_reset: bool = False
    force_poweroff: bool = False
    status: bool = False
    rundir: str = DEFAULT_RUNDIR

    @property
    def talks_to_vm(self) -> bool:
        return bool(self.checkpoint or self.force_reset or self.force_poweroff or self.status)


def _getopt_message(err: getopt.GetoptError) -> str:
    """BSD getopt_long's wording for what Python's getopt found wrong."""
    opt, msg = err.opt, err.msg
    if "not a unique prefix" in msg:
        return f"ambiguous option -- {opt}"
    if "must not have an argument" in msg:
        return f"option doesn't take an argument -- {opt}"
    if "requires argument" in msg:
        return f"option requires an argument -- {opt}"
    return f"unknown option -- {opt}" if opt else msg


def parse(argv: Sequence[str]) -> CtlOptions:
    """``argv`` without the program name; raises :class:`UsageError`."""
    try:
        opts, _operands = getopt.gnu_getopt(list(argv), "", LONGOPTS)
    except getopt.GetoptError as e:
        raise UsageError(_getopt_message(e)) from None
    o = CtlOptions()
    for name, value in opts:
        key = name[2:]
        if key == "vm":
            o.vm = value
        elif key in ("checkpoint", "suspend"):
            if o.checkpoint is not None:     # one of the two, once (bhyvectl)
                raise UsageError("")
            o.checkpoint, o.suspend = value, key == "suspend"
        elif key == "snapshot-info":
            o.snapshot_info = value
        elif key == "force-reset":
            o.force_reset = True
        elif key == "force-poweroff":
            o.force_poweroff = True
        elif key == "status":
            o.status = True
        elif key == "rundir":
            o.rundir = value
    if o.checkpoint == "":
        raise UsageError("empty snapshot file name")
    if o.vm is None and (o.talks_to_vm or o.snapshot_info is None):
        raise UsageError("")
    return o


# --------------------------------------------------------------------------
# talking to the VM
# --------------------------------------------------------------------------

class RequestError(Exception):
    pass


def request(rundir: str, vm: str, nvl: dict, *, timeout: float | None = None) -> dict:
    """Send one request to VM ``vm`` and return its answer."""
    path = os.path.join(rundir, vm)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise RequestError(f"cannot connect to VM '{vm}' at {path}: "
                               f"{e.strerror or e}") from None
        try:
            send_nvlist(sock, nvl)
        except (OSError, NvlistError) as e:
            raise RequestError(f"sending the request to {path} failed: {e}") from None
        sock.settimeout(timeout)
        try:
            reply = recv_nvlist(sock)
        except NvlistError as e:
            if "connection closed after 0 " in str(e):
                raise RequestError("the VM closed the connection without answering "
                                   "(bhyve(8) does not answer requests; check the VM)") from None
            raise RequestError(f"malformed answer from the VM: {e}") from None
        except OSError as e:
            raise RequestError(f"no answer from the VM: {e.strerror or e}") from None
    finally:
        sock.close()
    for value in reply.values():
        if isinstance(value, Descriptor):
            os.close(value.fd)
    return reply


def _basename(path: str) -> tuple[str, str]:
    """dirname(3)/basename(3): "a/b/" -> ("a", "b"), "f" -> (".", "f")."""
    trimmed = path.rstrip("/") or "/"
    head, tail = os.path.split(trimmed)
    return (head or "."), (tail or trimmed)


def _checkpoint(o: CtlOptions) -> dict:
    assert o.checkpoint is not None and o.vm is not None
    directory, base = _basename(o.checkpoint)
    try:
        fddir = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise RequestError(f"{directory}: {e.strerror or e}") from None
    try:
        return request(o.rundir, o.vm, {"cmd": "checkpoint", "filename": base,
                                        "suspend": o.suspend, "fddir": Descriptor(fddir)})
    finally:
        os.close(fddir)


def _check(reply: dict) -> dict:
    err = reply.get("error")
    if err is not None:
        raise RequestError(str(err))
    return reply


# --------------------------------------------------------------------------
# --snapshot-info
# --------------------------------------------------------------------------

def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n} ({n >> shift} {unit})"
    return str(n)


def format_report(rep: Any) -> str:
    """The text ``--snapshot-info`` prints for a :class:`SnapshotReport`."""
    out = [f"file: {rep.path}"]
    if rep.format is not None:
        out.append(f"format: {rep.format}")
    meta = rep.metadata or {}
    basic = meta.get("basic metadata") if isinstance(meta.get("basic metadata"), dict) else {}
    host = meta.get("host") if isinstance(meta.get("host"), dict) else {}
    if rep.metadata is not None:
        out += [f"vmname: {basic.get('vmname', '?')}",
                f"ncpus: {basic.get('ncpus', '?')}",
                f"memsize: {_size(basic.get('memsize'))}",
                f"memflags: {basic.get('memflags', '?')}",
                f"backend: {meta.get('backend', '?')}",
                f"host: {host.get('hostname', '?')} ({host.get('system', '?')} "
                f"{host.get('release', '?')})",
                f"created: {meta.get('created', '?')}"]
    for kind, title in (("kern_structs", "kernel sections"), ("devices", "device sections")):
        rows = [s for s in rep.sections if s.kind == kind]
        if not rows:
            continue
        out.append(f"{title}:")
        width = max(len(s.name) for s in rows)
        emu_w = max((len(s.emulation or "-") for s in rows), default=1)
        for s in rows:
            emu = f" {(s.emulation or '-'):<{emu_w}}" if kind == "devices" else ""
            out.append(f"  {s.name:<{width}}{emu} version {s.version} size {s.size} "
                       f"checksum {s.status}")
    if rep.memory:
        out.append("memory:")
        for r in rep.memory:
            out.append(f"  gpa {r.gpa:#x} size {_size(r.size)} data {r.data_bytes} "
                       f"checksum {r.status}")
    out.append("status: valid" if rep.valid else f"status: INVALID: {rep.verdict}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def run(o: CtlOptions, stdout: TextIO, stderr: TextIO) -> int:
    status = 0
    if o.snapshot_info is not None:
        from bhyvepy.snapshot.restore import inspect_snapshot

        rep = inspect_snapshot(o.snapshot_info)
        if rep.metadata is None and rep.format is None and rep.verdict and \
                rep.verdict.startswith("cannot open"):
            stderr.write(f"{PROG}: {o.snapshot_info}: {rep.verdict}\n")
            return 1
        stdout.write(format_report(rep))
        if not rep.valid:
            status = EX_DATAERR
    if not o.talks_to_vm:
        return status
    assert o.vm is not None
    try:
        if o.status:
            reply = _check(request(o.rundir, o.vm, {"cmd": "status"}))
            for key in ("vmname", "state", "ncpus", "memsize"):
                if key in reply:
                    stdout.write(f"{key}: {reply[key]}\n")
        if o.force_reset:
            _check(request(o.rundir, o.vm, {"cmd": "force-reset"}))
        if o.force_poweroff:
            _check(request(o.rundir, o.vm, {"cmd": "force-poweroff"}))
        if o.checkpoint is not None:
            _check(_checkpoint(o))
    except RequestError as e:
        stderr.write(f"{PROG}: {e}\n")
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        o = parse(args)
    except UsageError as e:
        if str(e):
            sys.stderr.write(f"{PROG}: {e}\n")
        sys.stderr.write(usage_text())
        return 1
    try:
        return run(o, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
