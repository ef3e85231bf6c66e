"""Run tool functions with a wall-clock limit, an output cap and no network.

``Sandbox.run(fn, arguments, timeout_s=..., max_output_chars=...)`` returns a
``ToolOutcome``; it never raises for what the tool does. Outcomes:

* ``ok``: the tool's output as text: a str return value as is, None → what the tool
  printed (a tool that returns a value has its prints discarded), anything else as JSON
  (``str()`` when it is not JSON-serialisable). Output
  longer than ``max_output_chars`` keeps its first ``max_output_chars`` characters plus
  ``"…[truncated N chars]"``.
* ``timeout``: the call ran past ``timeout_s`` (wall clock).
* ``error``: the tool raised (type name and message are kept).
* ``crash``: the worker process died during the call (e.g. ``os._exit``, a segfault,
  the out-of-memory killer).

``outcome_text`` turns an outcome into the observation the model reads (formats in
``jaxrl_llm.envs.tool_env``).

Isolation modes:

* ``"process"`` (default): one persistent worker process (a fresh interpreter started
  with ``python -I`` on this file; it never imports JAX unless a tool's module does),
  reused across calls so a call costs a pipe round trip (~0.1 ms), not a process start.
  On a timeout the worker (and its process group: a tool's own subprocesses) is killed
  and the next call starts a new one. The time limit covers the call only: starting the
  worker and importing a tool's module (once per worker) have their own limit
  (``start_timeout_s``). The worker runs with ``WORKER_ENV`` (no GPU / TPU: JAX on
  CPU) over the parent's environment variables. In the worker, ``socket.socket``, ``socket.create_connection``,
  ``getaddrinfo`` and friends raise ``PermissionError("network access is disabled in the
  tool sandbox")``. This is a best-effort guard against accidents (a tool that reaches
  for the network), NOT a security sandbox: code that imports ``_socket`` directly,
  spawns a subprocess or uses ctypes gets through, and the worker has the parent's file
  system and user. Run untrusted code in a container / VM.

  Tools are sent to the worker by pickling, so they must be importable by reference
  from the parent's ``sys.path``: module-level functions (not lambdas, nested functions
  or functions of ``__main__``), partials of them, or instances of module-level classes
  (copied into the worker once; later changes to the parent's copy are not seen).
  ``Sandbox.check`` (called by ``ToolEnvironment`` at construction) raises
  ``ToolPickleError`` otherwise; a module that fails to import in the worker raises
  ``ToolLoadError`` at the first call. Both are configuration errors, not tool outcomes.

* ``"none"``: the call runs in this process, for trusted tools in tests and
  experiments: no network guard, and a tool can corrupt the process. The time limit is
  enforced with ``SIGALRM`` when the call is made from the main thread of a POSIX
  process and no other interval timer is running; otherwise it is NOT enforced. Printed
  output is captured by swapping ``sys.stdout`` (process-wide while the call runs).

One worker serves every caller of a Sandbox (calls are serialised by a lock);
``shared_sandbox(isolation)`` is the process-wide instance that ``ToolEnvironment`` uses
by default, so the per-episode environments of a rollout share one worker.

This file is also the worker's program: it imports only the standard library at the top.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

ISOLATIONS = ("process", "none")
NETWORK_DISABLED = "network access is disabled in the tool sandbox"
# The worker sees no accelerator: a tool module that imports JAX (or torch) must not take
# the trainer's GPU / TPU (a TPU admits one process; JAX preallocates GPU memory).
WORKER_ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}


class ToolPickleError(TypeError):
    """A tool cannot be sent to the worker process (not importable by reference)."""


class ToolLoadError(RuntimeError):
    """The worker process could not load a tool (e.g. its module fails to import there)."""


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What one tool call came to.

    Attributes:
      status: "ok", "timeout", "error" (the tool raised) or "crash" (the worker died).
      output: the tool's output text, truncated to the cap ("ok" only).
      error_type: the exception's type name ("error"), e.g. "ValueError".
      error_message: the exception's message ("error") or what ended the worker ("crash").
      elapsed_s: wall-clock seconds of the call.
      limit_s: the time limit the call ran under (None: not enforced).
      truncated_chars: characters of output dropped by the cap.
    """

    status: str
    output: str = ""
    error_type: str = ""
    error_message: str = ""
    elapsed_s: float = 0.0
    limit_s: float | None = None
    truncated_chars: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def outcome_text(name: str, outcome: ToolOutcome, max_chars: int | None = None) -> str:
    """The observation text of an outcome.

    * ok:      the output
    * timeout: ``Error: tool 'x' timed out after 1.0 s``
    * error:   ``Error: tool 'x' raised ValueError: <message>`` (``raised ValueError`` without a message)
    * crash:   ``Error: tool 'x' crashed: <what happened>``

    Args:
      max_chars: caps the error message (the output of "ok" is already capped).
    """
    if outcome.status == "ok":
        return outcome.output
    if outcome.status == "timeout":
        return f"Error: tool {name!r} timed out after {float(outcome.limit_s or 0.0)!r} s"
    if outcome.status == "crash":
        return f"Error: tool {name!r} crashed: {outcome.error_message}"
    message = outcome.error_message if max_chars is None else truncate(outcome.error_message, max_chars)[0]
    return f"Error: tool {name!r} raised {outcome.error_type}" + (f": {message}" if message else "")


