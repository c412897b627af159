"""One function call in a fresh Python process, its result or its exception handed back to the caller.

A comparison runs each of its models this way (:func:`recbole_llm.quick_start.compare_models`): a model run leaves
memory behind in the process that ran it that no trim gives back (after an ILM run, 1.9 GiB resident with no
tensor alive), so in one process each model started from the previous ones' leftovers and its measured peak
included them (``make demo``: SASRec peaked at 4.15 GiB after three LLM methods, 2.74 GiB alone). A fresh process
also keeps each run from inheriting global state (seeds, torch's thread settings, modules' caches) from the runs
before it.

The child is started with ``spawn`` (a clean interpreter, never a fork of a process whose threads hold locks); it
gets the caller's ``sys.path`` and environment. A :class:`~recbole_llm.errors.UsageError` raised in it is raised
again here as it was (the command line prints it as one ``error:`` line); any other exception is raised again with
the child's traceback attached as a note, so a bug still surfaces as one; a child that dies without a result (killed
for memory, a crash in native code) raises a RuntimeError naming its exit status or signal; a child whose parent
is killed outright ends too.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import traceback

from recbole_llm.errors import UsageError

STOP_GRACE_SECONDS = 10  # how long a child interrupted with its parent has to stop before it is ended


def _child(connection, function, args, kwargs) -> None:
    threading.Thread(target=_end_with_parent, daemon=True).start()
    try:
        outcome = ("result", function(*args, **kwargs))
    except BaseException as error:  # KeyboardInterrupt too: the parent decides what it means
        outcome = ("error", _portable(error), traceback.format_exc())
    connection.send(outcome)
    connection.close()


def _end_with_parent() -> None:
    """Wait for the parent to end, then end this process: a parent killed outright (SIGTERM, SIGKILL: no cleanup
    of its own runs) leaves no child computing for nobody."""
    multiprocessing.parent_process().join()
    os._exit(1)


def _portable(error: BaseException) -> BaseException:
    """``error`` when it survives pickling (most exceptions do), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__module__}.{type(error).__qualname__}: {error}")
    return error


def call_in_fresh_process(function, *args, **kwargs):
    """``function(*args, **kwargs)`` run in a new Python process; its result (pickled back), or its exception raised
    here. ``function`` and its arguments must be picklable (a module-level function and plain data).

    Ctrl-C reaches the child too (one process group): the child is given :data:`STOP_GRACE_SECONDS` to stop, then
    ended, and ``KeyboardInterrupt`` is raised here."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    # not a daemon: a run may start processes of its own (RecBole's ``worker`` setting: DataLoader workers)
    process = context.Process(target=_child, args=(sender, function, args, kwargs))
    process.start()
    sender.close()
    try:
        try:
            outcome = receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(_death(function, process.exitcode)) from None
        process.join()
    except BaseException:  # Ctrl-C (or the parent stopped otherwise): the child does not outlive the call
        process.join(timeout=STOP_GRACE_SECONDS)
        if process.is_alive():
            process.terminate()
            process.join()
        raise
    finally:
        receiver.close()
    if outcome[0] == "result":
        return outcome[1]
    _, error, child_traceback = outcome
    if not isinstance(error, (UsageError, KeyboardInterrupt)):
        error.add_note(f"raised in the child process that ran {function.__qualname__}:\n{child_traceback}")
    raise error


def _death(function, exitcode: int | None) -> str:
    """Why a child that sent nothing back ended, in words."""
    name = function.__qualname__
    if exitcode is not None and exitcode < 0:
        try:
            signal_name = signal.Signals(-exitcode).name
        except ValueError:  # a signal without a name here (a real-time one)
            signal_name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL: see dmesg)" if -exitcode == signal.SIGKILL else ""
        return f"the child process running {name} was killed by {signal_name}{hint} before it returned"
    return f"the child process running {name} exited with status {exitcode} before it returned"
