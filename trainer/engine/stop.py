"""The stop flag: how a run is asked to stop, on every rank, and agrees to stop at a step boundary.

Both signals a run is asked to stop with are handled alike: SIGUSR2 (SLURM's warning before a time
limit or a preemption) and SIGTERM (scancel, preemption with a grace time, torchrun forwarding the
SIGTERM it got to every worker's process group). The handler only sets the flag (no I/O, no exit);
at the next step boundary the engine calls :meth:`StopFlag.agreed`, every rank sees the flag, one
checkpoint is written together and :meth:`trainer.engine.loop.Engine.fit` returns ``stopped``.

A handler installed before (submitit's USR2 handler in a SLURM job: ``checkpoint()``, dump,
``scontrol requeue``, exit) is kept aside, never chained: run inside the signal it would exit one
rank mid-step, before the collective save, and leave the others hanging. The launcher's job calls
it afterwards, through :meth:`StopFlag.submitit_handler`, once every rank has saved.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

from trainer import dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Set by a signal (or :meth:`set`) on any rank; agreed on by all ranks at step boundaries."""

    def __init__(self) -> None:
        self._local = False
        self.received: list[int] = []
        """Signals caught, in order (a handler does no I/O: this is read afterwards)."""
        self._previous: dict[int, Any] = {}

    def set(self) -> None:
        self._local = True

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> StopFlag:
        """Catch ``signals`` (they only set the flag); the handlers found are kept for :meth:`uninstall`."""
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` found."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self._local = True

    @property
    def preempted(self) -> bool:
        """SIGUSR2 arrived: a time limit or preemption warning, which asks for a requeue (SIGTERM
        stops without one: scancel, or SLURM requeueing the job itself)."""
        return signal.SIGUSR2 in self.received

    def submitit_handler(self) -> Any:
        """The USR2 handler found at :meth:`install` (submitit's, in a submitit job), or None."""
        prev = self._previous.get(signal.SIGUSR2)
        return prev if callable(prev) else None

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([1 if self._local else 0], dtype=torch.int32, device=dist.comm_device())
        return bool(dist.all_reduce(flag, op="max").item())
