"""Teacher/student scoring on a GPU: the engine vs the naive way, plus model FLOP utilization (MFU).

The default model cannot travel to the GPU machine (and is too small to fill one), so the models here are
random-initialised from realistic Llama/Qwen configs: weights do not change FLOPs or kernels. The
interactions are the real ShareGPT ones of `bench_scoring.py`, exported as token ids on a machine with the
data (`python bench/bench_scoring.py --n 256 --export-jobs .bench/jobs_default.json.gz`); their ids come
from the default tokenizer (vocabulary 49,152), valid inputs for any of these larger vocabularies.

    python bench/bench_scoring_gpu.py --jobs .bench/jobs_default.json.gz --models qwen2.5-0.5b llama-3.2-3b

Per model, in one process on one GPU (bf16, SDPA attention):
- naive: per interaction two full forwards (student prompt + response, teacher prompt + response), logits
  and a float32 log-softmax at every position, the response positions picked out;
- engine: `sdpo_platform.scoring.score_jobs` (each group's prefix tree run once: the teacher/student shared
  prefix, and a conversation's earlier turns inside its later ones; length-sorted padded batches under a token
  budget, head + float32 log-softmax only at response positions, teacher top-k 20).
Both exclude tokenization (the ids are given). MFU = the FLOPs a method needs (matmuls 2 x params per
token, attention 4 x layers x heads x head_dim x context per token, LM head where it is applied; padding
not counted) / wall time / the GPU's dense bf16 peak (datasheet, and the matmul rate measured here).
First, exactness on CUDA in float32: the engine's padded batches vs one-sequence-at-a-time forwards.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scoring import naive_scores  # noqa: E402  (the same naive way as the CPU benchmark)
from sdpo_platform.prefix_tree import build_prefix_tree  # noqa: E402
from sdpo_platform.scoring import GPU_TOKEN_BUDGET, BranchJob, plan_batches, score_jobs  # noqa: E402

# Shapes of public checkpoints (config.json), random-initialised here.
CONFIGS = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960),
}
# dense bf16 peaks; the PCIe/NVL parts first, since "H100" is also a substring of their names
DATASHEET_BF16_DENSE = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
MIN_TRANSFORMERS = (5, 24)  # pyproject's pin


def build_model(name: str, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class FlopCounter:
    """FLOPs a forward needs, from the config: matmul weights, attention over the context, the LM head."""

    def __init__(self, config):
        h, layers = config.hidden_size, config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        self.per_token = 2 * layers * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size)
        self.attention_per_key = 4 * layers * q  # QK^T and AV, per (query, key) pair
        self.head_per_position = 2 * h * config.vocab_size

    def tokens(self, start: int, stop: int) -> float:
        """Tokens at positions [start, stop) each attending to every position up to its own."""
        n = stop - start
        keys = (start + 1 + stop) * n / 2
        return n * self.per_token + keys * self.attention_per_key

    def naive(self, job) -> float:
        return sum(self.tokens(0, len(p) + len(job.response_ids)) + (len(p) + len(job.response_ids)) * self.head_per_position for p in job.prompts)

    def engine(self, jobs, budget: int) -> float:
        """What the engine runs: each node of each group's prefix tree once, the head at response positions."""
        flops = 0.0
        for group in plan_batches(jobs, budget):
            tree = build_prefix_tree([list(p) + list(jobs[i].response_ids[:-1]) for i in group for p in jobs[i].prompts])
            flops += sum(self.tokens(s, e) for s, e in zip(tree.start, tree.end))
            flops += sum(len(jobs[i].prompts) * len(jobs[i].response_ids) for i in group) * self.head_per_position
        return flops


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def max_diff(engine, naive) -> tuple[float, float]:
    import numpy as np

    diffs = np.concatenate([np.abs(e - n) for scores, branches in zip(engine, naive) for e, n in zip(scores.logprobs, branches)])
    return float(diffs.max()), float(diffs.mean())


def measured_matmul_peak(device) -> float:
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


# Kernel families, by name, in the order they are tried (cuBLAS/CUTLASS GEMMs on Hopper are nvjet/sm90 kernels).
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "gemv")),
    ("top-k/sort", ("topk", "sort", "radix")),
    ("copy/gather/cat", ("copy", "cat", "index", "gather", "scatter", "fill", "memcpy", "memset")),  # memcpy: host → device
    ("reduction/softmax", ("reduce", "softmax", "norm", "logsumexp")),
    ("elementwise", ("elementwise",)),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, keys in KERNEL_FAMILIES if any(k in lowered for k in keys)), "other")


