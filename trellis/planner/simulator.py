"""Discrete-event replay of a workload through a plan, from 1 GPU to thousands.

Each replica runs what the head stage's scheduler does: continuous batching over ``m``
micro-batches in flight (one per stage, or the engine's ``max_in_flight``), chunked prefill
inside a per-step token budget, a request admitted only when the KV room for its whole length
(prompt + output) is free, no preemption. A micro-batch step goes through the stages in order; a
stage works on one step at a time, first come first served, so a step's trip is a short recursion
over the stages (start = max(arrival, stage free)) rather than one event per stage. A router sends
each request to the replica with the fewest requests (a lazy heap). With a prefill/decode split,
prefill replicas hand each prompt's KV to the least-loaded decode replica after the move time.
Each stage's busy seconds are the sum of its step times, as the engine times its stages (the
all-gather of a TP-sliced hand-off included), so the bubble compares with the engine's.

Per step the work is O(stages) plus O(1) per request admitted or finished: decoding sequences
are never visited one by one (their context sum grows by the batch size each step, and each one
is filed under the step at which it finishes).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from trellis.planner.cost import ReplicaCost
from trellis.planner.errors import PlanError
from trellis.planner.sim_result import SimResult
from trellis.planner.workload import Requests

__all__ = ["SimConfig", "SimResult", "simulate"]

_RETURN, _TO_DECODE, _ARRIVE = 0, 1, 2


@dataclass(frozen=True)
class SimConfig:
    replicas: int
    kv_tokens: int  # per replica
    max_seqs: int  # per replica
    max_batched_tokens: int  # per micro-batch step
    prefill_replicas: int = 0  # the first ones prefill only, the rest decode only
    kv_move_latency_s: float = 0.0
    kv_move_s_per_token: float = 0.0
    max_in_flight: int = 0  # micro-batches in flight per replica (the engine's option); 0: one per stage


class _Group:
    """One micro-batch slot of a replica."""

    __slots__ = ("ctx", "done", "finish", "k", "last", "n_dec", "nseq", "pf_left", "prefilling")

    def __init__(self) -> None:
        self.n_dec = 0  # sequences decoding
        self.ctx = 0  # their context lengths, summed
        self.k = 0  # decode steps taken
        self.finish: dict[int, list[int]] = {}  # step -> sequences that end after it
        self.prefilling: list[list[int]] = []  # [request, prompt tokens done], in admission order
        self.pf_left = 0  # prompt tokens still to prefill
        self.nseq = 0
        self.done: list[int] = []  # prompts that complete in the step in flight
        self.last = 0.0  # when its previous step came back: its decoding sequences' last token


class _Replica:
    __slots__ = ("busy", "free", "groups", "idle", "index", "kv_used", "nseq", "ready", "role", "waiting")

    def __init__(self, index: int, role: str, pp: int, m: int) -> None:
        self.index, self.role = index, role
        self.waiting: deque[int] = deque()  # requests to prefill
        self.ready: deque[int] = deque()  # requests to decode (their KV moved in)
        self.kv_used = 0
        self.nseq = 0
        self.groups = [_Group() for _ in range(m)]
        self.idle = list(range(m))
        self.free = [0.0] * pp  # when each stage is next free
        self.busy = [0.0] * pp  # each stage's busy seconds (its step times, as the engine times them)


class _Pool:
    """Least-loaded replica of a set, by requests assigned and not yet done (a lazy heap)."""

    def __init__(self, members: list[int], load: list[int]) -> None:
        self.load = load
        self.heap = [(0, i) for i in members]
        heapq.heapify(self.heap)

    def pick(self) -> int:
        heap, load = self.heap, self.load
        while True:
            n, i = heap[0]
            if load[i] == n:
                return i
            heapq.heappop(heap)

    def add(self, i: int, delta: int) -> None:
        self.load[i] += delta
        heapq.heappush(self.heap, (self.load[i], i))


def simulate(
    cost: ReplicaCost, cfg: SimConfig, reqs: Requests, clients: int | None = None, gaps: bool = False
) -> SimResult:
    """Replay ``reqs`` (open loop at their arrival times, or closed loop with ``clients`` in flight);
    ``gaps`` records every decode step's token gaps (co-located replicas) for ``steady_tpot``."""
    return _Sim(cost, cfg, reqs, clients, gaps).run()


