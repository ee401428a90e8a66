"""A/B of the SDPA kernels for prefill attention, on the engine's own input layout.

    python bench/sdpa_backends.py --lengths 2048,8192 --out results/sdpa_backends.json

Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16. q, k, v are strided
views of one fused qkv buffer [tokens, (32 + 2 x 8) x 128], as the QKV projection leaves them.
Each kernel runs alone (sdpa_kernel with one backend, so a refusal is an error, not a silent
fallback), with grouped-query K/V as they are (enable_gqa) or repeated to the query heads. Cases:
a fresh prompt of n tokens (causal); a last chunk of n / 4 queries over n keys gathered from a
paged cache (causal, bottom-right); n queries with a 4,096-token sliding window (masked). Per
variant: warm median time (CUDA events), the first call at a length not seen before (cuDNN builds
a plan per shape; the shipped attend_fresh pads lengths so that they share one), TFLOP/s on the
causal FLOPs, and the error ||out - ref|| / ||ref|| against fp32 math. The old path (3-D views /
attend_paged: math) is timed beside them.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from gpu_common import card, say, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from trellis.runtime.model import prefill_attention
from trellis.runtime.model.attention_metadata import attend_paged

HEADS, KV_HEADS, DIM, WINDOW = 32, 8, 128, 4096
SCALE = DIM**-0.5
KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def fused_qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [n, 32, 128], k, v [n, 8, 128]: views of one random fused qkv buffer, as in the engine."""
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * DIM, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    return q.view(n, HEADS, DIM), k.view(n, KV_HEADS, DIM), v.view(n, KV_HEADS, DIM)