def truncate(text: str, max_chars: int) -> tuple[str, int]:
    """(text cut to ``max_chars`` characters plus "…[truncated N chars]", N) — N = 0 when it fits."""
    dropped = len(text) - max_chars
    if dropped <= 0:
        return text, 0
    return f"{text[:max_chars]}…[truncated {dropped} chars]", dropped


# ---------------------------------------------------------------------------- running a call


class _CappedText(io.TextIOBase):
    """A text sink keeping the first ``cap`` characters written and counting the rest
    (a tool that prints in a loop cannot fill the memory)."""

    def __init__(self, cap: int):
        self.cap, self.parts, self.kept, self.dropped = cap, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = self.cap - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self) -> str:
        return "".join(self.parts)


def format_output(value: Any, printed: str) -> str:
    """A tool's result as text: str as is, None → what it printed, else JSON (``str()`` fallback)."""
    if value is None:
        return printed
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def run_captured(fn: Callable, arguments: Mapping[str, Any], max_chars: int,
                 catch: tuple[type[BaseException], ...] = (Exception,)) -> tuple:
    """Call ``fn(**arguments)`` with stdout / stderr captured (capped).

    Returns:
      ("ok", output text truncated to ``max_chars``, dropped chars) or ("error", type name, message).
    """
    out, err = _CappedText(max_chars), _CappedText(max_chars)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        value = fn(**arguments)
        text = format_output(value, out.text())
    except catch as e:
        return "error", type(e).__name__, str(e)
    finally:
        sys.stdout, sys.stderr = saved
    if value is None and out.dropped:  # the printed text was already cut at the cap while captured
        return "ok", f"{text}…[truncated {out.dropped} chars]", out.dropped
    text, dropped = truncate(text, max_chars)
    return "ok", text, dropped


class _TimeLimit(BaseException):
    """Raised by SIGALRM in an in-process call (a BaseException: `except Exception` in a
    tool does not swallow it)."""


def _can_use_alarm() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _run_in_process(fn: Callable, arguments: Mapping[str, Any], timeout_s: float, max_chars: int) -> ToolOutcome:
    enforce = timeout_s is not None and timeout_s > 0 and _can_use_alarm()
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, on_alarm) if enforce else None
    try:
        if enforce:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            reply = run_captured(fn, arguments, max_chars, catch=(Exception, SystemExit))
        finally:
            if enforce:
                signal.setitimer(signal.ITIMER_REAL, 0.0)
    except _TimeLimit:
        return ToolOutcome("timeout", elapsed_s=time.monotonic() - start, limit_s=timeout_s)
    finally:
        if enforce:
            signal.signal(signal.SIGALRM, previous)
    return _outcome(reply, time.monotonic() - start, timeout_s if enforce else None)


