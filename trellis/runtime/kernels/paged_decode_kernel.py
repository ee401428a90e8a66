"""The paged decode attention kernel itself; paged_decode.py checks inputs, picks splits and launches it.

A program owns one (sequence, kv head, split). With one split it writes the output directly. With
several, every split writes a partial output and its log-sum-exp, then counts itself done on a
per-(sequence, kv head) counter; the program that arrives last combines the partials into the
output and puts the counter back to 0. So split-K costs one launch, not two, and the kernel can be
replayed in a CUDA graph with no memset in between: every launch leaves all counters at 0.
"""

from __future__ import annotations

from trellis.runtime.kernels.triton_setup import tl, triton


@triton.jit
def _attend_tile(
    q,  # [BLOCK_G, BLOCK_D]
    m,  # [BLOCK_G] running max score (log2 units)
    total,  # [BLOCK_G] running sum of exp2(score - m)
    acc,  # [BLOCK_G, BLOCK_D] running sum of p * v
    start,
    hi,
    table,  # this sequence's block table row
    k_base,  # k cache at this kv head
    v_base,
    block_stride,  # shared by both caches
    pos_stride,
    scale_log2,
    dims,
    dim_mask,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Folds positions [start, min(start + TILE, hi)) into the online softmax state."""
    positions = start + tl.arange(0, TILE)
    valid = positions < hi
    blocks = tl.load(table + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    in_block = positions % BLOCK_SIZE
    # K is gathered straight into [BLOCK_D, TILE] (dims fastest) so it feeds tl.dot without a transpose;
    # V is loaded before the softmax math so both loads are in flight together.
    rows = blocks * block_stride + in_block * pos_stride
    k_t = tl.load(
        k_base + rows[None, :] + dims[:, None], mask=dim_mask[:, None] & valid[None, :], other=0.0
    )  # [BLOCK_D, TILE]
    v = tl.load(
        v_base + rows[:, None] + dims[None, :], mask=valid[:, None] & dim_mask[None, :], other=0.0
    )  # [TILE, BLOCK_D]
    scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_G, TILE]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    total = total * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, total, acc


@triton.jit
def _combine_splits(
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] float32 contiguous
    partial_lse_ptr,  # [B, Hq, NUM_SPLITS] float32 contiguous, log2 units
    out_ptr,  # [B, Hq, D] with strides
    out_seq_stride,
    out_head_stride,
    seq,
    kv_head,
    num_kv_heads,
    dims,
    dim_mask,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Writes the output of the GROUP query heads of (seq, kv_head): the splits' partial outputs
    weighted by their softmax mass. Rows are the real heads (padded to a power of 2, not to 16 as for
    tl.dot), and the split loop is unrolled, so all partial loads can be in flight together.
    Loads are '.cg' (L2, not L1): the partials were written by other SMs, and L1 is not coherent."""
    rows = tl.arange(0, BLOCK_GROUP)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    head_rows = seq * num_kv_heads * GROUP + heads  # flat (sequence, query head), as the partials
    splits = tl.arange(0, BLOCK_S)
    lse_all = tl.load(
        partial_lse_ptr + head_rows[:, None] * NUM_SPLITS + splits[None, :],
        mask=row_mask[:, None] & (splits[None, :] < NUM_SPLITS),
        other=float("-inf"),
        cache_modifier=".cg",
    )  # [BLOCK_GROUP, BLOCK_S]
    top = tl.max(lse_all, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # every share empty: all weights become 0
    mask = row_mask[:, None] & dim_mask[None, :]
    total = tl.zeros_like(top)
    acc = tl.zeros([BLOCK_GROUP, BLOCK_D], tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        slot = head_rows * NUM_SPLITS + split
        lse = tl.load(partial_lse_ptr + slot, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(
            partial_out_ptr + slot[:, None] * HEAD_DIM + dims[None, :],
            mask=mask,
            other=0.0,
            cache_modifier=".cg",
        )
        weight = tl.exp2(lse - top)
        total += weight
        acc += part * weight[:, None]
    result = acc / tl.where(total > 0, total, 1.0)[:, None]
    dst = out_ptr + seq * out_seq_stride + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def paged_decode_kernel(
    q_ptr,  # [B, Hq, D] with strides
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] with strides (the same for both caches)
    v_cache_ptr,
    block_tables_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D] with strides
    partial_out_ptr,  # [B, Hq, NUM_SPLITS, D] float32 contiguous (NUM_SPLITS > 1)
    partial_lse_ptr,  # [B, Hq, NUM_SPLITS] float32 contiguous, log2 units
    split_counters_ptr,  # [B, Hk] int32, all 0 between launches (NUM_SPLITS > 1)
    q_seq_stride,
    q_head_stride,
    cache_block_stride,
    cache_pos_stride,
    cache_head_stride,
    table_stride,
    out_seq_stride,
    out_head_stride,
    scale_log2,  # softmax scale * log2(e): scores live in base 2 so exp2 does the work
    window,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,  # GROUP rounded up to a power of 2 (>= 2): the combine's rows
    BLOCK_S: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + seq)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(context - window, 0)
    # This program's share [lo, hi) of the attended positions, tile aligned, possibly empty.
    chunk = tl.cdiv(tl.cdiv(context - first, NUM_SPLITS), TILE) * TILE
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, context)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + rows  # query heads of this kv head
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM  # constant true when HEAD_DIM is a power of 2 (>= 16)
    q = tl.load(
        q_ptr + seq * q_seq_stride + heads[:, None] * q_head_stride + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max score (log2 units)
    total = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of p * v
    table = block_tables_ptr + seq * table_stride
    k_base = k_cache_ptr + kv_head * cache_head_stride
    v_base = v_cache_ptr + kv_head * cache_head_stride
    if INTERPRET:
        # Triton 3.6's interpreter cannot run a for loop with tensor bounds under numpy >= 2.4
        # (triton-lang/triton#9171); a while loop does the same steps.
        start = lo
        while start < hi:
            m, total, acc = _attend_tile(
                q,
                m,
                total,
                acc,
                start,
                hi,
                table,
                k_base,
                v_base,
                cache_block_stride,
                cache_pos_stride,
                scale_log2,
                dims,
                dim_mask,
                BLOCK_SIZE,
                TILE,
                DOT_PRECISION,
            )
            start += TILE
    else:
        for start in range(lo, hi, TILE):
            m, total, acc = _attend_tile(
                q,
                m,
                total,
                acc,
                start,
                hi,
                table,
                k_base,
                v_base,
                cache_block_stride,
                cache_pos_stride,
                scale_log2,
                dims,
                dim_mask,
                BLOCK_SIZE,
                TILE,
                DOT_PRECISION,
            )

    # An empty share (or context 0, a padding row) leaves total == 0: output zeros, weight zero.
    safe_total = tl.where(total > 0, total, 1.0)
    result = acc / safe_total[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + seq * out_seq_stride + heads[:, None] * out_head_stride + dims[None, :]
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        head_rows = seq * tl.num_programs(1) * GROUP + heads  # [BLOCK_G] flat (sequence, query head)
        slot = head_rows * NUM_SPLITS + split
        tl.store(partial_out_ptr + slot[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(total > 0, m + tl.log2(safe_total), float("-inf"))
        tl.store(partial_lse_ptr + slot, lse, mask=row_mask)
        # Every thread's partial stores are done before one thread publishes them: the barrier
        # orders them within the program, the atomic's release makes them visible GPU-wide, and its
        # acquire makes the other splits' partials visible to the program that arrives last.
        tl.debug_barrier()
        counter = split_counters_ptr + seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")  # the count before this one
        if arrived == NUM_SPLITS - 1:
            _combine_splits(
                partial_out_ptr,
                partial_lse_ptr,
                out_ptr,
                out_seq_stride,
                out_head_stride,
                seq,
                kv_head,
                tl.num_programs(1),
                dims,
                dim_mask,
                GROUP,
                HEAD_DIM,
                NUM_SPLITS,
                BLOCK_GROUP,
                BLOCK_S,
                BLOCK_D,
            )
            tl.store(counter, 0)  # every split has counted: ready for the next launch or replay
