"""A KV store's metrics, read at scrape time from its stats (nothing is updated on the hot path).

Every series carries `model_name` and `store` (the store's name in the spec). Invariant:
`kv_store_slots{state="free"}` + `{state="reserved"}` + `{state="committed"}` = the slots of the
host tier; the counters are the stats' running totals, so they only grow while the process lives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trellis.core.kv_store_api import StoreStats

# (metric name without _total, help, StoreStats field, extra label name, its value)
_COUNTERS: tuple[tuple[str, str, str, str, str], ...] = (
    ("kv_store_lookups", "Lookup calls", "lookups", "", ""),
    ("kv_store_hits", "Blocks found, by the tier they were found on", "host_hits", "tier", "host"),
    ("kv_store_hits", "Blocks found, by the tier they were found on", "disk_hits", "tier", "disk"),
    ("kv_store_misses", "Lookups and acquires whose run ended before the asked hashes", "misses", "", ""),
    ("kv_store_puts", "BeginPut calls", "puts_begun", "", ""),
    ("kv_store_blocks_committed", "Blocks committed by puts", "blocks_committed", "", ""),
    ("kv_store_blocks_aborted", "Reserved slots freed uncommitted", "blocks_aborted", "", ""),
    ("kv_store_evictions", "Blocks evicted, by tier", "host_evictions", "tier", "host"),
    ("kv_store_evictions", "Blocks evicted, by tier", "disk_evictions", "tier", "disk"),
    ("kv_store_disk_writes", "Blocks written to the disk tier", "disk_writes", "", ""),
    ("kv_store_disk_reads", "Blocks read from the disk tier into host slots", "disk_reads", "", ""),
    ("kv_store_disk_corrupt", "Disk block files dropped as corrupt", "disk_corrupt", "", ""),
    ("kv_store_leases_expired", "Leases reclaimed at their expiry", "leases_expired", "", ""),
    ("kv_store_puts_expired", "Puts reclaimed at their timeout", "puts_expired", "", ""),
    ("kv_store_no_room", "Offered blocks answered NO_ROOM", "no_room", "", ""),
)


class KVStoreCollector(Collector):
    def __init__(self, read: Callable[[], StoreStats], *, model_name: str, store: str) -> None:
        self._read = read
        self._labels = {"model_name": model_name, "store": store}

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        names, values = list(self._labels), list(self._labels.values())
        slots = GaugeMetricFamily("kv_store_slots", "Host-tier slots by state", labels=[*names, "state"])
        for state, n in (
            ("free", s.free_slots),
            ("reserved", s.reserved_slots),
            ("committed", s.committed_slots),
        ):
            slots.add_metric([*values, state], n)
        yield slots
        for name, doc, value in (
            ("kv_store_leased_slots", "Committed slots pinned by a live lease", s.leased_slots),
            ("kv_store_leases", "Open leases", s.leases),
            ("kv_store_open_puts", "Open put tickets", s.puts),
            ("kv_store_disk_blocks", "Blocks on the disk tier", s.disk_blocks),
            ("kv_store_disk_capacity_blocks", "The disk tier's capacity in blocks", s.disk_capacity_blocks),
            ("kv_store_disk_pending", "Committed host blocks not yet written to disk", s.disk_pending),
        ):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            yield g
        families: dict[str, CounterMetricFamily] = {}
        for name, doc, field, extra, extra_value in _COUNTERS:
            fam = families.get(name)
            if fam is None:
                fam = families[name] = CounterMetricFamily(
                    name, doc, labels=[*names, *([extra] if extra else [])]
                )
            fam.add_metric([*values, *([extra_value] if extra else [])], getattr(s, field))
        yield from families.values()
