"""Progress bars: tqdm on a terminal; in a log (stderr not a TTY), one plain line every LOG_EVERY_S seconds."""
from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm as _tqdm
from tqdm.std import tqdm as _std_tqdm

ENV_EVERY = "HWNAS_PROGRESS_EVERY"  # seconds between log lines when stderr is not a terminal
LOG_EVERY_S = 30.0


class _LogLines(_std_tqdm):
    """A tqdm that writes whole lines (no carriage returns, no cursor moves, no bar) at most every `mininterval`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        every = float(os.environ.get(ENV_EVERY, LOG_EVERY_S))
        kwargs.update(file=sys.stderr, mininterval=every, maxinterval=max(every, 10.0), miniters=0,
                      dynamic_ncols=False, ascii=True, position=None,
                      bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._logged, self._every, self._last_log = None, every, float("-inf")
        super().__init__(*args, **kwargs)

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> None:
        if self._time() - self._last_log >= self._every:  # set_postfix and friends refresh on every call
            self._last_log = self._time()
            super().refresh(nolock=nolock, lock_args=lock_args)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return True
        line = self.__str__() if msg is None else msg
        self.fp.write(line + "\n")
        self.fp.flush()
        self._logged = self.n
        return True

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        if self._logged != self.n:  # the final count, once
            self.display()
        self.disable = True
        self._decr_instances(self)


def tqdm(*args: Any, **kwargs: Any) -> _std_tqdm:
    """tqdm(...) with the same arguments: a bar on a terminal, log lines otherwise, nothing when disable=True."""
    if kwargs.get("disable") or sys.stderr.isatty():
        return _tqdm(*args, **kwargs)
    return _LogLines(*args, **kwargs)