def _outcome(reply: tuple, elapsed: float, limit: float | None) -> ToolOutcome:
    if reply[0] == "ok":
        return ToolOutcome("ok", output=reply[1], truncated_chars=reply[2], elapsed_s=elapsed, limit_s=limit)
    return ToolOutcome("error", error_type=reply[1], error_message=reply[2], elapsed_s=elapsed, limit_s=limit)


# ---------------------------------------------------------------------------- the worker process


def _refuse_network(*args, **kwargs):
    raise PermissionError(NETWORK_DISABLED)


def block_network() -> None:
    """Make this process's socket constructors and name lookups raise PermissionError
    (best effort: see the module docstring)."""
    import _socket
    import socket

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _refuse_network()

    socket.socket = socket.SocketType = _NoSocket
    _socket.socket = _socket.SocketType = _NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(socket, name):
            setattr(socket, name, _refuse_network)
        if hasattr(_socket, name):
            setattr(_socket, name, _refuse_network)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (even while a tool loops forever)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main() -> None:
    """The worker's loop: messages from the parent on stdin, replies on stdout.

    Messages: ("load", key, pickled callable, {module name: file}) → ("loaded",) |
    ("load_error", type, message);
    ("call", key, arguments, max_chars) → ("ok", text, dropped) | ("error", type, message).
    """
    # The protocol keeps the original stdin / stdout descriptors; fds 0 and 1 become
    # /dev/null so a tool's own reads and prints cannot corrupt it.
    rx, tx = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    init = rx.recv()
    sys.path[:] = init["sys_path"]
    threading.Thread(target=_watch_parent, args=(init["parent_pid"],), daemon=True).start()
    block_network()
    tx.send(("ready", os.getpid()))
    functions: dict[str, Callable] = {}
    while True:
        try:
            message = rx.recv()
        except (EOFError, OSError):
            return
        if message[0] == "load":
            _, key, blob, module_files = message
            try:
                for module_name, path in module_files.items():
                    _import_file(module_name, path)
                functions[key] = pickle.loads(blob)
                reply = ("loaded",)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                reply = ("load_error", type(e).__name__, str(e))
        else:
            _, key, arguments, max_chars = message
            reply = run_captured(functions[key], arguments, max_chars, catch=(BaseException,))
        tx.send(reply)


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    rx: Connection
    tx: Connection
    loaded: set = dataclasses.field(default_factory=set)


def _kill_box(box: list) -> None:
    _kill(box[0])


def _kill(worker: _Worker | None) -> None:
    """Kill the worker's process group and release its pipes."""
    if worker is None:
        return
    for conn in (worker.tx, worker.rx):
        try:
            conn.close()
        except OSError:
            pass
    if worker.proc.poll() is None:
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            worker.proc.kill()
    try:
        worker.proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass


class Sandbox:
    """Runs tool calls under a time limit and an output cap (see the module docstring).

    Args:
      isolation: "process" (a persistent worker process) or "none" (in this process).
      start_timeout_s: limit on starting the worker and on loading one tool in it.
      worker_env: environment variables of the worker, over this process's and ``WORKER_ENV``.
    """

    def __init__(self, isolation: str = "process", *, start_timeout_s: float = 60.0,
                 worker_env: Mapping[str, str] | None = None):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.isolation = isolation
        self.start_timeout_s = float(start_timeout_s)
        self.worker_env = dict(worker_env or {})
        self.starts = 0  # workers started so far (1 + restarts after timeouts and crashes)
        self._lock = threading.Lock()
        self._box: list[_Worker | None] = [None]  # the live worker, shared with the finalizer
        self._payloads: dict[int, tuple[Any, str, bytes]] = {}  # id(fn) → (fn kept alive, key, pickle)
        weakref.finalize(self, _kill_box, self._box)

    @property
    def _worker(self) -> _Worker | None:
        return self._box[0]

    @_worker.setter
    def _worker(self, worker: _Worker | None) -> None:
        self._box[0] = worker

    # -- sending tools

    def check(self, fn: Callable, name: str | None = None) -> None:
        """Raise ToolPickleError now if ``fn`` cannot be sent to the worker (no-op for "none")."""
        if self.isolation == "process":
            self._payload(fn, name)

    def _payload(self, fn: Callable, name: str | None) -> tuple[str, bytes]:
        """(key, pickle) of what brings ``fn`` into the worker, cached per object sent."""
        for obj in _candidates(fn):
            cached = self._payloads.get(id(obj))
            if cached is not None and cached[0] is obj:
                return cached[1], cached[2]
        obj, blob = _pickle_tool(fn, name or getattr(fn, "name", None) or getattr(fn, "__name__", repr(fn)))
        key = hashlib.sha1(blob).hexdigest()
        if len(self._payloads) >= 1024:  # Tools pickled by value may be rebuilt per episode: stay bounded
            self._payloads.clear()
        self._payloads[id(obj)] = (obj, key, blob)
        return key, blob

    # -- the worker

    def _start(self) -> _Worker:
        script = os.path.abspath(__file__)
        env = {**os.environ, **WORKER_ENV, **self.worker_env}
        try:
            proc = subprocess.Popen([sys.executable, "-I", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=env, start_new_session=True)  # own group: a timeout kills the tool's children
        except OSError as e:
            raise ToolLoadError(f"cannot start the tool worker ({sys.executable} {script}): {e}") from None
        rx, tx = Connection(os.dup(proc.stdout.fileno()), writable=False), Connection(os.dup(proc.stdin.fileno()),
                                                                                     readable=False)
        proc.stdout.close()
        proc.stdin.close()
        worker = _Worker(proc, rx, tx)
        try:
            tx.send({"sys_path": list(sys.path), "parent_pid": os.getpid()})
            if not rx.poll(self.start_timeout_s):
                raise ToolLoadError(f"the tool worker did not start within {self.start_timeout_s} s")
            rx.recv()
        except (EOFError, OSError) as e:
            _kill(worker)
            raise ToolLoadError(f"the tool worker failed to start (exit code {proc.poll()}): {e}") from None
        except BaseException:
            _kill(worker)
            raise
        return worker

    def _ensure_worker(self) -> _Worker:
        if self._worker is not None and self._worker.proc.poll() is not None:
            self._discard_worker()
        if self._worker is None:
            self._worker = self._start()
            self.starts += 1
        return self._worker

    def _discard_worker(self) -> None:
        _kill(self._worker)
        self._worker = None

    def _load(self, worker: _Worker, key: str, blob: bytes, name: str, fn: Callable) -> None:
        if key in worker.loaded:
            return
        try:
            worker.tx.send(("load", key, blob, _file_modules(fn)))
            if not worker.rx.poll(self.start_timeout_s):
                self._discard_worker()
                raise ToolLoadError(f"tool {name!r}: loading it in the worker took more than {self.start_timeout_s} s")
            reply = worker.rx.recv()
        except (EOFError, OSError):
            code = worker.proc.poll()
            self._discard_worker()
            raise ToolLoadError(f"tool {name!r}: the worker died while loading it (exit code {code})") from None
        if reply[0] != "loaded":
            raise ToolLoadError(f"tool {name!r}: the worker could not load it: {reply[1]}: {reply[2]}. Tools must be "
                                "importable by reference from the parent's sys.path (see jaxrl_llm.envs.sandbox)")
        worker.loaded.add(key)

    # -- calls

    def run(self, fn: Callable, arguments: Mapping[str, Any], *, name: str | None = None, timeout_s: float = 5.0,
            max_output_chars: int = 4096) -> ToolOutcome:
        """Call ``fn(**arguments)`` under the limits; every tool behaviour is an outcome.

        Args:
          fn: a Tool or callable (picklable by reference for "process").
          arguments: keyword arguments (JSON values).
          name: the tool's name in error messages (default: ``fn.name`` / ``__name__``).
          timeout_s: wall-clock limit of the call, seconds (> 0).
          max_output_chars: cap on the output text (>= 1).

        Raises:
          ToolPickleError, ToolLoadError: the tool cannot be sent to / loaded in the worker.
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not (isinstance(max_output_chars, int) and max_output_chars >= 1):
            raise ValueError(f"max_output_chars must be an int >= 1, got {max_output_chars!r}")
        complete = getattr(fn, "complete_arguments", None)  # a Tool fills omitted Optional arguments
        arguments = complete(arguments) if callable(complete) else dict(arguments)
        with self._lock:
            if self.isolation == "none":
                return _run_in_process(fn, arguments, timeout_s, max_output_chars)
            name = name or getattr(fn, "name", None) or getattr(fn, "__name__", repr(fn))
            key, blob = self._payload(fn, name)
            worker = self._ensure_worker()
            self._load(worker, key, blob, name, fn)
            start = time.monotonic()
            try:
                worker.tx.send(("call", key, arguments, max_output_chars))
                ready = worker.rx.poll(timeout_s)
                reply = worker.rx.recv() if ready else None
            except (EOFError, OSError):
                elapsed = time.monotonic() - start
                try:
                    code = worker.proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    code = None
                self._discard_worker()
                return ToolOutcome("crash", error_message=f"the worker process exited with code {code}",
                                   elapsed_s=elapsed, limit_s=timeout_s)
            elapsed = time.monotonic() - start
            if reply is None:
                self._discard_worker()  # the call may run forever: kill it, restart on the next call
                return ToolOutcome("timeout", elapsed_s=elapsed, limit_s=timeout_s)
            return _outcome(reply, elapsed, timeout_s)

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                try:
                    worker.tx.close()  # the worker exits on end of input
                    worker.proc.wait(timeout=1.0)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                _kill(worker)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self._worker.proc.pid if self._worker is not None else None
        return f"Sandbox(isolation={self.isolation!r}, worker_pid={pid})"


def _candidates(fn: Callable) -> list:
    """What may bring ``fn`` into the worker, preferred first: a Tool's function (pickled by
    reference, the worker imports only its module), then the object itself."""
    function = getattr(fn, "function", None)
    return [function, fn] if callable(function) else [fn]


def _file_modules(fn: Callable) -> dict[str, str]:
    """{module name: file} of the modules ``fn`` lives in that were loaded from a file
    path rather than imported by name (an ``--env my_env.py:make_env`` file), so the
    worker can load them the same way before unpickling."""
    out = {}
    for obj in _candidates(fn):
        target = obj.func if isinstance(obj, functools.partial) else obj
        name = getattr(target, "__module__", None) or type(target).__module__
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if module is None or not path or name == "__main__":
            continue
        # a dotted name came through a package; a top-level one must be found on sys.path
        # (PathFinder, unlike importlib.util.find_spec, does not answer from sys.modules)
        if "." not in name and importlib.machinery.PathFinder.find_spec(name, sys.path) is None:
            out[name] = path
    return out


def _import_file(name: str, path: str) -> None:
    """Loads the file ``path`` as module ``name`` (once) in this process."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _pickle_tool(fn: Callable, name: str) -> tuple[Any, bytes]:
    """(the object sent, its pickle) for ``fn``; ToolPickleError when nothing pickles."""
    errors = []
    for obj in _candidates(fn):
        target = obj.func if isinstance(obj, functools.partial) else obj
        if getattr(target, "__module__", None) == "__main__":
            errors.append(f"{target!r} is defined in __main__, which the worker does not import")
            continue
        try:
            return obj, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # PicklingError, AttributeError (local objects), TypeError
            errors.append(f"{type(e).__name__}: {e}")
    raise ToolPickleError(
        f"tool {name!r} cannot be sent to the sandbox worker ({'; '.join(errors)}). With isolation='process' a tool "
        "must be importable by reference: a module-level function (not a lambda, a nested function or a function "
        "of __main__), a functools.partial of one, or an instance of a module-level class; or use isolation='none'")


_SHARED: dict[str, Sandbox] = {}
_SHARED_LOCK = threading.Lock()


def shared_sandbox(isolation: str = "process") -> Sandbox:
    """The process-wide Sandbox of an isolation mode (its worker starts at the first call
    and is stopped at exit)."""
    with _SHARED_LOCK:
        if isolation not in _SHARED:
            _SHARED[isolation] = Sandbox(isolation)
        return _SHARED[isolation]


@atexit.register
def _close_shared() -> None:
    for box in list(_SHARED.values()):
        box.close()


if __name__ == "__main__":
    _worker_main()
