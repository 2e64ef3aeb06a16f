"""Crash isolation for parsers of untrusted files.

C parsers (scipy's .mat reader, HDF5 via h5py, ONNX's protobuf) can crash the interpreter on a hostile
file (a segfault no Python code can catch), allocate without bound, or spin. `run_isolated(func, path)`
runs `func(path, ...)` in a forked child process with an address-space limit (RLIMIT_AS) and a wall-clock
limit, and returns its (pickled) result, e.g. a `Network`. A crash, a kill, a timeout or memory
exhaustion in the child becomes one `ModelLoadError` naming the file; the caller's process survives.

A loader opts in from the dispatch in `lipsdp.io`:

    return run_isolated(load_mat, path, preload=("scipy.io",))

Mechanism: a plain `os.fork()` (not `multiprocessing`, which refuses to start children from daemonic
processes such as Dask workers) with a pipe; fork costs about 10 ms with torch loaded. The result goes
through the pipe as a pickle (protocol 5) whose large arrays travel out of band: the child writes their
memory as it is and the parent reads each straight into the buffer the unpickled array then uses, so a
network of N bytes costs about N in each process, not 2N in the child and 3N in the parent. The child ignores
SIGINT (the parent owns Ctrl-C and kills the child on any exception), and leaves with `os._exit`.
Forking a process that runs other threads can leave a lock held in the child; the time limit bounds that
case too. Where `os.fork` is unavailable (Windows), or with `LIPSDP_ISOLATE=0`, `func` runs in-process:
no protection from crashes, same results.

Limits: `LIPSDP_LOAD_TIMEOUT` (seconds, default 300) and `LIPSDP_LOAD_MEMORY_GIB` (GiB of address space
the child may add to what the parent already maps, default 8), or the `timeout=` / `memory=` arguments.
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import struct
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lipsdp.errors import LipSDPError, ModelLoadError

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0
DEFAULT_MEMORY = 8 * 2**30

# Exit codes of the child when it could not even report through the pipe.
_EXIT_OK, _EXIT_UNREPORTED = 0, 70


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ModelLoadError(f"{name}={text!r} is not a number") from None
    if not value > 0:
        raise ModelLoadError(f"{name}={text!r} must be positive")
    return value


def isolation_available() -> bool:
    """True where parsers run in a child process (POSIX with os.fork, and LIPSDP_ISOLATE is not 0)."""
    return hasattr(os, "fork") and os.environ.get("LIPSDP_ISOLATE", "1") != "0"


def _mapped_bytes() -> int | None:
    """Virtual memory this process already maps (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _limit_child(memory: int, timeout: float) -> None:
    """In the child: cap the address space at what is mapped now plus `memory`, and the CPU time."""
    import resource

    def lower(kind: int, value: int) -> None:
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        if soft == resource.RLIM_INFINITY or value < soft:
            resource.setrlimit(kind, (value, hard))

    mapped = _mapped_bytes()
    if mapped is not None and hasattr(resource, "RLIMIT_AS"):
        try:
            lower(resource.RLIMIT_AS, mapped + memory)
        except (ValueError, OSError):  # pragma: no cover - platform refuses; the time limit still holds
            pass
    try:  # a backstop should the parent vanish: the kernel stops a spinning orphan
        lower(resource.RLIMIT_CPU, int(timeout) + 5)
    except (ValueError, OSError):  # pragma: no cover
        pass


def _child(write_fd: int, func: Callable[..., Any], path: Path, args: tuple, kwargs: dict,
           memory: int, timeout: float) -> None:
    """Runs in the forked child; never returns."""
    code = _EXIT_OK
    try:
        try:  # SIGINT is also still blocked (inherited mask); the parent owns Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # pragma: no cover - not the main thread
            pass
        try:
            import faulthandler

            faulthandler.disable()  # a crash is reported once, by the parent, not as a C stack dump
        except Exception:  # noqa: BLE001, S110 - best effort
            pass
        _limit_child(memory, timeout)
        try:
            message: tuple = ("ok", func(path, *args, **kwargs))
        except MemoryError:
            message = ("memory", None)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            message = ("raised", exc, traceback.format_exc())
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
            if message[0] == "raised":  # some exceptions pickle but cannot be rebuilt: find out here
                pickle.loads(data, buffers=buffers)  # our own bytes
        except MemoryError:
            data, buffers = pickle.dumps(("memory", None)), []
        except Exception as exc:  # noqa: BLE001 - e.g. an exception that cannot be pickled
            if message[0] == "raised":
                what, detail = f"{type(message[1]).__name__}: {message[1]}", message[2]
            else:
                what, detail = f"its result cannot be pickled ({type(exc).__name__}: {exc})", ""
            data, buffers = pickle.dumps(("unpicklable", what, detail)), []
        views = [memoryview(data)] + [b.raw() for b in buffers]
        header = struct.pack(f"<q{len(views)}q", len(views), *(v.nbytes for v in views))
        for view in [memoryview(header), *views]:
            while view:
                view = view[os.write(write_fd, view):]
    except BaseException:  # noqa: BLE001 - the parent reports a child that says nothing
        code = _EXIT_UNREPORTED
    finally:
        os._exit(code)


def _hold_sigint() -> Any:
    """Block SIGINT in this thread (it stays pending); the previous mask, or None where unsupported."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _release(mask: Any) -> None:
    """Restore the mask `_hold_sigint` returned (a pending SIGINT is then delivered)."""
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _describe_signal(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"{name} (signal {number})"


def run_isolated(
    func: Callable[..., T],
    path: str | Path,
    *args: Any,
    timeout: float | None = None,
    memory: int | None = None,
    preload: tuple[str, ...] = (),
    **kwargs: Any,
) -> T:
    """`func(path, *args, **kwargs)` in a forked child with memory and time limits; its result.

    Exceptions raised by `func` come back unchanged (a LipSDPError stays one). A crash (signal), a
    timeout (`timeout` seconds, wall clock) or memory exhaustion (`memory` bytes of address space beyond
    the parent's) raise `ModelLoadError` naming `path`. In-process where fork is unavailable.
    `preload` names modules to import in the parent first (once), so that no child pays for the import."""
    path = Path(path)
    if not isolation_available():
        return func(path, *args, **kwargs)
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # the child meets the same error and reports it
            pass
    timeout = _env_float("LIPSDP_LOAD_TIMEOUT", DEFAULT_TIMEOUT) if timeout is None else float(timeout)
    if memory is None:
        memory = int(_env_float("LIPSDP_LOAD_MEMORY_GIB", DEFAULT_MEMORY / 2**30) * 2**30)
    read_fd, write_fd = os.pipe()
    # Ctrl-C is held back from fork until the parent is inside the try below, whose `finally` stops the
    # child: otherwise a KeyboardInterrupt right after fork would leave the child running.
    mask = _hold_sigint()
    pid = -1
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns about fork in a threaded process (docstring)
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            pid = os.fork()
    except BaseException as exc:
        # The mask holds SIGINT in this thread only: a Ctrl-C delivered to another thread (e.g. a progress
        # bar's) still raises KeyboardInterrupt here, possibly after the fork; the child must not outlive it.
        if pid == 0:  # pragma: no cover - the child
            os._exit(1)
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(write_fd)
        _release(mask)
        if isinstance(exc, OSError):
            raise ModelLoadError(f"{path}: cannot start the process that reads the file ({exc})") from None
        raise
    if pid == 0:  # pragma: no cover - the child; coverage cannot see it
        os.close(read_fd)
        _child(write_fd, func, path, args, kwargs, memory, timeout)
    reaped = False
    parts: list[bytearray] | None = None
    try:
        os.close(write_fd)
        _release(mask)  # a Ctrl-C that came meanwhile is raised here, inside the try
        deadline = time.monotonic() + timeout

        def stop() -> None:
            nonlocal reaped
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            reaped = True
            raise ModelLoadError(
                f"{path}: reading the file did not finish within {timeout:g} s and was stopped; the file "
                "is corrupt or hostile, or very large (then raise LIPSDP_LOAD_TIMEOUT, in seconds)"
            )

        parts = _receive(read_fd, deadline, stop)
        _, status = os.waitpid(pid, 0)
        reaped = True
    finally:
        _release(mask)
        os.close(read_fd)
        if not reaped:  # an exception (e.g. KeyboardInterrupt) in the parent: stop the child
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return _outcome(path, parts, status, memory)


def _read_into(fd: int, buf: bytearray, deadline: float, stop: Callable[[], None]) -> bool:
    """Fill `buf` from the pipe (False at an early end of the stream); `stop()` past the deadline."""
    view, done = memoryview(buf), 0
    while done < len(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            stop()
        got = os.readv(fd, [view[done:]])
        if got == 0:
            return False
        done += got
    return True


def _receive(fd: int, deadline: float, stop: Callable[[], None]) -> list[bytearray] | None:
    """The child's message: [pickle, out-of-band buffer, ...] read whole (see `_child`), or None when the
    stream ends early or its header is implausible."""
    count = bytearray(8)
    if not _read_into(fd, count, deadline, stop):
        return None
    (n,) = struct.unpack("<q", count)
    if not 1 <= n <= 1 << 20:
        return None
    sizes = bytearray(8 * n)
    if not _read_into(fd, sizes, deadline, stop):
        return None
    lengths = struct.unpack(f"<{n}q", sizes)
    if any(k < 0 for k in lengths):
        return None
    parts = []
    for k in lengths:
        buf = bytearray(k)
        if not _read_into(fd, buf, deadline, stop):
            return None
        parts.append(buf)
    return parts


def _outcome(path: Path, parts: list[bytearray] | None, status: int, memory: int) -> Any:
    """Turn what the child sent (and how it ended) into the result, or the right exception."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGKILL:
            how = "was killed (SIGKILL, e.g. by the system's out-of-memory killer)"
        elif number == getattr(signal, "SIGXCPU", None):
            how = "used up its CPU time limit"
        else:
            how = f"crashed with {_describe_signal(number)}"
        raise ModelLoadError(
            f"{path}: the parser reading this file {how} (in a separate process, so nothing else is lost); "
            "the file is corrupt or hostile: check it, or export the model again"
        )
    try:
        message = pickle.loads(parts[0], buffers=parts[1:]) if parts else None  # from our own forked child
    except Exception:  # noqa: BLE001 - a truncated message
        message = None
    if message is None:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        raise ModelLoadError(
            f"{path}: the process reading this file ended without a result (exit code {code}); the file is "
            "corrupt or hostile: check it, or export the model again"
        )
    kind = message[0]
    if kind == "ok":
        return message[1]
    if kind == "memory":
        raise ModelLoadError(
            f"{path}: reading the file needed more than the {memory / 2**30:.3g} GiB memory limit; the file "
            "is corrupt or hostile, or very large (then raise LIPSDP_LOAD_MEMORY_GIB)"
        )
    if kind == "raised":
        exc = message[1]
        if not isinstance(exc, LipSDPError) and hasattr(exc, "add_note"):
            exc.add_note(f"raised while reading {path} in a child process:\n{message[2]}")
        raise exc
    error = ModelLoadError(f"{path}: the loader failed in its child process: {message[1]}")
    if message[2]:
        error.add_note(message[2])
    raise error