def profile_engine(model, jobs, pad_id, budget: int, path: Path, sync) -> dict:
    """Where one engine run's time goes on the device: kernel time per family, how busy the GPU was
    (kernel time / wall: the rest is the host launching work), the costliest kernels. Written to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        score_jobs(model, jobs, pad_id, token_budget=budget, top_k=20)
        sync()
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_family: dict[str, float] = {}
    per_name: dict[str, list] = {}
    for e in kernels:
        seconds, family = e.time_range.elapsed_us() / 1e6, kernel_family(e.name)
        per_family[family] = per_family.get(family, 0.0) + seconds
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    kernel_s = sum(per_family.values())
    top = sorted(per_name.items(), key=lambda item: -item[1][0])[:25]
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60) + "\n\nkernels by time:\n"
                    + "\n".join(f"{t * 1e3:10.1f} ms {n:7d}  {name[:160]}" for name, (t, n) in top) + "\n")
    return {"wall_s_profiled": wall, "kernels": len(kernels), "kernel_s": kernel_s, "gpu_busy_fraction": kernel_s / wall,
            "kernel_s_by_family": {k: round(v, 4) for k, v in sorted(per_family.items(), key=lambda kv: -kv[1])},
            "top_kernels": [(name[:120], round(t * 1e3, 2), n) for name, (t, n) in top[:10]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", required=True, help="jobs exported by bench_scoring.py --export-jobs")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-3b"], choices=sorted(CONFIGS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[GPU_TOKEN_BUDGET], help="engine token budgets to time (default: the GPU auto budget)")
    parser.add_argument("--exact-model", default="qwen2.5-0.5b", choices=sorted(CONFIGS) + [""], help="float32 exactness check model ('' skips)")
    parser.add_argument("--exact-n", type=int, default=48, help="interactions in the float32 exactness check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="append one JSON line per result here")
    parser.add_argument("--profile", nargs="*", default=[], metavar="MODEL:BUDGET",
                        help="after the timings, profile one engine run of each: kernel time by family, GPU busy fraction, "
                             "top kernels; the profiler's table goes next to --out")
    args = parser.parse_args()

    import torch
    import transformers

    found = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if found < MIN_TRANSFORMERS:  # older 5.x ignore the decoder's `cache=` keyword: the engine would crash
        sys.exit(f"transformers {transformers.__version__} is too old: the engine needs >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
                 "(carry .whl/ and install it first: docs/BENCHMARKS.md, 'On a GPU')")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in the exactness check
    device = torch.device(args.device)
    with gzip.open(args.jobs, "rt") if args.jobs.endswith(".gz") else open(args.jobs) as f:
        exported = json.load(f)
    jobs = [BranchJob(tuple(j["prompts"]), j["response_ids"]) for j in exported["jobs"]]
    pad_id = exported["pad_id"]
    sequence_tokens = sum(j.sequence_tokens() for j in jobs)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in gpu_name), None)
    measured = measured_matmul_peak(device) if on_gpu else None
    tflops = lambda v: f"{v / 1e12:.0f}" if v else "n/a"  # noqa: E731

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    # the run's identity goes to the results too: only the tail of stdout comes back from the device
    emit({"run": "setup", "device": gpu_name, "torch": torch.__version__, "transformers": transformers.__version__,
          "datasheet_bf16_dense_flops": datasheet, "measured_matmul_flops": measured, "jobs": args.jobs,
          "interactions": len(jobs), "sequence_tokens": sequence_tokens,
          "shared_prefix_tokens_per_interaction": sum(j.shared_prefix_length() for j in jobs) / len(jobs),
          "response_tokens_per_interaction": sum(len(j.response_ids) for j in jobs) / len(jobs)})
    print(f"bf16 dense peak: datasheet {tflops(datasheet)} TFLOP/s, measured 8192^3 matmul {tflops(measured)} TFLOP/s", flush=True)

    def guarded(what: dict, step) -> None:
        """Any error of one step is a result line, never the end of the run: the device is lent once."""
        try:
            step()
        except torch.OutOfMemoryError as error:
            emit({**what, "error": f"out of memory: {str(error).splitlines()[0]}"})
        except Exception as error:  # noqa: BLE001
            emit({**what, "error": repr(error)[:500]})
        if on_gpu:
            torch.cuda.empty_cache()

    def exactness() -> None:
        model = build_model(args.exact_model, device, torch.float32)
        subset = jobs[: args.exact_n]
        naive = naive_scores(model, subset, device)
        for budget in (0, 65536):  # one job per batch (no padding), then padded multi-job batches
            engine = score_jobs(model, subset, pad_id, token_budget=budget, top_k=20)
            worst, mean = max_diff(engine, naive)
            emit({"check": "float32 exactness", "model": args.exact_model, "budget": budget, "interactions": len(subset),
                  "max_abs_diff": worst, "mean_abs_diff": mean})

    if args.exact_model:
        guarded({"check": "float32 exactness", "model": args.exact_model}, exactness)
    for name in args.models:  # one model's failure must not cost the others' figures
        guarded({"model": name},
                lambda: measure_model(name, jobs, pad_id, device, args.budgets, sequence_tokens, datasheet, measured, sync, emit))

    for spec in args.profile:  # last: a profiler problem costs no timing
        name, budget = spec.split(":")
        try:
            model = build_model(name, device, torch.bfloat16)
            score_jobs(model, jobs[:32], pad_id, token_budget=int(budget), top_k=20)  # warm-up
            table = Path(args.out or "profile").with_name(f"profile-{name}-{budget}.txt")
            emit({"model": name, "method": "engine profile", "budget": int(budget), "table": table.name,
                  **profile_engine(model, jobs, pad_id, int(budget), table, sync)})
            del model
            if on_gpu:
                torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001  (reported, never fatal)
            emit({"model": name, "method": "engine profile", "error": repr(error)[:500]})


def measure_model(name, jobs, pad_id, device, budgets, sequence_tokens, datasheet, measured, sync, emit) -> None:
    """Naive and engine timings of one model, each emitted as soon as it exists."""
    import torch

    on_gpu = device.type == "cuda"
    model = build_model(name, device, torch.bfloat16)
    flops = FlopCounter(model.config)
    naive_flops = sum(flops.naive(j) for j in jobs)
    naive_scores(model, jobs[:4], device)  # warm-up: kernels, allocator
    naive, naive_s = timed(lambda: naive_scores(model, jobs, device), sync)
    emit({"model": name, "method": "naive", "params": sum(p.numel() for p in model.parameters()), "wall_s": naive_s,
          "tokens_per_s": sequence_tokens / naive_s, "flops": naive_flops,
          "mfu_datasheet": datasheet and naive_flops / naive_s / datasheet,
          "mfu_measured_peak": measured and naive_flops / naive_s / measured})
    for budget in budgets:
        try:  # a budget that fails (out of memory or otherwise) leaves the other budgets their figures
            emit({"model": name, "method": "engine", "budget": budget,
                  **measure_engine(model, budget, jobs, naive, naive_s, flops, (datasheet, measured), pad_id, device, sync)})
        except Exception as error:  # noqa: BLE001  (a result line, never the end of the run)
            emit({"model": name, "method": "engine", "budget": budget, "error": repr(error)[:500]})
            if on_gpu:
                torch.cuda.empty_cache()


def measure_engine(model, budget, jobs, naive, naive_s, flops, peaks, pad_id, device, sync) -> dict:
    """One engine run at one token budget against the naive run's time and scores; `peaks`: (datasheet, measured)."""
    import torch

    datasheet, measured = peaks
    on_gpu = device.type == "cuda"
    score_jobs(model, jobs[:32], pad_id, token_budget=budget, top_k=20)  # warm-up
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    engine, engine_s = timed(lambda: score_jobs(model, jobs, pad_id, token_budget=budget, top_k=20), sync)
    worst, mean = max_diff(engine, naive)
    engine_flops = flops.engine(jobs, budget)
    sequence_tokens = sum(j.sequence_tokens() for j in jobs)
    return {"wall_s": engine_s, "tokens_per_s": sequence_tokens / engine_s, "speedup_vs_naive": naive_s / engine_s,
            "flops": engine_flops, "mfu_datasheet": datasheet and engine_flops / engine_s / datasheet,
            "mfu_measured_peak": measured and engine_flops / engine_s / measured,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
            "bf16_max_abs_diff_vs_naive": worst, "bf16_mean_abs_diff_vs_naive": mean}


if __name__ == "__main__":
    main()
