"""From a scenario to what each side's QEMU must be told (capabilities, parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from migrator.config.migration import ParameterValue
from migrator.config.models import LocalHostSpec, MigrationSpec, Scenario
from migrator.errors import MissingCapability
from migrator.hgm.detect import DOUBLEMAP_CAPABILITY
from migrator.qemu.probe import QemuFacts

__all__ = [
    "POSTCOPY_HOLD_DOWNTIME_MS",
    "TLS_CREDS_ID",
    "UNLIMITED_BANDWIDTH",
    "MigrationPlan",
    "check_capabilities",
    "destination_address",
    "plan_migration",
    "source_downtime_limit_ms",
    "tls_hostname",
]

# QEMU caps pre-copy at max-bandwidth (128 MiB/s by default on 7.2 and 11.1); "as fast as the
# link goes" is asked for by a cap no real link reaches (1 TiB/s).
UNLIMITED_BANDWIDTH = 1 << 40
MIB = 1 << 20
# The QOM id of the tls-creds-x509 object migrator adds to each QEMU (migration/tls.py).
TLS_CREDS_ID = "migrator-tls"


@dataclass(frozen=True)
class MigrationPlan:
    """Per-side capabilities and parameters for one migration."""

    source_capabilities: dict[str, bool] = field(default_factory=dict)
    destination_capabilities: dict[str, bool] = field(default_factory=dict)
    source_parameters: dict[str, ParameterValue] = field(default_factory=dict)
    destination_parameters: dict[str, ParameterValue] = field(default_factory=dict)

    @property
    def needed(self) -> set[str]:
        """Every capability either side must support."""
        return {
            name
            for caps in (self.source_capabilities, self.destination_capabilities)
            for name, on in caps.items()
            if on
        }


def destination_address(scenario: Scenario) -> str:
    """Where the source connects over TCP: the destination's stream address, or 127.0.0.1
    for a local destination (as the runner's incoming URI has it)."""
    destination = scenario.hosts.destination
    return "127.0.0.1" if isinstance(destination, LocalHostSpec) else destination.stream_address


def tls_hostname(scenario: Scenario) -> str:
    """The name the source checks the destination's certificate against (``tls-hostname``).

    ``migration.tls.hostname``, else :func:`destination_address`.  Always set,
    because QEMU has no hostname of its own to check for a unix socket.
    """
    tls = scenario.migration.tls
    if tls is not None and tls.hostname:
        return tls.hostname
    return destination_address(scenario)


# With post-copy asked for and no downtime_limit_ms given, the source's downtime-limit is
# 1 ms: QEMU completes pre-copy once what is left fits in bandwidth x downtime-limit, which a
# guest that dirties memory never gets under (QEMU's own post-copy tests hold it at 1 ms for
# the same reason). Not 0: QEMU 7.2 to 10.0 count the dirty pages again only when their
# running estimate falls below that threshold, so with 0 they never do, the estimate reaches
# 0 at the end of the first round, and "nothing pending" completes the migration there
# (on 10.0: 36 of 78 runs of a 512 MiB guest switching after 0.3 s; docs/qemu-notes.md).
# It plays no part once post-copy runs.
POSTCOPY_HOLD_DOWNTIME_MS = 1


def source_downtime_limit_ms(spec: MigrationSpec) -> int | None:
    """The ``downtime-limit`` the source gets: the scenario's, else the post-copy hold."""
    if spec.downtime_limit_ms is not None:
        return spec.downtime_limit_ms
    return POSTCOPY_HOLD_DOWNTIME_MS if spec.postcopy else None


def _tuning(spec: MigrationSpec) -> tuple[dict[str, bool], dict[str, ParameterValue]]:
    """Capabilities and parameters both sides get from the scenario's tuning fields
    (auto-converge, xbzrle, multifd) and its [migration.capabilities] and
    [migration.parameters] tables."""
    capabilities: dict[str, bool] = {}
    parameters: dict[str, ParameterValue] = {}
    if spec.auto_converge is not None:
        capabilities["auto-converge"] = True
        parameters |= {"cpu-throttle-initial": spec.auto_converge.initial_pct,
                       "cpu-throttle-increment": spec.auto_converge.increment_pct}
    if spec.xbzrle_cache_mib is not None:
        capabilities["xbzrle"] = True
        parameters["xbzrle-cache-size"] = spec.xbzrle_cache_mib * MIB
    if spec.multifd is not None:
        capabilities["multifd"] = True
        parameters |= {"multifd-channels": spec.multifd.channels,
                       "multifd-compression": spec.multifd.compression}
    return capabilities | spec.capabilities, parameters | spec.parameters


def _parameters(spec: MigrationSpec) -> dict[str, ParameterValue]:
    parameters: dict[str, ParameterValue] = {
        "max-bandwidth": spec.max_bandwidth_mib_s * MIB
        if spec.max_bandwidth_mib_s
        else UNLIMITED_BANDWIDTH
    }
    if spec.max_postcopy_bandwidth_mib_s:
        parameters["max-postcopy-bandwidth"] = spec.max_postcopy_bandwidth_mib_s * MIB
    downtime = source_downtime_limit_ms(spec)
    if downtime is not None:
        parameters["downtime-limit"] = downtime
    return parameters


def plan_migration(scenario: Scenario, *, hgm: bool = False) -> MigrationPlan:
    """Capabilities and parameters for both sides of ``scenario``.

    ``hgm`` is the run's HGM decision (:func:`migrator.hgm.decide_hgm` on the
    hosts, not the scenario's wish): True adds ``hugetlb-doublemap`` on both
    sides.  It is a post-copy capability: asking for it without post-copy is a
    :class:`ValueError`.
    """
    spec = scenario.migration
    if hgm and not spec.postcopy:
        raise ValueError(f"{DOUBLEMAP_CAPABILITY} needs post-copy (migration.postcopy = true)")
    # 'events' makes QEMU emit MIGRATION and MIGRATION_PASS, which the driver waits on.
    common = {"events": True}
    if spec.postcopy:
        common["postcopy-ram"] = True
    if spec.preempt:
        common["postcopy-preempt"] = True
    if hgm:
        common[DOUBLEMAP_CAPABILITY] = True
    tuning_capabilities, tuning_parameters = _tuning(spec)
    common |= tuning_capabilities
    destination = dict(common)
    if spec.postcopy and scenario.collect.blocktime:
        destination["postcopy-blocktime"] = True
    source_parameters = _parameters(spec) | tuning_parameters
    destination_parameters: dict[str, ParameterValue] = dict(tuning_parameters)
    if spec.tls is not None:
        # The credentials object exists by then (migration.tls.enable_tls); the source
        # checks the destination's certificate against tls-hostname.
        source_parameters |= {"tls-creds": TLS_CREDS_ID, "tls-hostname": tls_hostname(scenario)}
        destination_parameters["tls-creds"] = TLS_CREDS_ID
    return MigrationPlan(
        source_capabilities=dict(common),
        destination_capabilities=destination,
        source_parameters=source_parameters,
        destination_parameters=destination_parameters,
    )


def check_capabilities(plan: MigrationPlan, facts: QemuFacts) -> None:
    """Raise :class:`MissingCapability` naming every capability ``facts`` lacks."""
    missing = sorted(plan.needed - set(facts.capabilities))
    if missing:
        raise MissingCapability(facts.binary, facts.version, missing)
