"""How to migrate: the ``[migration]`` table and its sub-tables (switchover, recovery, TLS)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from migrator.config.base import ADDRESS_PATTERN, ScenarioModel

__all__ = [
    "BASE_CAPABILITIES",
    "BASE_PARAMETERS",
    "MANAGED_CAPABILITIES",
    "MANAGED_PARAMETERS",
    "AfterPasses",
    "AfterSeconds",
    "AutoConvergeSpec",
    "Immediately",
    "MigrationSpec",
    "MultifdSpec",
    "ParameterValue",
    "PauseSourceAfterPasses",
    "RecoverySpec",
    "SwitchoverPolicy",
    "TlsSpec",
    "tuning_label",
]


class Immediately(ScenarioModel):
    """Switch to post-copy right after the migration starts."""

    policy: Literal["immediately"] = "immediately"


class AfterSeconds(ScenarioModel):
    """Switch to post-copy N seconds after the migration starts."""

    policy: Literal["after-seconds"] = "after-seconds"
    seconds: float = Field(gt=0, le=3600)


class AfterPasses(ScenarioModel):
    """Switch to post-copy once N dirty-sync passes have completed (MIGRATION_PASS)."""

    policy: Literal["after-passes"] = "after-passes"
    passes: int = Field(ge=1, le=1000)


class PauseSourceAfterPasses(ScenarioModel):
    """Pre-copy only: pause the source's vCPUs once N dirty-sync passes have completed.

    The guest's memory then stops changing, so pre-copy converges and completes;
    the destination is resumed after it.  The guest is frozen from the pause to
    the resume (the report's freeze), as with QEMU's own benchmark's strategy of
    stopping the source after N iterations.
    """

    policy: Literal["pause-source-after-passes"] = "pause-source-after-passes"
    passes: int = Field(ge=1, le=1000)


SwitchoverPolicy = Annotated[
    Immediately | AfterSeconds | AfterPasses | PauseSourceAfterPasses,
    Field(discriminator="policy")
]


class RecoverySpec(ScenarioModel):
    """What migrator does when the post-copy stream breaks (see migration/recovery.py).

    After the switch the guest's memory lives on two hosts, so a broken stream
    must be mended, not abandoned: both QEMUs are brought to ``postcopy-paused``
    and the stream re-established (``migrate-recover`` on the destination,
    ``migrate`` with ``resume`` on the source), retrying with backoff.
    """

    auto: bool = Field(True, description="recover paused post-copy automatically; false: a "
                                         "pause fails the run (failed after switchover)")
    stall_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="post-copy with pages left to send and no byte moving on the source for "
                    "this long counts as a broken stream (TCP alone may take minutes to notice "
                    "a dead link): both sides are paused (migrate-pause) and recovered. Keep it "
                    "above the time one huge page takes to fetch and place (about 1 s for "
                    "1 GiB pages on bare metal, several under TCG)",
    )
    deadline_s: float = Field(
        300.0, gt=0, le=86400,
        description="give up one pause's recovery after this long (the VM is then lost)",
    )
    backoff_initial_s: float = Field(0.5, gt=0, le=600,
                                     description="wait after the first failed attempt")
    backoff_max_s: float = Field(8.0, gt=0, le=3600,
                                 description="longest wait between attempts (doubling)")

    @model_validator(mode="after")
    def _backoff_ordered(self) -> RecoverySpec:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s={self.backoff_max_s:g} is below "
                             f"backoff_initial_s={self.backoff_initial_s:g}")
        return self


class TlsSpec(ScenarioModel):
    """Migration over TLS: the stream is encrypted and both QEMUs authenticate each other.

    The table's presence (``[migration.tls]``, even empty) turns TLS on.  Each
    directory holds QEMU ``tls-creds-x509`` files on its host: the source's
    ``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem``; the destination's
    ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``.  Both directories
    unset: migrator makes a throwaway CA and certificates for the run alone, and
    removes their keys from the hosts as soon as QEMU has loaded them.
    """

    source_dir: Path | None = Field(
        None, strict=False,
        description="absolute directory ON THE SOURCE HOST holding ca-cert.pem, "
                    "client-cert.pem and client-key.pem; set with destination_dir or neither "
                    "(unset: migrator generates throwaway certificates for the run)",
    )
    destination_dir: Path | None = Field(
        None, strict=False,
        description="absolute directory ON THE DESTINATION HOST holding ca-cert.pem, "
                    "server-cert.pem and server-key.pem; set with source_dir or neither",
    )
    hostname: str | None = Field(
        None, pattern=ADDRESS_PATTERN,
        description="name the source checks the destination's certificate against (QEMU's "
                    "tls-hostname); unset: the destination's migration address",
    )

    @model_validator(mode="after")
    def _both_dirs_or_neither(self) -> TlsSpec:
        # Half-provided credentials cannot work: a generated CA would not have issued the
        # other side's certificate.
        if (self.source_dir is None) != (self.destination_dir is None):
            given, missing = (("source_dir", "destination_dir") if self.source_dir is not None
                              else ("destination_dir", "source_dir"))
            raise ValueError(f"{given} is set but {missing} is not: give both certificate "
                             "directories, or neither to have migrator generate throwaway "
                             "certificates for the run")
        for name, path in (("source_dir", self.source_dir),
                           ("destination_dir", self.destination_dir)):
            if path is not None and not path.is_absolute():
                raise ValueError(f"{name}={str(path)!r} must be an absolute path (a directory "
                                 "on that host)")
        return self


#: Capabilities migrator sets itself, each with the scenario field that sets it.
MANAGED_CAPABILITIES: dict[str, str] = {
    "events": "nothing (always on: migrator waits on QEMU's MIGRATION events)",
    "postcopy-ram": "migration.postcopy",
    "postcopy-preempt": "migration.preempt",
    "postcopy-blocktime": "collect.blocktime",
    "hugetlb-doublemap": "vm.hgm",
    "auto-converge": "[migration.auto_converge]",
    "xbzrle": "migration.xbzrle_cache_mib",
    "multifd": "[migration.multifd]",
}

#: Parameters migrator sets itself, each with the scenario field that sets it.
MANAGED_PARAMETERS: dict[str, str] = {
    "max-bandwidth": "migration.max_bandwidth_mib_s",
    "max-postcopy-bandwidth": "migration.max_postcopy_bandwidth_mib_s",
    "downtime-limit": "migration.downtime_limit_ms",
    "tls-creds": "[migration.tls]",
    "tls-hostname": "migration.tls.hostname",
    "tls-authz": "[migration.tls]",
    "cpu-throttle-initial": "migration.auto_converge.initial_pct",
    "cpu-throttle-increment": "migration.auto_converge.increment_pct",
    "xbzrle-cache-size": "migration.xbzrle_cache_mib",
    "multifd-channels": "migration.multifd.channels",
    "multifd-compression": "migration.multifd.compression",
}

#: The capabilities and parameters that the scenario's own fields of a run (post-copy,
#: preempt, blocktime, HGM, bandwidths, downtime limit, TLS) set; every other one in a plan
#: is tuning (:func:`tuning_label`).
BASE_CAPABILITIES = frozenset({"events", "postcopy-ram", "postcopy-preempt",
                               "postcopy-blocktime", "hugetlb-doublemap"})
BASE_PARAMETERS = frozenset({"max-bandwidth", "max-postcopy-bandwidth", "downtime-limit",
                             "tls-creds", "tls-hostname", "tls-authz"})


def tuning_label(capabilities: Mapping[str, object], parameters: Mapping[str, object]) -> str:
    """The tuning of a side's plan as one stable text: ``cap;cap=false;param=value;...``.

    Capabilities and parameters outside :data:`BASE_CAPABILITIES` and
    :data:`BASE_PARAMETERS`, sorted by name; a capability that is on is its bare
    name.  "" when there is none.  No comma, so it can be a selector value.
    """
    items = {name: "" if on is True else "=false" for name, on in capabilities.items()
             if name not in BASE_CAPABILITIES}
    items |= {name: f"={value}".lower() if isinstance(value, bool) else f"={value}"
              for name, value in parameters.items() if name not in BASE_PARAMETERS}
    return ";".join(f"{name}{value}" for name, value in sorted(items.items()))


# A QMP capability or parameter name (experimental ones start with "x-").
_QMP_NAME = re.compile(r"^[a-z][a-z0-9-]*$")

ParameterValue = int | float | bool | str
"""A migrate-set-parameters value as TOML gives it."""


class AutoConvergeSpec(ScenarioModel):
    """auto-converge: QEMU throttles the guest's vCPUs while pre-copy fails to converge.

    The table's presence (``[migration.auto_converge]``, even empty) turns it on.
    """

    initial_pct: int = Field(20, ge=1, le=99,
                             description="cpu-throttle-initial: the first throttle, percent")
    increment_pct: int = Field(10, ge=1, le=99,
                               description="cpu-throttle-increment: added each time pre-copy "
                                           "still does not converge, percent")


class MultifdSpec(ScenarioModel):
    """multifd: pre-copy pages over several parallel channels (both sides).

    The table's presence (``[migration.multifd]``, even empty) turns it on.  Whether
    the QEMUs accept it together with post-copy is asked of them in preflight.
    """

    channels: int = Field(2, ge=1, le=255, description="multifd-channels")
    compression: Literal["none", "zlib", "zstd", "qpl", "uadk", "qatzip"] = Field(
        "none", description="multifd-compression (what the QEMU offers depends on its build)")


class MigrationSpec(ScenarioModel):
    """How to migrate."""

    postcopy: bool = True
    preempt: bool = Field(False, description="postcopy-preempt: urgent pages on their own channel")
    switchover: SwitchoverPolicy = Field(default_factory=lambda: AfterSeconds(seconds=1.0))
    max_bandwidth_mib_s: int | None = Field(
        None, ge=1, le=1 << 20,  # QEMU keeps bytes/s in 64 bits; 1 TiB/s is plenty
        description="pre-copy bandwidth cap; unset = as fast as the link goes",
    )
    max_postcopy_bandwidth_mib_s: int | None = Field(
        None, ge=1, le=1 << 20,
        description="post-copy background bandwidth cap; unset = QEMU's default",
    )
    downtime_limit_ms: int | None = Field(
        None, ge=1, le=2000000,
        description="QEMU's downtime-limit on the source: pre-copy completes once what is left "
                    "fits in this much time at the measured bandwidth. Unset with postcopy = "
                    "true: held at 1 ms until the switch (0 would not hold it: see "
                    "migration/plan.py), so pre-copy cannot complete first; a larger value "
                    "lets it complete if it can (the run then ends completed-without-postcopy, "
                    "exit 7). Unset without post-copy: QEMU's default (300 ms)",
    )
    transport: Literal["tcp", "unix"] = "tcp"
    timeout_s: float = Field(600.0, gt=0, le=86400)
    tls: TlsSpec | None = Field(
        None, description="migrate over TLS; the [migration.tls] table, even empty, turns it "
                          "on (unset: a plaintext stream)",
    )
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    auto_converge: AutoConvergeSpec | None = Field(
        None, description="[migration.auto_converge]: throttle the guest while pre-copy does "
                          "not converge (unset: off)")
    xbzrle_cache_mib: int | None = Field(
        None, ge=1, le=1 << 20,
        description="turn xbzrle (delta compression of re-sent pages) on, with this cache size "
                    "(unset: off)")
    multifd: MultifdSpec | None = Field(
        None, description="[migration.multifd]: pre-copy over parallel channels (unset: off)")
    max_passes: int | None = Field(
        None, ge=1, le=1000,
        description="pre-copy only: cancel the migration when the source starts a pass "
                    "beyond this many without having converged; the run ends failed before "
                    "switchover (exit 4), the guest running on the source")
    max_seconds: float | None = Field(
        None, gt=0, le=86400,
        description="pre-copy only: cancel the migration if it has not converged this long "
                    "after it started (as max_passes)")
    capabilities: dict[str, bool] = Field(
        default_factory=dict,
        description="[migration.capabilities]: any other QMP migration capability, by name, "
                    "on both sides; checked against each QEMU in preflight (exit 3)")
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict,
        description="[migration.parameters]: any other migrate-set-parameters value, by "
                    "name, on both sides; checked against each QEMU in preflight (exit 3)")

    @model_validator(mode="after")
    def _named_knobs_are_others(self) -> MigrationSpec:
        for table, names, managed in (("capabilities", self.capabilities, MANAGED_CAPABILITIES),
                                      ("parameters", self.parameters, MANAGED_PARAMETERS)):
            for name in names:
                if not _QMP_NAME.match(name):
                    raise ValueError(f"{table}.{name}: not a QMP {table[:-1]} name "
                                     "(lower case, digits and '-')")
                if name in managed:
                    raise ValueError(f"{table}.{name}: migrator sets it; use "
                                     f"{managed[name]}")
        return self

    @model_validator(mode="after")
    def _pausing_the_source_is_for_precopy(self) -> MigrationSpec:
        if self.postcopy and isinstance(self.switchover, PauseSourceAfterPasses):
            raise ValueError('switchover policy "pause-source-after-passes" ends a '
                             "pre-copy-only migration (postcopy = false); with post-copy use "
                             '"after-passes"')
        return self

    @model_validator(mode="after")
    def _cancel_rules_are_for_precopy(self) -> MigrationSpec:
        # After the switch a cancel would lose the VM; before it, the switchover policy
        # decides when pre-copy ends.
        for name in ("max_passes", "max_seconds"):
            if self.postcopy and getattr(self, name) is not None:
                raise ValueError(f"{name} cancels a pre-copy-only migration "
                                 "(postcopy = false); with post-copy the switchover policy "
                                 "ends pre-copy")
        return self

    @model_validator(mode="after")
    def _preempt_needs_postcopy(self) -> MigrationSpec:
        if self.preempt and not self.postcopy:
            raise ValueError("preempt = true needs postcopy = true")
        return self
