"""The HF backend on a CUDA device: the exactness tests there, then batched throughput at realistic sizes.

Run from the repository root (``make gpu-check``)::

    python tools/gpu_check.py                      # CUDA: tests + throughput of random Qwen2.5-0.5B/1.5B shapes
    python tools/gpu_check.py --skip-tests         # throughput only
    python tools/gpu_check.py --device cpu --quick # the script's own logic on tiny shapes (tests/test_hf.py runs it)

(a) runs ``pytest tests/test_hf.py tests/test_batched.py tests/test_kv_pool.py tests/test_shared_prefix.py`` with
``EGPS_TEST_DEVICE`` set to the device, so the exactness tests (cached vs recomputed to 1e-9 in float64, tiny GPT-2
and tiny Llama; the shared-prefix attention against the copied layout) build their models there. (b) builds
``random-qwen2.5-0.5b`` and ``random-qwen2.5-1.5b`` (random weights, nothing downloaded) in ``--dtype`` (bfloat16 by
default) and measures, per batch size C: sampling C completions from scratch (decode tokens/s), MH steps with the KV
pool (tokens/s, acceptance), one proposal from the middle of the completion with the pool against recomputation from
the prompt, and the peak device memory. One JSON object goes to stdout (and to ``--out``). Without a CUDA device it
stops at once with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ("tests/test_hf.py", "tests/test_batched.py", "tests/test_kv_pool.py", "tests/test_shared_prefix.py")
QUICK_TESTS = ("tests/test_kv_pool.py::test_compacting_a_sorted_prefix_is_a_view_and_equals_the_gather",)
SIZES = ("0.5b", "1.5b")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 1024}  # fmt: skip
"""Config overrides of ``--quick``: the shapes shrink to a 2-layer model so the CPU can run the same code."""


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_device(device: str) -> Any:
    """The torch device, or a one-line failure when it is CUDA and none is usable."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed (run make setup, then install the CUDA build of torch)")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (a CPU-only build)"
            fail(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {build})")
        if (dev.index or 0) >= torch.cuda.device_count():
            fail(f"{device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def run_tests(device: str, quick: bool) -> dict[str, Any]:
    """(a) the exactness tests with their models on ``device``."""
    selected = QUICK_TESTS if quick else TESTS
    env = {**os.environ, "EGPS_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selected]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "command": " ".join(cmd[1:]),
        "device": device,
        "passed": proc.returncode == 0,
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "tail": lines[-30:] if proc.returncode else [],
        "seconds": time.perf_counter() - start,
    }


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak(dev: Any) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def throughput(size: str, dev: Any, dtype: str, chains: Sequence[int], prompt_len: int, new_tokens: int,
               steps: int, quick: bool) -> dict[str, Any]:  # fmt: skip
    """(b) for one model shape: sampling, MH steps and one mid-completion proposal (pool vs recomputation)."""
    import torch

    from egps_ppl.kernels import MetropolisHastings
    from egps_ppl.models.hf import HFModel
    from egps_ppl.models.registry import random_qwen
    from egps_ppl.target import PowerDistribution

    start = time.perf_counter()
    lm = random_qwen(size, device=str(dev), dtype=dtype, config=TINY if quick else None)
    recompute = HFModel(lm.model, lm.tokenizer, name=lm.name, reuse_cache=False)
    _sync(dev)
    params = sum(p.numel() for p in lm.model.parameters())
    out: dict[str, Any] = {"model": lm.name, "parameters": params, "build_seconds": time.perf_counter() - start}
    prompt = torch.randint(257, min(lm.vocab_size, 50000), (prompt_len,), generator=torch.Generator().manual_seed(0))
    rows = []
    for c in chains:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        target = PowerDistribution(lm, prompt.tolist(), alpha=4.0, max_new_tokens=new_tokens)
        kernel = MetropolisHastings(target)
        g = torch.Generator().manual_seed(c)
        t0 = time.perf_counter()
        state, cost = target.sample_proposal(c, g)
        _sync(dev)
        sample_s = time.perf_counter() - t0
        state, _ = kernel.prepare(state)
        decode = accepted = calls = 0
        slots = []
        t0 = time.perf_counter()
        for _ in range(steps):
            state, info = kernel.step(state, g)
            decode += int(info.decode_tokens.sum())
            accepted += int(info.accepted.sum())
            calls += int(info.forward_calls)
            slots.append(state.cache.num_slots if state.cache is not None else 0)
        _sync(dev)
        mh_s = time.perf_counter() - t0
        # One proposal from the middle of every row: with the pool vs prefilling prompt + prefix afresh.
        cut = state.length // 2
        timings = {}
        for name, model, st in (("reuse", lm, state), ("recompute", recompute, state.with_(cache=None))):
            t0 = time.perf_counter()
            model.extend(st, cut, generator=torch.Generator().manual_seed(1))
            _sync(dev)
            timings[name] = time.perf_counter() - t0
        sampled = int(cost.decode_tokens.sum())
        rows.append({
            "chains": c,
            "sample_seconds": sample_s,
            "sample_tokens": sampled,
            "sample_tokens_per_second": sampled / sample_s if sample_s else None,
            "mh_steps": steps,
            "mh_seconds": mh_s,
            "mh_decode_tokens": decode,
            "mh_tokens_per_second": decode / mh_s if mh_s else None,
            "mh_forward_calls": calls,
            "mh_acceptance": accepted / (c * steps),
            "pool_slots_per_step": slots,
            "mid_cut_reuse_seconds": timings["reuse"],
            "mid_cut_recompute_seconds": timings["recompute"],
            "mid_cut_speedup": timings["recompute"] / timings["reuse"] if timings["reuse"] else None,
            "peak_memory_bytes": _peak(dev),
        })  # fmt: skip
        print(f"[{lm.name}] C={c}: sample {rows[-1]['sample_tokens_per_second']:.0f} tok/s, MH "
              f"{rows[-1]['mh_tokens_per_second'] or 0:.0f} tok/s, mid-cut reuse x{rows[-1]['mid_cut_speedup']:.2f}",
              file=sys.stderr, flush=True)  # fmt: skip
    out["rows"] = rows
    del lm, recompute
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --quick")
    parser.add_argument("--dtype", default="bfloat16", help="forward dtype of the throughput models")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one small test (checks the script)")
    parser.add_argument("--skip-tests", action="store_true", help="skip (a), the exactness tests")
    parser.add_argument("--skip-bench", action="store_true", help="skip (b), the throughput benchmark")
    parser.add_argument("--sizes", default=",".join(SIZES), help="model shapes (default 0.5b,1.5b)")
    parser.add_argument("--chains", default=None, help="batch sizes (default 1,16,64; quick: 1,4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dev = check_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    chains = [int(c) for c in args.chains.split(",")] if args.chains else ([1, 4] if args.quick else [1, 16, 64])
    result: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
    }
    if not args.skip_tests:
        result["tests"] = run_tests(str(dev), args.quick)
        print(f"tests on {dev}: {result['tests']['summary']}", file=sys.stderr, flush=True)
    if not args.skip_bench:
        prompt_len, new_tokens, steps = (16, 16, 1) if args.quick else (128, 256, 2)
        result["throughput"] = [
            throughput(size, dev, args.dtype, chains, prompt_len, new_tokens, steps, args.quick)
            for size in args.sizes.split(",")
        ]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if "tests" in result and not result["tests"]["passed"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
