"""Ending a distributed run cleanly: destroy the process groups before Python shuts down.

Why (the abort at exit, "terminate called without an active exception", return code -6/134): a gloo process group
runs each collective on a C++ worker thread, which drops its reference to a finished collective's tensors *after* the
caller's ``wait()`` has returned. When such a tensor also belongs to a Python object, that last drop has to take the
GIL. If it comes late (a busy machine is enough) and the main thread has meanwhile reached interpreter finalization,
CPython ends the worker with ``pthread_exit``; the forced unwind meets a ``noexcept`` destructor
(``ProcessGroupGloo::AsyncWork``) and the C++ runtime calls ``std::terminate``. Seen in a core dump of a 2-process
gloo job: thread ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` ->
``gil_scoped_acquire`` -> ``take_gil`` -> ``PyThread_exit_thread`` -> ``std::terminate``, while the main thread was
in ``Py_FinalizeEx``. Lightning destroys process groups at exit for NCCL only, never for gloo.

:func:`destroy_process_groups` destroys them while the interpreter is fully alive: the worker threads finish their
pending drops and are joined. ``loca`` calls it when a command has finished; scripts that drive a Trainer across
processes themselves should call it at their end too (as PyTorch asks of every distributed program).
"""

from __future__ import annotations

import torch


def destroy_process_groups() -> None:
    """Destroy every process group of this process (joining their worker threads); a no-op when there is none.

    Local, not a collective. Call it once the run is over: after it, this process can no longer communicate.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