class _Sim:
    def __init__(
        self, cost: ReplicaCost, cfg: SimConfig, reqs: Requests, clients: int | None, gaps: bool
    ) -> None:
        n = len(reqs)
        self.gaps: list[tuple[float, float, int]] | None = [] if gaps else None
        self.cfg, self.clients = cfg, clients
        self.prompt = [int(x) for x in reqs.prompt]
        self.output = [int(x) for x in reqs.output]
        longest = max(p + o for p, o in zip(self.prompt, self.output, strict=True)) if n else 0
        if longest > cfg.kv_tokens:
            raise PlanError(
                f"a request of {longest} tokens exceeds a replica's KV room of {cfg.kv_tokens} tokens"
            )
        self.arrival = [float(x) for x in reqs.arrival] if clients is None else [0.0] * n
        self.first = [0.0] * n
        self.end = [0.0] * n
        self.pp = cost.pp
        classes = list(dict.fromkeys(cost.stages))
        self.classes = classes
        self.cls = [classes.index(s) for s in cost.stages]
        self.hops = [h.time for h in cost.hops]
        if cfg.max_in_flight < 0:
            raise PlanError(f"max_in_flight must be >= 1 (0: one per stage), got {cfg.max_in_flight}")
        m = cfg.max_in_flight or cost.pp
        self.group_seqs = min(-(-cfg.max_seqs // m), cfg.max_batched_tokens)
        split = cfg.prefill_replicas
        self.replicas = [
            _Replica(i, "both" if not split else "prefill" if i < split else "decode", cost.pp, m)
            for i in range(cfg.replicas)
        ]
        load = [0] * cfg.replicas
        self.front = _Pool(list(range(split or cfg.replicas)), load)
        self.back = _Pool(list(range(split, cfg.replicas)), load) if split else None
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.steps = 0
        self.kv_peak = 0
        self.issued = 0

    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        wall = time.perf_counter()
        n = len(self.prompt)
        events, arrival = self.events, self.arrival
        opened = 0  # open loop: requests already arrived
        if self.clients is not None:
            self._arrive(range(min(self.clients, n)), 0.0)
            self.issued = min(self.clients, n)
            opened = n
        inf = float("inf")
        while True:
            t_next = events[0][0] if events else inf
            if opened < n and arrival[opened] <= t_next:
                t, first = arrival[opened], opened
                while opened < n and arrival[opened] == t:
                    opened += 1
                self._arrive(range(first, opened), t)
                continue
            if not events:
                break
            t, _, kind, a, b = heapq.heappop(events)
            if kind == _RETURN:
                self._returned(self.replicas[a], b, t)
            elif kind == _TO_DECODE:
                rep = self.replicas[self.back.pick()]  # type: ignore[union-attr]
                self.back.add(rep.index, 1)  # type: ignore[union-attr]
                rep.ready.append(a)
                self._wake(rep, t)
            else:
                arrival[a] = t
                self._arrive((a,), t)
        return self._result(time.perf_counter() - wall)

    def _arrive(self, rids: Iterable[int], t: float) -> None:
        """Requests arriving at one instant all queue before any micro-batch starts: the engine
        schedules a batch submitted at once together."""
        woken: dict[int, _Replica] = {}
        for rid in rids:
            rep = self.replicas[self.front.pick()]
            self.front.add(rep.index, 1)
            rep.waiting.append(rid)
            woken[rep.index] = rep
        for rep in woken.values():
            self._wake(rep, t)

    def _wake(self, rep: _Replica, t: float) -> None:
        """Start idle micro-batches while there is work to admit (each takes what fits)."""
        while rep.idle and (rep.waiting or rep.ready):
            gi = rep.idle.pop()
            self._start(rep, gi, t)
            if rep.idle and rep.idle[-1] == gi:
                break  # it could admit nothing (no KV room): neither could the others

    def _start(self, rep: _Replica, gi: int, t: float) -> None:
        """Form the group's next step at the head and send it through the stages."""
        g = rep.groups[gi]
        cfg, prompt, output = self.cfg, self.prompt, self.output
        budget = cfg.max_batched_tokens - g.n_dec
        if rep.role == "decode":
            ready = rep.ready
            while ready and g.nseq < self.group_seqs and rep.nseq < cfg.max_seqs:
                rid = ready[0]
                need = prompt[rid] + output[rid]
                if rep.kv_used + need > cfg.kv_tokens:
                    break
                ready.popleft()
                rep.kv_used += need
                rep.nseq += 1
                g.nseq += 1
                g.n_dec += 1
                g.ctx += prompt[rid] + 1
                g.finish.setdefault(g.k + output[rid] - 1, []).append(rid)
        else:
            waiting, keep_output = rep.waiting, rep.role == "both"
            while waiting and g.pf_left < budget and g.nseq < self.group_seqs and rep.nseq < cfg.max_seqs:
                rid = waiting[0]
                need = prompt[rid] + (output[rid] if keep_output else 0)
                if rep.kv_used + need > cfg.kv_tokens:
                    break
                waiting.popleft()
                rep.kv_used += need
                rep.nseq += 1
                g.nseq += 1
                g.prefilling.append([rid, 0])
                g.pf_left += prompt[rid]
        if rep.kv_used > self.kv_peak:
            self.kv_peak = rep.kv_used
        chunk = pairs = reads = 0
        done = g.done
        room = budget
        for entry in g.prefilling:
            if room <= 0:
                break
            rid, did = entry
            c = min(prompt[rid] - did, room)
            pairs += c * did + c * (c + 1) // 2
            reads += did + c
            entry[1] = did + c
            room -= c
            chunk += c
            if did + c == prompt[rid]:
                done.append(rid)
        g.pf_left -= chunk
        tokens = g.n_dec + chunk
        if tokens == 0:
            rep.idle.append(gi)
            return
        self.steps += 1
        graph = chunk == 0
        samples = g.n_dec + len(done)
        kv_reads = g.ctx + reads
        times = [s.time(tokens, kv_reads, g.ctx + pairs, samples, graph) for s in self.classes]
        free, cls, hops, busy = rep.free, self.cls, self.hops, rep.busy
        for j in range(self.pp):
            s = times[cls[j]]
            if free[j] > t:
                t = free[j]
            t += s
            free[j] = t
            busy[j] += s
            t += hops[j](tokens, samples)
        self._push(t, _RETURN, rep.index, gi)

    def _returned(self, rep: _Replica, gi: int, t: float) -> None:
        g = rep.groups[gi]
        prompt, output = self.prompt, self.output
        if g.n_dec:
            g.ctx += g.n_dec
            if self.gaps is not None:
                self.gaps.append((g.last, t, g.n_dec))
        g.last = t
        g.k += 1
        ending = g.finish.pop(g.k, None)
        if ending:
            for rid in ending:
                g.n_dec -= 1
                g.ctx -= prompt[rid] + output[rid]
                self._finish(rep, g, rid, t, prompt[rid] + output[rid])
        if g.done:
            del g.prefilling[: len(g.done)]
            for rid in g.done:
                self.first[rid] = t
                if output[rid] == 1:
                    self._finish(rep, g, rid, t, prompt[rid] + (0 if rep.role == "prefill" else 1))
                elif rep.role == "prefill":
                    rep.kv_used -= prompt[rid]
                    rep.nseq -= 1
                    g.nseq -= 1
                    self.front.add(rep.index, -1)
                    move = self.cfg.kv_move_latency_s + self.cfg.kv_move_s_per_token * prompt[rid]
                    self._push(t + move, _TO_DECODE, rid)
                else:
                    g.n_dec += 1
                    g.ctx += prompt[rid] + 1
                    g.finish.setdefault(g.k + output[rid] - 1, []).append(rid)
            g.done = []
        self._start(rep, gi, t)
        if rep.idle and (rep.waiting or rep.ready):
            self._wake(rep, t)  # room freed here may let an idle micro-batch admit work

    def _finish(self, rep: _Replica, g: _Group, rid: int, t: float, held: int) -> None:
        self.end[rid] = t
        rep.kv_used -= held
        rep.nseq -= 1
        g.nseq -= 1
        (self.back if rep.role == "decode" else self.front).add(rep.index, -1)  # type: ignore[union-attr]
        if self.clients is not None and self.issued < len(self.prompt):
            self._push(t, _ARRIVE, self.issued)
            self.issued += 1

    def _result(self, wall: float) -> SimResult:
        arrival, first, end = np.array(self.arrival), np.array(self.first), np.array(self.end)
        makespan = float(end.max() - arrival.min()) if len(end) else 0.0
        stages = self.cfg.replicas * self.pp
        stage_busy = tuple(sum(r.busy[j] for r in self.replicas) for j in range(self.pp))
        busy = sum(stage_busy) / (stages * makespan) if makespan else 0.0
        return SimResult(
            arrival,
            first,
            end,
            np.array(self.prompt),
            np.array(self.output),
            makespan,
            wall,
            self.steps,
            busy,
            self.kv_peak / self.cfg.kv_tokens if self.cfg.kv_tokens else 0.0,
            None if self.gaps is None else np.array(self.gaps, dtype=float).reshape(-1, 3),
            stage_busy,
        )
