"""``ShortTimeoutDDP``: DDP whose collectives time out after a few seconds. The timeout is set once the process
group is up, so a slow process start does not count; tests of ranks that wait on an evaluation use it."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy


class ShortTimeoutDDP(DDPStrategy):
    def __init__(self, collective_timeout_s: float = 5.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collective_timeout_s = collective_timeout_s

    def setup_distributed(self) -> None:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        super().setup_distributed()
        _set_pg_timeout(timedelta(seconds=self.collective_timeout_s))
