"""Decode and KV-cache prefill speed of our kernels against torch SDPA's flash and cuDNN
backends, side by side in one run, with the GPU's own copy bandwidth as the yardstick.

    python benchmarks/bench_decode.py [--json out.json] [--rounds 3] [--skip-prefill] [--graphs]
    python benchmarks/bench_decode.py --client [--json out.json]   # transformers tokens/s
    python benchmarks/bench_decode.py --graphs --skip-prefill --shapes 34x8192x32x8 --num-splits 3

Decode (one query token per sequence, bf16, causal): GB/s of K+V read, i.e.
batch * seqlen_k * nheads_k * head_dim * 2 (K and V) * 2 bytes / median time, for
- ours-kvcache: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=...), which
  checks the index values (on the GPU, the call returning once the check is done:
  one call in flight at a time); "-unchecked" variants run with
  FLASH_ATTN_KVCACHE_CHECKS=0 (no checks: what a trusted decode loop runs);
- ours-paged16 / ours-paged256: the same over a paged cache (page size 16 / 256);
- ours-func: flash_attn_func(q, k, v, causal=True) (what transformers' FA2 path calls);
- sdpa-flash / sdpa-cudnn: F.scaled_dot_product_attention(..., enable_gqa=True).
--shapes replaces issue 13's four shapes (batch x seqlen_k x nheads x nheads_k), and
--num-splits passes num_splits to our KV-cache calls (0: the kernels' choice).
"copy" is the device-to-device copy bandwidth of the same GPU (bytes read + written
by a 1.5 GiB tensor copy / median time); "ours/copy" is ours-kvcache-unchecked against it (the
target: >= 0.85 at the large shapes).

Prefill through the cache (seqlen_q new tokens into an empty or half-full cache,
batch 1, 32/8 heads, hdim 128, causal, tensor cache_seqlens): TFLOP/s of
flash_attn_with_kvcache (append + attention), with its value checks (the default: the
call waits for the device's verdict) and without, against flash_attn_func on the same keys;
the ratios by CUDA-event time and by wall time (back-to-back calls on the host's clock: a
checked call's wait for its verdict shows there).

--client: a randomly initialised Llama-style model in transformers (no download),
greedy generate(); decode tokens/s with attn_implementation flash_attention_2 and sdpa:
the batch over the median decode step (the time between generate()'s calls of a logits
processor; the prefill is not a step), over --rounds generate() calls of each that
alternate between the two.
The defaults (4 layers, hidden 512, prompt 128) make a step host-bound: transformers'
own code per layer decides it. `--hidden 4096 --heads 32 --kv-heads 8 --prompt 4096
--batches 8,32` makes it GPU-bound: weights and KV cache reads decide it.

Times are medians of CUDA-event timings after warm-up; --rounds keeps each cell's best.
Eager calls back to back include whatever host time the GPU waits for (a slow host makes
the small shapes host-bound, for SDPA as for us); --graphs replays 10 captured calls
instead: the kernels' own time, as a decode step under CUDA graphs runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _timing import graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, seqlen_k, nheads, nheads_k), from issue 13
DECODE_SHAPES = [(1, 32768, 32, 8), (16, 8192, 32, 8), (64, 4096, 32, 8), (8, 65536, 8, 1)]
DECODE_HDIMS = [128, 64, 256]
BACKENDS = ["ours-kvcache", "ours-kvcache-unchecked", "ours-paged16", "ours-paged16-unchecked",
            "ours-paged256-unchecked", "ours-func", "sdpa-flash", "sdpa-cudnn"]  # fmt: skip
UNCHECKED = "-unchecked"  # FLASH_ATTN_KVCACHE_CHECKS=0: no value checks, no device sync
CHECKED = {"ours-kvcache", "ours-paged16"}  # not measured with --graphs (capture skips checks)
PREFILL_SEQLENS = [2048, 4096, 8192, 16384]
DT = torch.bfloat16
CHECKS_ENV = "FLASH_ATTN_KVCACHE_CHECKS"


def time_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 5) -> float:
    """Median of per-call CUDA-event times, the calls issued back to back (one sync at
    the end): the GPU time of a call whose launch keeps ahead of the GPU, as in a
    decode loop. A call that syncs inside (flash_attn_with_kvcache's value checks of
    tensor cache_seqlens) pays for it here."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def wall_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 5) -> float:
    """Milliseconds a call over reps back-to-back calls and one sync, on the host's clock:
    what a caller waits for. For a call that waits inside (the checked KV-cache call waits
    for its index check's verdict) this also counts the wait's exposed part, which the
    CUDA-event time of time_ms does not always show."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps


def copy_gbps(gib: float = 1.5) -> float:
    """Device-to-device copy: bytes read + written per second, in GB/s."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * n / ms / 1e6  # the tensors go back to the cache on return


