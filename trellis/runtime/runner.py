"""The per-rank engine of one stage: applies each step plan's diffs, runs the stage's layers, and on
the last stage samples. The orchestration moves plans and hidden states; this object owns the model,
the KV cache and every sequence's block table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from trellis.core import log
from trellis.core.errors import ModelError
from trellis.core.model_config import ModelConfig, check_parallel
from trellis.core.plan import SeqStep, StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.runtime.cuda_graphs import DecodeGraphs
from trellis.runtime.kv_copy import StoreCopies
from trellis.runtime.model.attention import StepContext
from trellis.runtime.model.attention_backend import AttentionBackend, TorchReferenceBackend
from trellis.runtime.model.attention_metadata import AttentionMetadata, build_attention_metadata
from trellis.runtime.model.kv_cache import KVCache, kv_cache_bytes_per_block
from trellis.runtime.model.loader import build_stage_model
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.sampler import Sampler

logger = log.get()


class PlanError(Exception):
    """A step plan this stage cannot apply (unknown sequence, block table gap, ...), told in one line."""


@dataclass
class _SeqState:
    sampling: SamplingParams
    block_table: list[int]


class StageRunner:
    """Layers ``[a, b)`` of the model on one TP rank, with their KV cache and every sequence's block table."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layers: tuple[int, int],
        tp: TPGroup,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int | None,  # None: as many as fit the GPU (gpu_memory_utilization)
        model_path: str | None,
        load_format: str = "auto",
        seed: int = 0,
        backend: AttentionBackend | None = None,
        cuda_graphs: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,  # the largest decode batch, hence the largest CUDA graph
        gpu_memory_utilization: float = 0.85,
        one_shot_max_bytes: int = 0,
    ):
        check_parallel(cfg, tp.size, layers)
        if block_size <= 0 or (num_blocks is not None and num_blocks <= 0):
            raise ModelError(
                f"block_size and num_blocks must be positive (num_blocks None: fit the GPU), "
                f"got {block_size} and {num_blocks}"
            )
        self.cfg = cfg
        self.tp = tp
        self.device = torch.device(device)
        self.block_size = block_size
        self._store = StoreCopies(cfg, layers, tp, block_size, str(dtype).removeprefix("torch."), self.device)
        self.kv_failed = False  # the last plan's KV copies failed on some rank of this stage
        self.kv_sums: tuple[int, ...] = ()  # the last plan's hand-off checksums on this stage
        self.model = build_stage_model(
            cfg,
            layers=layers,
            tp=tp,
            device=self.device,
            dtype=dtype,
            model_path=model_path,
            load_format=load_format,
            seed=seed,
        )
        self.is_first, self.is_last = self.model.is_first, self.model.is_last
        on_gpu = self.device.type == "cuda"
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(layers, dtype, gpu_memory_utilization)
        self.num_blocks: int = num_blocks
        if on_gpu:
            self.model.use_fused_kernels()
            # Before graph capture, so the graphs record the one-shot kernel for the sizes it takes.
            if one_shot_max_bytes and not tp.enable_one_shot(self.device, one_shot_max_bytes):
                logger.warning("one-shot all-reduce unavailable here; NCCL takes every all-reduce")
        self.kv_cache = KVCache(
            cfg,
            layers=layers,
            tp=tp.size,
            block_size=block_size,
            num_blocks=num_blocks + 1,  # the last block is scratch: padded graph rows write there
            dtype=dtype,
            device=self.device,
        )
        if backend is None and on_gpu:
            from trellis.runtime.model.gpu_backend import GpuAttentionBackend  # needs triton

            backend = GpuAttentionBackend()
        self.backend: AttentionBackend = backend or TorchReferenceBackend()
        self.sampler = Sampler(seed, self.device)
        self.seqs: dict[int, _SeqState] = {}
        self.last_logits: torch.Tensor | None = None  # [sampled rows, vocab] float32, last stage only
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and on_gpu:
            max_len = max_model_len or cfg.max_position_embeddings
            self.graphs = DecodeGraphs(
                forward=self._graph_forward,
                is_first=self.is_first,
                hidden_size=cfg.hidden_size,
                dtype=dtype,
                device=self.device,
                block_size=block_size,
                scratch_block=num_blocks,
                max_batch=max_num_seqs,
                max_blocks_per_seq=-(-max_len // block_size),
            )
            self.graphs.capture()
        logger.info(
            "stage runner ready",
            layers=list(layers),
            tp_rank=tp.rank,
            tp_size=tp.size,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=str(dtype),
        )

    def _blocks_that_fit(self, layers: tuple[int, int], dtype: torch.dtype, utilization: float) -> int:
        """KV blocks that fit in `utilization` of the GPU after the weights, less room for graphs
        and activations; the minimum over the TP group, so every rank agrees."""
        if self.device.type != "cuda":
            raise ModelError("num_blocks unset (fit the memory) needs a CUDA device; give num_blocks on CPU")
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = 2 << 30  # CUDA graphs' pool, logits, activations of the largest prefill chunk
        budget = int(total * utilization) - (total - free) - reserve
        n = max(0, budget) // kv_cache_bytes_per_block(self.cfg, layers, self.tp.size, self.block_size, dtype)
        if self.tp.size > 1:
            t = torch.tensor([n], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.tp.group)
            n = int(t.item())
        if n < 1:
            raise ModelError(
                f"no room for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} "
                f"GiB after loading the weights (gpu_memory_utilization {utilization})"
            )
        return n

    @staticmethod
    def num_blocks_for(
        memory_bytes: int,
        cfg: ModelConfig,
        *,
        layers: tuple[int, int],
        tp: int,
        block_size: int,
        dtype: torch.dtype,
    ) -> int:
        """How many KV blocks fit in ``memory_bytes`` on one rank of this stage."""
        return memory_bytes // kv_cache_bytes_per_block(cfg, layers, tp, block_size, dtype)

    def release(self) -> None:
        """Free the CUDA graphs (and the memory they pin) before the process group is torn down."""
        self.graphs = None
        self._store.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def own_slab(self, name: str, slots: torch.Tensor) -> None:
        """A hand-off slab this process allocated in GPU memory (see trellis/runtime/device_slab.py)."""
        self._store.own(name, slots)

    def execute(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult | None:
        """Run one step. Returns hidden [tokens, hidden_size] on a non-last stage, a StepResult on the
        last stage's TP rank 0, and None on the last stage's other ranks."""
        self._apply_diffs(plan)
        for step in plan.seqs:
            self._check_step(step)
        self.kv_failed = self._store.apply(plan, self.kv_cache.data, self.num_blocks)
        out = self._compute(plan, hidden)
        self.kv_sums = ()
        if plan.summed_copies:  # hand-off copies: the sends, then every slot's checksum
            failed, self.kv_sums = self._store.finish(plan, self.kv_cache.data, self.num_blocks)
            self.kv_failed = self.kv_failed or failed
            if isinstance(out, StepResult):
                out = dataclasses.replace(out, kv_failed=self.kv_failed, kv_sums=self.kv_sums)
        return out

    def _compute(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult | None:
        if not plan.seqs and self.is_last:  # a plan that only copied KV (the head's idle saves)
            return StepResult(plan.step_id, (), (), kv_failed=self.kv_failed) if self.tp.is_leader else None
        if plan.decode_steps > 1:
            return self._execute_burst(plan)
        if self._graphable(plan):
            return self._execute_graph(plan, hidden)
        meta = build_attention_metadata(
            [s.start_pos for s in plan.seqs],
            [len(s.token_ids) for s in plan.seqs],
            [self.seqs[s.seq_id].block_table for s in plan.seqs],
            block_size=self.block_size,
            device=self.device,
        )
        out = self._run_layers(plan, hidden, meta) if plan.seqs else self._empty_hidden()
        if not self.is_last:
            return out
        return self._sample(plan, out)

    # ---- the CUDA-graph path: decode-only steps ----------------------------------------------------
    def _graphable(self, plan: StepPlan) -> bool:
        g = self.graphs
        return (
            g is not None
            and bool(plan.seqs)
            and len(plan.seqs) <= g.max_batch
            and all(len(s.token_ids) == 1 for s in plan.seqs)
        )

    def _graph_forward(self, meta: AttentionMetadata, inputs: torch.Tensor) -> torch.Tensor:
        """What a graph captures: the stage's layers (and the LM head on the last stage)."""
        cos, sin = self.model.rotary_angles(meta.positions)
        self.backend.begin_step(meta)
        ctx = StepContext(meta=meta, kv_cache=self.kv_cache, backend=self.backend, cos=cos, sin=sin)
        out = self.model(inputs, ctx)
        return self.model.compute_logits(out) if self.is_last else out

    def _execute_graph(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult | None:
        inputs = [s.token_ids[0] for s in plan.seqs] if self.is_first else hidden
        out = self.graphs.run(
            inputs, [s.start_pos for s in plan.seqs], [self.seqs[s.seq_id].block_table for s in plan.seqs]
        )
        if not self.is_last:
            return out.clone()  # the graph's output buffer is overwritten by the next replay
        rows = [i for i, s in enumerate(plan.seqs) if s.sample]  # a 1-token prefill chunk may not sample
        if len(rows) < len(plan.seqs):
            out = out[torch.tensor(rows, dtype=torch.int64, device=self.device)]
        return self._sampled_result(plan, [plan.seqs[i] for i in rows], out)

    # ---- decode bursts: several greedy steps, the tokens fed back on the device ---------------------
    def _execute_burst(self, plan: StepPlan) -> StepResult | None:
        """Run plan.decode_steps greedy decode steps of every sequence in a row; one host sync at the
        end. Every TP rank picks the same argmax from the same gathered logits, so ranks stay in step."""
        if not (self.is_first and self.is_last):
            raise PlanError(f"step {plan.step_id}: a decode burst needs the whole model on one stage")
        if any(self.seqs[s.seq_id].sampling.logprobs is not None for s in plan.seqs):
            # The scheduler never bursts these: a burst's argmax loop stays free of logprob work.
            raise PlanError(f"step {plan.step_id}: a decode burst cannot report logprobs")
        steps, n = plan.decode_steps, len(plan.seqs)
        tables = [self.seqs[s.seq_id].block_table for s in plan.seqs]
        picked = torch.empty(steps, n, dtype=torch.int64, device=self.device)
        tokens: list[int] | torch.Tensor = [s.token_ids[0] for s in plan.seqs]
        first_logits = None
        for k in range(steps):
            positions = [s.start_pos + k for s in plan.seqs]
            if self._graphable(plan):
                logits = self.graphs.run(tokens, positions, tables)
            else:
                logits = self._eager_decode(plan, tokens, positions, tables)
            if k == 0 and plan.return_logits:  # the graph's buffer is overwritten by the next step
                first_logits = logits.clone()
            torch.argmax(logits, dim=-1, out=picked[k])
            tokens = picked[k]
        self.last_logits = first_logits
        if not self.tp.is_leader:
            return None
        per_seq = picked.t().tolist()  # the one sync of the burst
        return StepResult(
            step_id=plan.step_id,
            seq_ids=tuple(s.seq_id for s in plan.seqs),
            token_ids=tuple(t for row in per_seq for t in row),
            steps=steps,
            logits=first_logits.cpu() if plan.return_logits else None,
            kv_failed=self.kv_failed,
        )

    def _eager_decode(
        self, plan: StepPlan, tokens: list[int] | torch.Tensor, positions: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        step_plan = StepPlan(
            plan.step_id,
            tuple(
                SeqStep(s.seq_id, p, (t,), len(tab), (), True)
                for s, p, t, tab in zip(plan.seqs, positions, ids, tables, strict=True)
            ),
        )
        meta = build_attention_metadata(
            positions, [1] * len(positions), tables, block_size=self.block_size, device=self.device
        )
        return self.model.compute_logits(self._run_layers(step_plan, None, meta))

    def _apply_diffs(self, plan: StepPlan) -> None:
        for seq_id in plan.finished:
            self.seqs.pop(seq_id, None)
        for request in plan.new_requests:
            if request.seq_id in self.seqs:
                raise PlanError(f"step {plan.step_id}: new request {request.seq_id} is already running")
            self.seqs[request.seq_id] = _SeqState(sampling=request.sampling, block_table=[])
        for step in plan.seqs:
            state = self.seqs.get(step.seq_id)
            if state is None:
                raise PlanError(f"step {plan.step_id}: unknown sequence {step.seq_id}")
            if step.block_table_start > len(state.block_table):
                raise PlanError(
                    f"step {plan.step_id}: sequence {step.seq_id} block_table_start {step.block_table_start} "
                    f"is past its table of {len(state.block_table)} blocks"
                )
            if any(not 0 <= b < self.num_blocks for b in step.new_blocks):
                raise PlanError(
                    f"step {plan.step_id}: sequence {step.seq_id} has a block id outside "
                    f"[0, {self.num_blocks})"
                )
            state.block_table[step.block_table_start :] = step.new_blocks

    def _check_step(self, step: SeqStep) -> None:
        if not step.token_ids:
            raise PlanError(f"sequence {step.seq_id} is fed no tokens")
        needed = step.start_pos + len(step.token_ids)
        have = len(self.seqs[step.seq_id].block_table) * self.block_size
        if needed > have:
            raise PlanError(f"sequence {step.seq_id} needs {needed} cache slots but its blocks hold {have}")

    def _run_layers(
        self, plan: StepPlan, hidden: torch.Tensor | None, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self.is_first:
            ids = [t for s in plan.seqs for t in s.token_ids]
            inputs = torch.tensor(ids, dtype=torch.int64).to(self.device)
        else:
            expected = (plan.num_tokens, self.cfg.hidden_size)
            if hidden is None or tuple(hidden.shape) != expected:
                got = None if hidden is None else list(hidden.shape)
                raise PlanError(
                    f"step {plan.step_id}: expected hidden states of shape {list(expected)}, got {got}"
                )
            inputs = hidden.to(self.device)
        cos, sin = self.model.rotary_angles(meta.positions)
        self.backend.begin_step(meta)
        ctx = StepContext(meta=meta, kv_cache=self.kv_cache, backend=self.backend, cos=cos, sin=sin)
        return self.model(inputs, ctx)  # [tokens, hidden]

    def _empty_hidden(self) -> torch.Tensor:
        return torch.empty(0, self.cfg.hidden_size, dtype=self.model.dtype, device=self.device)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor) -> StepResult | None:
        rows, sampled = [], []
        end = 0
        for step in plan.seqs:
            end += len(step.token_ids)
            if step.sample:
                rows.append(end - 1)  # the last fed token's row predicts the next token
                sampled.append(step)
        picked = hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)]
        return self._sampled_result(plan, sampled, self.model.compute_logits(picked))

    def _sampled_result(
        self, plan: StepPlan, sampled: list[SeqStep], logits: torch.Tensor
    ) -> StepResult | None:
        self.last_logits = logits  # [rows, vocab], identical on every rank
        if not self.tp.is_leader:
            return None
        params = [self.seqs[s.seq_id].sampling for s in sampled]
        # On the device, after any CUDA graph's replay and before the next overwrites its logits.
        tokens, logprobs = self.sampler.sample(self.last_logits, params, [s.output_index for s in sampled])
        return StepResult(
            step_id=plan.step_id,
            seq_ids=tuple(s.seq_id for s in sampled),
            token_ids=tuple(tokens),
            logits=self.last_logits.cpu() if plan.return_logits else None,
            logprobs=logprobs,
            kv_failed=self.kv_failed,
        )
