"""The VM's control socket: bhyve 14's checkpoint protocol, answered.

bhyve 14+ listens on ``/var/run/bhyve/<vmname>`` (a UNIX stream socket) for
one libnv nvlist per connection: ``cmd = "checkpoint"``, ``filename`` (a
name relative to the directory descriptor ``fddir``, passed with
SCM_RIGHTS), ``suspend`` (bool).  bhyvepy takes the same requests, so the
stock ``bhyvectl --checkpoint/--suspend`` drives it, and answers every
request with an nvlist, as bhyve's 2025 IPC rework does: ``{"error":
"<text>"}`` on failure, ``{"status": "ok"}`` (plus details) on success.
bhyve 14's bhyvectl closes the connection without reading the answer;
``bhyvepyctl`` waits for it.

Extensions (documented in bhyvepyctl(8)):

``cmd = "status"``
    answers ``{"status": "ok", "state": "running", "vmname", "ncpus", "memsize"}``.
``cmd = "force-reset"`` / ``"force-poweroff"``
    end the VM with exit status 0 / 1, as ``bhyvectl --force-reset`` /
    ``--force-poweroff`` do through vmm.ko (KVM has no kernel object
    another process could reach).
``checkpoint`` without ``fddir``
    accepted when ``filename`` is absolute (bhyve 13.2-style requests).

The directory is ``-o rundir=DIR`` (default ``/var/run/bhyve``), created
with mode 0755 if missing.  A stale socket left by a dead VM is replaced; a
socket another live VM answers on is not, and the VM does not start: the
name identifies the VM to bhyvectl, so two VMs must not share it.
Requests are handled one at a time on one thread; a malformed request gets
an error answer and never disturbs the VM.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
from typing import Any, Callable, Mapping

from bhyvepy.errors import BhyveExit, ExitStatus
from bhyvepy.snapshot.checkpoint import CheckpointError, checkpoint
from bhyvepy.snapshot.nvlist import Descriptor, NvlistError, descriptors, recv_nvlist, send_nvlist

__all__ = ["DEFAULT_RUNDIR", "ControlServer", "control_socket_path", "start_control_server",
           "handle_request"]

log = logging.getLogger("bhyvepy.control")

DEFAULT_RUNDIR = "/var/run/bhyve"
#: sizeof(sun_path) - 1 on Linux (FreeBSD's is 103).
_SUN_PATH_MAX = 107
#: A request is a few hundred bytes; anything bigger is not a request.
_MAX_REQUEST = 64 << 10
_MAX_FDS = 4
#: How long a client may take to send its request.
REQUEST_TIMEOUT = 10.0


def control_socket_path(cfg: Any) -> str:
    rundir = cfg.get_value("rundir", None) or DEFAULT_RUNDIR
    return os.path.join(rundir, cfg.get_value("name", "") or "")


def _fail(message: str) -> BhyveExit:
    # bhyve: errx(EX_OSERR, "Failed to start checkpoint thread")
    return BhyveExit(f"Failed to start checkpoint thread: {message}", ExitStatus.EX_OSERR)


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _bind(path: str) -> socket.socket:
    name = os.path.basename(path)
    if not name or "/" in name or name in (".", ".."):
        raise _fail(f"invalid VM name for a control socket: {name!r}")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise _fail(f"socket path {path} is too long")
    rundir = os.path.dirname(path)
    try:
        os.makedirs(rundir, mode=0o755, exist_ok=True)
    except OSError as e:
        raise _fail(f"cannot create {rundir}: {e.strerror or e}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(f"{path}: {e.strerror or e}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise _fail(f"{path} exists and is not a socket")
        if _someone_listens(path):
            raise _fail(f"another VM named {name!r} is running (it answers on {path})")
        try:
            os.unlink(path)        # stale, from a VM that died
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _fail(f"cannot remove stale socket {path}: {e.strerror or e}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(10)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise _fail(f"another VM named {name!r} is running (it answers on {path})") from None
        raise _fail(f"{path}: {e.strerror or e}") from None
    return sock


# --------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------

Reply = dict
After = Callable[[], None] | None


def _error(text: str) -> tuple[Reply, After]:
    return {"error": text}, None


def _checkpoint_request(m: Any, req: Mapping[str, Any]) -> tuple[Reply, After]:
    filename = req.get("filename")
    suspend = req.get("suspend")
    fddir = req.get("fddir")
    if not isinstance(filename, str) or not filename:
        return _error("checkpoint request without a 'filename' string")
    if "\0" in filename:
        return _error("checkpoint 'filename' contains a NUL byte")
    if not isinstance(suspend, bool):
        return _error("checkpoint request without a 'suspend' bool")
    if fddir is None:
        if not os.path.isabs(filename):
            return _error("checkpoint request without an 'fddir' descriptor "
                          "(needed for a relative file name)")
        dir_fd = None
    elif isinstance(fddir, Descriptor):
        dir_fd = fddir.fd
    else:
        return _error("checkpoint 'fddir' is not a descriptor")
    try:
        result = checkpoint(m, filename, dir_fd=dir_fd, suspend=suspend)
    except CheckpointError as e:
        log.warning("checkpoint failed: %s", e)
        return _error(str(e))
    except Exception as e:  # noqa: BLE001 - never let a request take the VM down
        log.debug("checkpoint failed", exc_info=True)
        return _error(f"checkpoint failed: {type(e).__name__}: {e}")
    reply = {"status": "ok", "paused_ms": int(result.paused_seconds * 1000)}
    if suspend:
        return reply, lambda: m.request_exit(ExitStatus.SUSPENDED, "suspended")
    return reply, None


def _status(m: Any) -> Reply:
    return {"status": "ok", "state": "running" if m.exit_status is None else "exiting",
            "vmname": m.config.get_value("name", "") or "", "ncpus": len(m.vcpus),
            "memsize": sum(r.size for r in m.mem.regions)}


def handle_request(m: Any, req: Mapping[str, Any]) -> tuple[Reply, After]:
    """Carry out one request; returns the reply and what to do once it is sent."""
    cmd = req.get("cmd")
    if cmd is None:
        return _error("request without a 'cmd'")
    if not isinstance(cmd, str):
        return _error("'cmd' is not a string")
    if cmd == "checkpoint":
        return _checkpoint_request(m, req)
    if cmd == "status":
        return _status(m), None
    if cmd == "force-reset":
        return {"status": "ok"}, lambda: m.request_exit(ExitStatus.RESET, "forced reset")
    if cmd == "force-poweroff":
        return {"status": "ok"}, lambda: m.request_exit(ExitStatus.POWEROFF, "forced poweroff")
    return _error(f"unknown command '{cmd}'")


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------

class ControlServer:
    """One thread accepting connections serially on the VM's socket."""

    def __init__(self, m: Any, path: str, sock: socket.socket, *, serve: bool = True) -> None:
        self.m = m
        self.path = path
        self._sock = sock
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bhyvepy control", daemon=True)
        if serve:
            self.serve()

    def serve(self) -> None:
        """Start answering.  Until then connections wait in the listen queue:
        the VM binds its socket before its vCPUs start (a name clash stops it
        before the guest runs) and serves once they run (a checkpoint must
        find every vCPU thread to stop)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready or self._stop.is_set():
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            try:
                self._serve(conn)
            except Exception:  # noqa: BLE001 - one bad client never ends the server
                log.debug("control request failed", exc_info=True)
            finally:
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            req = recv_nvlist(conn, max_size=_MAX_REQUEST, max_fds=_MAX_FDS)
        except NvlistError as e:
            self._reply(conn, {"error": f"malformed request: {e}"})
            return
        except OSError:
            return          # client went away or timed out
        try:
            conn.settimeout(None)
            reply, after = handle_request(self.m, req)
        finally:
            for d in descriptors(req):
                try:
                    os.close(d.fd)
                except OSError:
                    pass
        self._reply(conn, reply)
        if after is not None:
            after()

    @staticmethod
    def _reply(conn: socket.socket, reply: Reply) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            send_nvlist(conn, reply)
        except (OSError, NvlistError):
            pass            # bhyve 14's bhyvectl does not wait for answers

    def close(self) -> None:
        """Stop serving (after a request in progress) and remove the socket."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def start_control_server(m: Any, *, serve: bool = True) -> ControlServer:
    """Listen on ``<rundir>/<vmname>``; raises BhyveExit (EX_OSERR) if impossible.
    With ``serve=False`` requests wait until :meth:`ControlServer.serve`."""
    path = control_socket_path(m.config)
    return ControlServer(m, path, _bind(path), serve=serve)
