"""query-migrate sampled on one side at a fixed rate into the samples.jsonl artifact.

At most one query is outstanding per side: when QEMU's main loop is blocked (the
destination faulting in a 1 GiB page while loading device state does that for
seconds) the next sample simply waits, and the long reply latency is itself
recorded as evidence of the stall.
"""

from __future__ import annotations

import logging
import time

from qemu.qmp import QMPError

from migrator.aio import paced
from migrator.errors import QmpCommandError, QmpConnectionLost, QmpTimeout
from migrator.qemu.monitor import Monitor
from migrator.rundir import JsonlWriter

__all__ = ["sample_query_migrate"]

log = logging.getLogger(__name__)


async def sample_query_migrate(
    monitor: Monitor, side: str, out: JsonlWriter, hz: float, *, reply_timeout: float = 120.0
) -> None:
    """Sample until cancelled or until the QMP connection is gone."""
    async for _ in paced(hz):
        sent_ns = time.time_ns()
        try:
            reply = await monitor.query_migrate(timeout=reply_timeout)
        except QmpTimeout:
            out.write({"side": side, "host_ns": sent_ns, "error": "timeout"})
        except QmpCommandError as error:
            out.write({"side": side, "host_ns": sent_ns, "error": str(error)})
        except (QmpConnectionLost, QMPError, ConnectionError, EOFError) as error:
            # QEMU went away; the process watcher reports why.
            log.debug("%s: sampler stops: %s", side, error)
            return
        else:
            out.write(
                {"side": side, "host_ns": sent_ns, "reply_ns": time.time_ns(), "reply": reply}
            )
