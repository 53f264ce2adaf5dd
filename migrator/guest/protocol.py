"""The probe's serial protocol: typed events and a parser for one console line.

The guest writes ``@MIG `` + one compact JSON object + newline to ttyS0; the
``t`` member names the line type.  Everything else on the console (kernel
messages, which may even land inside a probe line) is noise to skip.  Guest
times (``g``) are the guest's CLOCK_MONOTONIC in nanoseconds: they do not
advance while QEMU has the VM stopped, so they are only comparable with each
other, never with host clocks.

Line types (``g`` is spelled ``guest_ns`` on the models)::

    boot    {"t":"boot","kernel":"6.1.0-..","nproc":2,"mem_kib":481052,"mode":"run","uptime_s":1.76}
    ready   {"t":"ready","pages":N,"threads":T,"ws_mib":M,"g":NS,"fill_ns":NS,"cpus":[0,1],
             "write_pct":P,"pattern":"random","stall_us":U,"hb_ms":H}
    hb      {"t":"hb","seq":N,"g":NS}
    stall   {"t":"stall","cpu":C,"g":START_NS,"gap":GAP_NS}
    clock_step {"t":"clock_step","cpu":C,"g":BEFORE_NS,"back":BACK_NS}
    stats   {"t":"stats","g":NS,"ops":[per-worker accesses],"stalls":N,"clock_steps":N,
             "dropped":N,"running":true}
    hist    {"t":"hist","cpu":C,"buckets":[..],"max":GAP_NS,"ops":N}
    verify  {"t":"verify","pages":N,"bad_pages":M,"first_bad":[..<=8],"read_mismatches":K,
             "g":NS,"ns":VERIFY_NS}
    error   {"t":"error","msg":"..","cmd":"..","g":NS}   (cmd and g are optional)

Probes built before ``clock_step`` existed print neither it nor
``stats.clock_steps``; their ``now - prev`` was unsigned, so a clock that went
back shows there as a ``stall`` whose gap is close to 2**64 ns (see
:mod:`migrator.metrics.guest`, which tells such lines from stalls).

Commands go the other way as plain lines: ``verify`` (stop the workers, print
one ``hist`` per worker, then ``verify``; heartbeats go on), ``poweroff``, and
``corrupt PAGE`` (flip one bit of that page: a self-test of ``verify``).

``parse_line`` never raises: a line carrying ``@MIG `` that does not decode to
one of these is returned as :class:`Malformed`.  This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "MARKER",
    "Boot",
    "ClockStep",
    "GuestEvent",
    "Heartbeat",
    "Hist",
    "Malformed",
    "ProbeError",
    "ProbeEvent",
    "Ready",
    "Stall",
    "Stats",
    "Verify",
    "parse_line",
]

#: Prefix of every line meant for the controller.
MARKER = "@MIG "


class _Line(BaseModel):
    # strict: a probe that prints "5" where 5 belongs has a bug worth seeing.
    # extra="ignore": a newer probe may add members without breaking old readers.
    model_config = ConfigDict(
        frozen=True, strict=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    #: The ``t`` value, usable as ``GuestConsole.wait_for(kind)``.
    kind: ClassVar[str]


class Boot(_Line):
    """Printed by ``/init`` as soon as /proc is mounted: the guest kernel runs."""

    kind: ClassVar[str] = "boot"
    t: Literal["boot"] = "boot"
    kernel: str
    nproc: int
    mem_kib: int
    mode: Literal["run", "boot"]
    #: Guest uptime when /init got here (kernel boot time under this accelerator).
    uptime_s: float


class Ready(_Line):
    """The working set is allocated and filled; the workers start now."""

    kind: ClassVar[str] = "ready"
    t: Literal["ready"] = "ready"
    pages: int
    threads: int
    ws_mib: int
    guest_ns: int = Field(alias="g")
    #: mmap + populate + pattern fill of the whole working set, guest ns.
    fill_ns: int
    #: vCPU each worker is pinned to, in worker order (the order of ``Stats.ops``).
    cpus: tuple[int, ...]
    write_pct: int
    pattern: Literal["sequential", "random"]
    stall_us: int
    hb_ms: int


class Heartbeat(_Line):
    """Printed every ``hb_ms`` of guest time by the probe's main thread."""

    kind: ClassVar[str] = "hb"
    t: Literal["hb"] = "hb"
    seq: int
    guest_ns: int = Field(alias="g")