@dataclass
class DecodeRow:
    batch: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    hdim: int
    backend: str
    ms: float
    gbps: float
    num_splits: int = 0  # what our KV-cache calls were given (0: the kernels' choice)


def decode_fn(
    backend: str, batch: int, seqlen_k: int, nheads: int, nheads_k: int, hdim: int, splits: int = 0
):
    import flash_attn

    dev = "cuda"
    q = torch.randn(batch, 1, nheads, hdim, device=dev, dtype=DT)
    if backend.startswith("ours-paged"):
        page = int(backend.removeprefix("ours-paged"))
        pages_per_seq = -(-seqlen_k // page)
        num_pages = batch * pages_per_seq
        k_pool = torch.randn(num_pages, page, nheads_k, hdim, device=dev, dtype=DT)
        v_pool = torch.randn_like(k_pool)
        table = torch.randperm(num_pages, device=dev, dtype=torch.int32)
        table = table.view(batch, pages_per_seq)
        seqlens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=dev)
        return lambda: flash_attn.flash_attn_with_kvcache(
            q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table, causal=True,
            num_splits=splits,
        )  # fmt: skip
    k = torch.randn(batch, seqlen_k, nheads_k, hdim, device=dev, dtype=DT)
    v = torch.randn_like(k)
    if backend == "ours-kvcache":
        seqlens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=dev)
        return lambda: flash_attn.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=seqlens, causal=True, num_splits=splits
        )
    if backend == "ours-func":
        return lambda: flash_attn.flash_attn_func(q, k, v, causal=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    which = SDPBackend.FLASH_ATTENTION if backend == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    return sdpa


@contextlib.contextmanager
def checks_env(unchecked: bool) -> Iterator[None]:
    """FLASH_ATTN_KVCACHE_CHECKS=0 inside when unchecked, else as it was."""
    saved = os.environ.get(CHECKS_ENV)
    try:
        if unchecked:
            os.environ[CHECKS_ENV] = "0"
        yield
    finally:
        if saved is None:
            os.environ.pop(CHECKS_ENV, None)
        else:
            os.environ[CHECKS_ENV] = saved


def measure_decode(
    backend: str,
    shape: tuple[int, int, int, int],
    hdim: int,
    graphs: bool = False,
    splits: int = 0,
) -> DecodeRow:
    batch, seqlen_k, nheads, nheads_k = shape
    with checks_env(backend.endswith(UNCHECKED)), torch.no_grad():
        base = backend.removesuffix(UNCHECKED)
        fn = decode_fn(base, batch, seqlen_k, nheads, nheads_k, hdim, splits)
        # 10 calls captured (a decode step under CUDA graphs); capture skips the checks
        ms = graph_ms(fn, calls=10, replays=15) if graphs else time_ms(fn)
    kv_bytes = 2 * batch * seqlen_k * nheads_k * hdim * 2
    used = splits if base.startswith(("ours-kvcache", "ours-paged")) else 0
    gbps = kv_bytes / ms / 1e6
    return DecodeRow(batch, seqlen_k, nheads, nheads_k, hdim, backend, ms, gbps, used)


@dataclass
class PrefillRow:
    seqlen_q: int
    cached: int  # keys already in the cache
    backend: str
    ms: float
    tflops: float
    wall_ms: float  # per call, host clock (wall_ms())


def measure_prefill(backend: str, seqlen_q: int, cached: int) -> PrefillRow:
    import flash_attn

    batch, nheads, nheads_k, hdim, dev = 1, 32, 8, 128, "cuda"
    seqlen_k = cached + seqlen_q
    q = torch.randn(batch, seqlen_q, nheads, hdim, device=dev, dtype=DT)
    k_all = torch.randn(batch, seqlen_k, nheads_k, hdim, device=dev, dtype=DT)
    v_all = torch.randn_like(k_all)
    if backend.startswith("ours-kvcache"):
        k_cache, v_cache = k_all.clone(), v_all.clone()
        k_new, v_new = k_all[:, cached:].clone(), v_all[:, cached:].clone()
        seqlens = torch.full((batch,), cached, dtype=torch.int32, device=dev)

        def fn() -> object:
            return flash_attn.flash_attn_with_kvcache(
                q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True
            )
    else:

        def fn() -> object:
            return flash_attn.flash_attn_func(q, k_all, v_all, causal=True)

    with checks_env(backend.endswith(UNCHECKED)), torch.no_grad():
        ms = time_ms(fn, reps=15)
        wall = wall_ms(fn, reps=15)
    # causal, bottom-right aligned: query i sees cached + i + 1 keys
    pairs = batch * nheads * (seqlen_q * cached + seqlen_q * (seqlen_q + 1) / 2)
    return PrefillRow(seqlen_q, cached, backend, ms, 4 * pairs * hdim / ms / 1e9, wall)


# --- the transformers client ------------------------------------------------------------


def build_llama(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device="cuda", dtype=DT).eval()
    return model


def set_attn(model: object, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation  # type: ignore[attr-defined]


def step_seconds(model: object, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Greedy generate() of new_tokens; the seconds of each decode step: the time between
    two consecutive calls of the logits processors (the GPU drained at each; generate()
    waits for the device at every step anyway, to test its stopping criteria). The
    first call closes the prefill, which is not counted."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    with torch.no_grad():
        model.generate(  # type: ignore[attr-defined]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            logits_processor=LogitsProcessorList([Stamp()]),
        )  # fmt: skip
    return [b - a for a, b in zip(stamps, stamps[1:])]


@dataclass
class ClientRow:
    implementation: str
    batch: int
    prompt: int
    new_tokens: int
    decode_tokens_per_s: float


def measure_client(args: argparse.Namespace) -> list[ClientRow]:
    model = build_llama(args.layers, args.hidden, args.heads, args.kv_heads, 32000)
    rows = []
    impls = ("flash_attention_2", "sdpa")
    for batch in args.batches:
        ids = torch.randint(1, 32000, (batch, args.prompt), device="cuda")
        steps: dict[str, list[float]] = {impl: [] for impl in impls}
        for impl in impls:
            set_attn(model, impl)
            step_seconds(model, ids, 8)  # warm-up
        # the rounds alternate the two (ABBA...), so that a drift of the host (its steps are
        # mostly host time) falls on both; the median decode step over the rounds' steps (a
        # prefill is not one: at long prompts its spread alone is as large as the decode's)
        for r in range(args.rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                set_attn(model, impl)
                steps[impl] += step_seconds(model, ids, args.new_tokens)
        for impl in impls:
            tokens_per_s = batch / statistics.median(steps[impl])
            rows.append(ClientRow(impl, batch, args.prompt, args.new_tokens, tokens_per_s))
    return rows


# --- main --------------------------------------------------------------------------------


def decode_cases(
    hdims: list[int], shapes: list[tuple[int, int, int, int]]
) -> list[tuple[tuple[int, int, int, int], int]]:
    return [(shape, hdim) for hdim in hdims for shape in shapes]


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """'34x8192x32x8,...' -> [(batch, seqlen_k, nheads, nheads_k), ...]; ValueError names
    the item that is not four positive integers with nheads a multiple of nheads_k."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split("x")
        try:
            b, s, h, hk = (int(x) for x in parts)
        except ValueError:
            raise ValueError(
                f"{item!r}: give batch x seqlen_k x nheads x nheads_k, e.g. 34x8192x32x8"
            ) from None
        if min(b, s, h, hk) < 1 or h % hk:
            raise ValueError(f"{item!r}: sizes must be >= 1 and nheads a multiple of nheads_k")
        shapes.append((b, s, h, hk))
    return shapes


def run_decode(args: argparse.Namespace) -> tuple[list[DecodeRow], float]:
    copy = max(copy_gbps() for _ in range(args.rounds))
    best: dict[tuple, DecodeRow] = {}
    for _ in range(args.rounds):
        for shape, hdim in decode_cases(args.hdims, args.shapes):
            for backend in args.backends.split(","):
                if args.graphs and backend in CHECKED:
                    continue  # a captured call skips the checks: the unchecked column
                try:
                    r = measure_decode(backend, shape, hdim, args.graphs, args.num_splits)
                except (RuntimeError, NotImplementedError) as e:
                    print(f"  {backend} {shape} hdim {hdim}: {str(e)[:100]}")
                    continue
                finally:
                    torch.cuda.empty_cache()
                key = (shape, hdim, backend)
                if key not in best or r.gbps > best[key].gbps:
                    best[key] = r
    print(f"\ncopy bandwidth (read + write): {copy:.0f} GB/s\n")
    if args.graphs:
        print("(--graphs: each call's GPU time from CUDA graph replays, no host in the way)\n")
    backends = [b for b in args.backends.split(",") if not (args.graphs and b in CHECKED)]
    print("| batch x seqlen_k, q/kv heads | hdim | " + " | ".join(backends) + " | ours/copy |")
    print("|---|---|" + "---|" * len(backends) + "---|")
    for shape, hdim in decode_cases(args.hdims, args.shapes):
        b, s, h, hk = shape
        cells = []
        for backend in backends:
            r = best.get((shape, hdim, backend))
            cells.append(f"{r.gbps:.0f}" if r else "-")
        ours = best.get((shape, hdim, "ours-kvcache-unchecked"))
        ratio = f"{ours.gbps / copy:.2f}" if ours else "-"
        print(f"| {b} x {s}, {h}/{hk} | {hdim} | " + " | ".join(cells) + f" | {ratio} |")
    return list(best.values()), copy


def run_prefill(args: argparse.Namespace) -> list[PrefillRow]:
    rows: list[PrefillRow] = []
    kinds = ("ours-kvcache", "ours-kvcache" + UNCHECKED, "ours-func")
    print("\n| seqlen_q | cached keys | ours-kvcache TFLOP/s | unchecked | ours-func TFLOP/s "
          "| kvcache/func | unchecked/func | by wall time: kvcache/func "
          "| unchecked/func |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for seqlen_q in PREFILL_SEQLENS:
        for cached in (0, seqlen_q):
            got = {}
            for backend in kinds:
                best = max(
                    (measure_prefill(backend, seqlen_q, cached) for _ in range(args.rounds)),
                    key=lambda r: r.tflops,
                )
                torch.cuda.empty_cache()
                got[backend] = best
                rows.append(best)
            kv, un, fn = (got[k].tflops for k in kinds)
            kv_wall, un_wall, fn_wall = (got[k].wall_ms for k in kinds)
            print(f"| {seqlen_q} | {cached} | {kv:.0f} | {un:.0f} | {fn:.0f} | {kv / fn:.3f} "
                  f"| {un / fn:.3f} | {fn_wall / kv_wall:.3f} "
                  f"| {fn_wall / un_wall:.3f} |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="time decode calls as CUDA graph replays (the GPU time, as a serving engine "
        "runs decode) instead of back-to-back eager calls; the checked columns are left out",
    )
    ap.add_argument(
        "--hdims",
        default=",".join(map(str, DECODE_HDIMS)),
        help="decode head dims, comma-separated (default %(default)s)",
    )
    ap.add_argument(
        "--shapes",
        default=",".join("x".join(map(str, s)) for s in DECODE_SHAPES),
        help="decode shapes, batch x seqlen_k x nheads x nheads_k, comma-separated "
        "(default %(default)s: issue 13's)",
    )
    ap.add_argument(
        "--num-splits",
        type=int,
        default=0,
        help="num_splits for our KV-cache calls (default 0: the kernels' choice)",
    )
    ap.add_argument("--client", action="store_true", help="the transformers tokens/s only")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--batches",
        default="1,8",
        help="client batch sizes (comma-separated); with a long --prompt and a large --hidden "
        "the decode step is GPU-bound instead of host-bound",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        args.hdims = [int(h) for h in args.hdims.split(",")]
    except ValueError:
        ap.error(f"--hdims {args.hdims!r}: give head dims as integers, e.g. 64,128")
    if bad := [h for h in args.hdims if h not in DECODE_HDIMS]:
        ap.error(f"--hdims: {bad} not measured here; valid: {DECODE_HDIMS}")
    try:
        args.shapes = parse_shapes(args.shapes)
    except ValueError as e:
        ap.error(f"--shapes {e}")
    if not 0 <= args.num_splits <= 128:
        ap.error(f"--num-splits {args.num_splits}: give 0 (the kernels' choice) to 128")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: give batch sizes as integers, e.g. 1,8")
    if bad := [b for b in args.batches if b < 1]:
        ap.error(f"--batches: {bad} must be at least 1")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
            "timing": "cuda-graph replay" if args.graphs else "eager, back to back"}  # fmt: skip
    print(f"# {meta['gpu']}, torch {meta['torch']}, bf16, {meta['date']}")
    result: dict[str, object] = dict(meta)
    if args.client:
        import transformers

        rows = measure_client(args)
        result["transformers"] = transformers.__version__
        result["client"] = [asdict(r) for r in rows]
        print(f"\ntransformers {transformers.__version__}: Llama {args.layers} layers, hidden "
              f"{args.hidden}, {args.heads}/{args.kv_heads} heads, prompt {args.prompt}, "
              f"{args.new_tokens} new tokens, greedy")  # fmt: skip
        print("| attn_implementation | batch | decode tokens/s |\n|---|---|---|")
        for r in rows:
            print(f"| {r.implementation} | {r.batch} | {r.decode_tokens_per_s:.0f} |")
    else:
        decode, copy = run_decode(args)
        result["copy_gbps"] = copy
        result["decode"] = [asdict(r) for r in decode]
        if not args.skip_prefill:
            result["prefill"] = [asdict(r) for r in run_prefill(args)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