def four_d(t: torch.Tensor, expand: bool) -> torch.Tensor:
    """[tokens, heads, d] -> [1, heads, tokens, d], K/V repeated to the query heads if asked."""
    if expand and t.shape[1] != HEADS:
        t = t.repeat_interleave(HEADS // t.shape[1], dim=1)
    return t.transpose(0, 1).unsqueeze(0)


def median_ms(fn: Callable[[], Any], reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_ms(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).float()
    return float((out - ref).norm() / ref.norm())


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """fp32 math SDPA with an explicit mask [n, keys]: [1, heads, n, d]."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            *(four_d(t.float(), True) for t in (q, k, v)), attn_mask=allowed, scale=SCALE
        )


def allowed_mask(n: int, start: int, keys: int, window: int | None) -> torch.Tensor:
    distance = torch.arange(start, start + n, device="cuda")[:, None] - torch.arange(keys, device="cuda")
    ok = distance >= 0
    return ok & (distance < window) if window is not None else ok


def variant_row(
    name: str,
    call: Callable[[], torch.Tensor],
    ref: torch.Tensor,
    flops: float,
    cold: Callable[[], Any] | None,
) -> dict[str, Any]:
    try:
        err = rel_error(call(), ref)
        ms = median_ms(call)
        first = first_call_ms(cold) if cold is not None else None
    except RuntimeError as e:  # the kernel refused this input
        say(f"  {name:34s} refused: {str(e).splitlines()[0][:90]}")
        return {"variant": name, "refused": str(e).splitlines()[0]}
    say(
        f"  {name:34s} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  err {err:.2e}"
        + (f"  first call at a new length {first:8.2f} ms" if first is not None else "")
    )
    return {"variant": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_error": err, "first_call_ms": first}


def fresh_case(n: int) -> list[dict[str, Any]]:
    q, k, v = fused_qkv(n)
    ref = reference(q, k, v, allowed_mask(n, 0, n, None))
    flops = 2 * n * (n + 1) * HEADS * DIM
    rows = [
        variant_row(
            "old: 3-D views (math)",
            lambda: F.scaled_dot_product_attention(
                *(t.transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=SCALE, enable_gqa=True
            ),
            ref,
            flops,
            None,
        )
    ]
    for kname, backend in KERNELS.items():
        for expand in (False, True):
            other = fused_qkv(n + 8 * (len(rows) + 1))  # an unseen length for the first-call time

            def call(t: tuple = (q, k, v), b: SDPBackend = backend, e: bool = expand) -> torch.Tensor:
                with sdpa_kernel([b]):
                    return F.scaled_dot_product_attention(
                        *(four_d(x, e) for x in t), is_causal=True, scale=SCALE, enable_gqa=not e
                    )

            name = f"{kname} {'K/V expanded' if expand else 'GQA'}"
            rows.append(variant_row(name, call, ref, flops, lambda c=call, o=other: c(o)))
    # attend_fresh with long prompts on cuDNN, padded: its first call is at n - 8 tokens, which
    # pads to the plan already built for n.
    shorter = fused_qkv(n - 8)
    prefill_attention.LONG_PROMPTS_ON_CUDNN = True
    rows.append(
        variant_row(
            "attend_fresh, cuDNN padded",
            lambda: prefill_attention.attend_fresh(q, k, v, scale=SCALE).transpose(0, 1),
            ref,
            flops,
            lambda: prefill_attention.attend_fresh(*shorter, scale=SCALE),
        )
    )
    prefill_attention.LONG_PROMPTS_ON_CUDNN = False
    return [{"case": f"fresh {n}", **r} for r in rows]


def paged(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat caches [slots, 8, 128] holding n keys at shuffled 16-token blocks, and their slots."""
    blocks = -(-n // 16) + 8
    k_cache, v_cache = (
        torch.randn(blocks * 16, KV_HEADS, DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv"
    )
    table = torch.randperm(blocks, device="cuda")[: -(-n // 16)]
    slots = (table[:, None] * 16 + torch.arange(16, device="cuda")).flatten()[:n]
    return k_cache, v_cache, slots


def context_case(n: int) -> list[dict[str, Any]]:
    chunk, start = n // 4, n - n // 4
    q = fused_qkv(chunk)[0]
    k_cache, v_cache, slots = paged(n)
    ref = reference(q, k_cache[slots], v_cache[slots], allowed_mask(chunk, start, n, None))
    flops = 2 * 2 * chunk * (start + (chunk + 1) / 2) * HEADS * DIM
    rows = [
        variant_row(
            "old: attend_paged (dense mask, math)",
            lambda: attend_paged(
                q, k_cache, v_cache, slots, start, scale=SCALE, sliding_window=None
            ).transpose(0, 1),
            ref,
            flops,
            None,
        )
    ]
    for kname in ("flash", "efficient"):
        for expand in (False, True):

            def call(b: SDPBackend = KERNELS[kname], e: bool = expand) -> torch.Tensor:
                with sdpa_kernel([b]):  # gather + (expand) + kernel, as the engine does
                    return F.scaled_dot_product_attention(
                        four_d(q, e),
                        four_d(k_cache[slots], e),
                        four_d(v_cache[slots], e),
                        attn_mask=causal_lower_right(chunk, n),
                        scale=SCALE,
                        enable_gqa=not e,
                    )

            name = f"lower-right {kname} {'K/V expanded' if expand else 'GQA'}"
            rows.append(variant_row(name, call, ref, flops, None))
    return [{"case": f"chunk {chunk} after {start}", **r} for r in rows]


def window_case(n: int) -> list[dict[str, Any]]:
    q = fused_qkv(n)[0]
    k_cache, v_cache, slots = paged(n)
    allowed = allowed_mask(n, 0, n, WINDOW)
    ref = reference(q, k_cache[slots], v_cache[slots], allowed)
    seen = sum(min(i + 1, WINDOW) for i in range(n))
    flops = 2 * 2 * seen * HEADS * DIM
    old = variant_row(
        "old: attend_paged (dense mask, math)",
        lambda: attend_paged(q, k_cache, v_cache, slots, 0, scale=SCALE, sliding_window=WINDOW).transpose(
            0, 1
        ),
        ref,
        flops,
        None,
    )

    def masked() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(
                *(four_d(t, True) for t in (q, k_cache[slots], v_cache[slots])),
                attn_mask=allowed,
                scale=SCALE,
            )

    new = variant_row("efficient, bool mask, K/V expanded", masked, ref, flops, None)
    return [{"case": f"window {WINDOW}, {n} tokens", **r} for r in (old, new)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    info = card()
    say(f"card: {info['name']}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    varlen = None
    try:
        from torch.nn.attention import varlen as varlen_module

        varlen = str(inspect.signature(varlen_module.varlen_attn))
    except (ImportError, AttributeError) as e:
        varlen = f"absent: {e}"
    say(f"torch.nn.attention.varlen.varlen_attn: {varlen}")
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.lengths.split(",")):
        for case in (fresh_case, context_case, window_case):
            if case is window_case and n <= WINDOW:
                continue  # the window cuts nothing
            say(f"{case.__name__} n={n}")
            rows += case(n)
            torch.cuda.empty_cache()
    write_json(args.out, {"format": "trellis-sdpa-ab/1", "card": info, "varlen_attn": varlen, "rows": rows})


if __name__ == "__main__":
    main()