class Stall(_Line):
    """A worker saw more than ``stall_us`` between two consecutive accesses."""

    kind: ClassVar[str] = "stall"
    t: Literal["stall"] = "stall"
    cpu: int
    #: Guest time of the access before the gap.
    start_ns: int = Field(alias="g")
    gap_ns: int = Field(alias="gap")

    @property
    def end_ns(self) -> int:
        """Guest time of the access after the gap."""
        return self.start_ns + self.gap_ns


class ClockStep(_Line):
    """A worker's CLOCK_MONOTONIC went back between two consecutive accesses.

    Not a stall: the probe reports the step instead, and counts the sample as a
    gap of 0 ns in its histogram.
    """

    kind: ClassVar[str] = "clock_step"
    t: Literal["clock_step"] = "clock_step"
    cpu: int
    #: Guest time of the access before the step.
    before_ns: int = Field(alias="g")
    #: How far the clock went back, ns (> 0).
    back_ns: int = Field(alias="back")


class Stats(_Line):
    """About once a second: cumulative accesses per worker and stall counters."""

    kind: ClassVar[str] = "stats"
    t: Literal["stats"] = "stats"
    guest_ns: int = Field(alias="g")
    #: Cumulative accesses, one per worker, in ``Ready.cpus`` order.
    ops: tuple[int, ...]
    #: Stalls detected so far (printed or not).
    stalls: int
    #: Clock steps back detected so far (printed or not); 0 from probes that predate them.
    clock_steps: int = 0
    #: Stall and clock step lines lost because the guest's buffer was full.
    dropped: int
    #: False once ``verify`` has stopped the workers.
    running: bool


class Hist(_Line):
    """One worker's access-to-access gap histogram (printed before ``verify``).

    ``buckets[k]`` counts gaps in ``[2**k, 2**(k+1))`` ns (bucket 0 also holds
    gaps of 0 ns, and clock steps back); the list ends at the last non-empty bucket.
    """

    kind: ClassVar[str] = "hist"
    t: Literal["hist"] = "hist"
    cpu: int
    buckets: tuple[int, ...]
    max_gap_ns: int = Field(alias="max")
    ops: int

    @staticmethod
    def bucket_bounds(k: int) -> tuple[int, int]:
        """Return the ``[low, high)`` gap range of bucket ``k`` in ns."""
        return (0 if k == 0 else 1 << k, 1 << (k + 1))


class Verify(_Line):
    """Result of checking every page's full content after stopping the workers."""

    kind: ClassVar[str] = "verify"
    t: Literal["verify"] = "verify"
    pages: int
    bad_pages: int
    #: The lowest bad page indexes, at most 8.
    first_bad: tuple[int, ...]
    #: Reads during the run whose header or sampled word was wrong.
    read_mismatches: int
    guest_ns: int = Field(alias="g")
    #: Guest time the content check took.
    duration_ns: int = Field(alias="ns")

    @property
    def ok(self) -> bool:
        """True when no page and no read was ever wrong."""
        return self.bad_pages == 0 and self.read_mismatches == 0


class ProbeError(_Line):
    """The guest reported a problem (bad parameter, unknown command, probe died)."""

    kind: ClassVar[str] = "error"
    t: Literal["error"] = "error"
    msg: str
    #: The offending command, for "unknown command".
    cmd: str | None = None
    #: Absent on lines printed by ``/init``.
    guest_ns: int | None = Field(default=None, alias="g")


@dataclass(frozen=True)
class Malformed:
    """A ``@MIG`` line that could not be decoded (torn, garbled or unknown type)."""

    kind: ClassVar[str] = "malformed"
    text: str
    reason: str


ProbeEvent: TypeAlias = Annotated[
    Boot | Ready | Heartbeat | Stall | ClockStep | Stats | Hist | Verify | ProbeError,
    Field(discriminator="t"),
]
GuestEvent: TypeAlias = (
    Boot | Ready | Heartbeat | Stall | ClockStep | Stats | Hist | Verify | ProbeError | Malformed
)

_ADAPTER: TypeAdapter[ProbeEvent] = TypeAdapter(ProbeEvent)


def parse_line(text: str) -> GuestEvent | None:
    """Decode one console line: an event, :class:`Malformed`, or None for non-probe text."""
    at = text.rfind(MARKER)
    if at < 0:
        return None
    # The last marker wins: when a torn line lost its newline, the complete
    # line follows the torn one on the same physical line.
    payload = text[at + len(MARKER) :].strip()
    try:
        return _ADAPTER.validate_json(payload)
    except ValidationError as exc:
        return Malformed(text=text, reason=_reason(exc))


def _reason(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
