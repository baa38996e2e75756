"""Progress for every phase that takes more than a few seconds: a tqdm bar on a terminal, periodic plain lines
(with rate and ETA) when the output is a file or a pipe (CI, schedulers, the quickstart's log), nothing when off.
"""
from __future__ import annotations

import sys
import time

__all__ = ['Progress', 'format_seconds']

# Plain-line mode: at most one line per this many seconds, so that no phase is silent for longer.
PLAIN_INTERVAL_S = 10.0


def format_seconds(s: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    s = max(0.0, float(s))
    if s < 60:
        return f'{s:.0f} s'
    if s < 3600:
        return f'{int(s // 60)} min {int(s % 60):02d} s'
    return f'{int(s // 3600)} h {int(s % 3600 // 60):02d} min'


class Progress:
    """A counter towards `total` with a description, shown as a bar (terminal) or as periodic lines.

    Args:
        total: number of units (steps, batches) expected.
        desc: what is counted, e.g. 'epoch 3/60' or 'eval test'.
        unit: the unit's name in plain lines.
        enabled: False shows nothing (non-main processes, `runtime.progress=false`).
        initial: units already done (a resumed epoch).
        leave: keep the bar on screen when it closes.
    """

    def __init__(self, total: int, desc: str, *, unit: str = 'step', enabled: bool = True, initial: int = 0,
                 leave: bool = False):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.units = unit + ('es' if unit.endswith(('s', 'ch')) else 's')
        self.n = self._start = int(initial)
        self.enabled = enabled
        self._bar = None
        self._t0 = self._last = time.perf_counter()
        self._postfix = ''
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, leave=leave, dynamic_ncols=True,
                             unit=unit)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.perf_counter() - self._last >= PLAIN_INTERVAL_S:
            self._print_line()

    def set_postfix(self, text: str) -> None:
        """Extra text (e.g. 'loss 1.234') shown after the counts."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _print_line(self) -> None:
        now = time.perf_counter()
        self._last = now
        done = self.n - self._start
        rate = done / max(now - self._t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float('inf')
        eta_text = format_seconds(eta) if eta != float('inf') else '?'
        extra = f', {self._postfix}' if self._postfix else ''
        print(f'  {self.desc}: {self.n}/{self.total} {self.units}, {rate:.2f} {self.unit}/s, ETA {eta_text}{extra}',
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
