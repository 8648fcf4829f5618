"""The parent's side of a zygote (`_zygote.py`): start it, send it jobs, collect their output (stdlib only).

Each job's program goes into a memfd passed with the write ends of the job's stdout, stderr and value channel;
the zygote forwards it to the job's child unread. The three pipes are read here, capped, until the zygote's
`done` (preceded by a `files` frame from its file reader when the job returns files).
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.util
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time

_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def _libraries() -> dict[str, str]:
    """libc and libseccomp as `ctypes.util.find_library` names them (it runs `ldconfig -p`: once per process)."""
    return {name: path for name in ("c", "seccomp") if (path := ctypes.util.find_library(name))}


def _bootstrap(level: str, sock_fd: int, probe_limits: dict) -> bytes:
    spec = importlib.util.find_spec("pyseccomp")
    config = {
        "level": level,
        "sock_fd": sock_fd,
        "dir": _DIR,
        "pyseccomp": spec.origin if spec else None,
        "libraries": _libraries(),
        "probe_limits": probe_limits,
        "absent": sorted({os.getcwd(), sys.prefix, os.path.dirname(_DIR), os.path.expanduser("~")}),
    }
    return (
        f"import json, sys\nsys.path.insert(0, {_DIR!r})\nimport _zygote\nsys.path.pop(0)\n"
        f"_zygote.CONFIG.update(json.loads({json.dumps(config)!r}))\n_zygote.main()\n"
    ).encode()


class Zygote:
    """A warm fork server (see `_zygote.py`); serves one job at a time. `hello`: what it verified and what is
    missing (then it has stopped serving: the caller raises)."""

    def __init__(self, level: str, probe_limits: dict) -> None:
        ours, theirs = socket.socketpair()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        python = getattr(sys, "_base_executable", None) or sys.executable
        self.level = level
        self.proc = subprocess.Popen(  # the program text comes on stdin: the command line shows no path of ours
            [python, "-I", "-S", "-"],
            stdin=subprocess.PIPE,
            stdout=theirs.fileno(),
            env=env,
            start_new_session=True,
            cwd="/",
        )
        theirs.close()
        self.sock = ours
        try:
            self.proc.stdin.write(_bootstrap(level, 1, probe_limits))
            self.proc.stdin.close()
            self.sock.settimeout(120)
            hello = self._recv()
        except (OSError, EOFError, ValueError) as e:
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {e!r}") from None
        self.sock.settimeout(None)
        if "error" in hello:
            self.close()
            raise RuntimeError(f"sandbox zygote failed to start: {hello['error']}")
        self.protections = tuple(hello["protections"])
        self.hello = hello
        if hello.get("missing"):
            self.close()

    def _recv(self) -> dict:
        hdr = self._recv_exact(4)
        return json.loads(self._recv_exact(struct.unpack("!I", hdr)[0]))

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("sandbox zygote closed its socket")
            buf += chunk
        return buf

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.sock.close()  # the zygote sees EOF, kills what is left of a job and exits; its init dies with it
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def run(self, program: bytes, files: list[str], limits: dict, caps: tuple[int, ...], deadline: float):
        """(stdout, stderr, channel bytes), the zygote's `done`. The zygote gets the limits and file names; the
        program (JSON: code, calls, script) travels in a memfd that only the job's child reads, so no job's program
        ever enters the memory later jobs are forked from."""
        header = json.dumps({"files": files, "limits": limits}).encode()
        payload = os.memfd_create("job", os.MFD_CLOEXEC)
        pipes = []
        try:
            view = memoryview(program)
            while view:
                view = view[os.write(payload, view) :]
            pipes = [os.pipe() for _ in range(3)]
            socket.send_fds(self.sock, [struct.pack("!I", len(header))], [w for _, w in pipes] + [payload])
        except OSError:
            for r, _ in pipes:
                os.close(r)
            raise
        finally:
            os.close(payload)
            for _, w in pipes:
                os.close(w)
        self.sock.sendall(header)
        return self._collect([r for r, _ in pipes], caps, deadline)

    def _collect(self, fds: list[int], caps: tuple[int, ...], deadline: float) -> tuple[list[bytes], dict]:
        """Read the three pipes (capped) until the zygote reports the job done; then drain what is left."""
        bufs = [bytearray() for _ in fds]
        sel = selectors.DefaultSelector()
        for i, fd in enumerate(fds):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, i)
        sel.register(self.sock, selectors.EVENT_READ, -1)
        done: dict | None = None
        files: dict = {}
        try:
            while done is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    return [bytes(b) for b in bufs], {"zygote_failed": True, "error": "sandbox zygote did not answer"}
                for key, _ in sel.select(left):
                    if key.data == -1:
                        done = self._recv()
                        if done.get("k") == "files":  # sent by the zygote's file reader, before `done`
                            files, done = done, None
                    elif not self._read_into(key.fd, bufs[key.data], caps[key.data]):
                        sel.unregister(key.fd)
            for i, fd in enumerate(fds):  # everything of the job is dead now: drain without blocking
                while self._read_into(fd, bufs[i], caps[i]):
                    pass
        except (EOFError, OSError, ValueError) as e:
            self.close()
            return [bytes(b) for b in bufs], {"zygote_failed": True, "error": f"sandbox zygote failed: {e!r}"}
        finally:
            sel.close()
            for fd in fds:
                os.close(fd)
        if files:
            done = dict(done, files=files.get("files") or {})
            if files.get("error") and not done.get("error"):
                done["error"] = files["error"]
        return [bytes(b) for b in bufs], done

    @staticmethod
    def _read_into(fd: int, buf: bytearray, cap: int) -> bool:
        """One read; keeps at most `cap` bytes. False at EOF or when nothing is available."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            return False
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]
        return True
