"""Start device children through multiprocessing's forkserver, without re-running __main__.

The stdlib's forkserver Popen sends each child "preparation data" naming the parent's
__main__ module, and the child imports it again (as __mp_main__) before running its
target: for `devmgr start` that is the console script, for an application embedding a
Manager it is the application's own main module, with its side effects and import cost.
A device child needs neither: its target lives in the preloaded devmgr._child. So this
Popen sends the preparation data without the main-module keys; the rest of `_launch` is
the stdlib's own (CPython 3.11-3.13, Lib/multiprocessing/popen_forkserver.py).
"""

from __future__ import annotations

import io
import os
from multiprocessing import context, forkserver, popen_forkserver, reduction, spawn, util
from typing import Any

_MAIN_KEYS = frozenset({"init_main_from_name", "init_main_from_path", "main_path"})


class _Popen(popen_forkserver.Popen):
    def _launch(self, process_obj: Any) -> None:
        prep_data = {
            k: v
            for k, v in spawn.get_preparation_data(process_obj._name).items()
            if k not in _MAIN_KEYS
        }
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]  # stdlib private, untyped
        # the stdlib keeps a duplicate of the write end as the parent's sentinel
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(
            self,
            util.close_fds,  # type: ignore[attr-defined]  # stdlib private, untyped
            (parent_w, self.sentinel),
        )
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class DeviceProcess(context.ForkServerProcess):
    """A forkserver child that does not import the parent's __main__."""

    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)
