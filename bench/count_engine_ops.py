"""How much work the scoring engine launches besides the model: aten ops outside the decoder's forward.

On a GPU every aten op that is not a view is a kernel launch (and every op costs host time), so ops the
engine issues between passes (building caches, gathering states) add to the model's own and can leave
the GPU waiting. This counts both on the CPU, where no GPU is needed: the count depends on the layers,
passes and rows, not on the model's width, so a thin model with a real model's layer count stands in.

    python bench/count_engine_ops.py --jobs .bench/jobs_default.json.gz --layers 28 --budget 65536
    git show bb75aad~1:sdpo_platform/scoring.py > /tmp/scoring_before.py
    python bench/count_engine_ops.py --jobs .bench/jobs_default.json.gz --scoring /tmp/scoring_before.py   # another engine, side by side

Prints, per engine: decoder passes, ops inside the decoder and outside it (launching / views), the
outside/inside ratio, and the commonest launching ops outside.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_engine(path: str | None):
    """The platform's scoring module, or another version of it loaded from a file (for a side-by-side)."""
    if path is None:
        from sdpo_platform import scoring

        return scoring
    spec = importlib.util.spec_from_file_location("scoring_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


class EngineOps:
    """Counts, while active, the aten ops run outside a model's decoder forward (`outside[kind]`, kind =
    "launch" or "view"; `by_op` for the launching ones), those inside it (`inside[kind]`), and the
    decoder forwards (`passes`). The tests use it too."""

    def __init__(self, model):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.inside, self.outside, self.by_op, self.passes = collections.Counter(), collections.Counter(), collections.Counter(), 0
        counter, depth = self, [0]

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kind = "view" if func.is_view else "launch"
                (counter.inside if depth[0] else counter.outside)[kind] += 1
                if not depth[0] and kind == "launch":
                    counter.by_op[str(func).replace("aten.", "")] += 1
                return func(*args, **(kwargs or {}))

        def enter(module, args):
            depth[0] += 1
            counter.passes += 1

        self._mode, self._decoder, self._enter = Count(), model.get_decoder(), enter
        self._leave = lambda *_: depth.__setitem__(0, depth[0] - 1)

    def __enter__(self):
        self._hooks = [self._decoder.register_forward_pre_hook(self._enter), self._decoder.register_forward_hook(self._leave)]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()


def count_ops(engine, model, jobs, pad_id: int, budget: int) -> EngineOps:
    """The ops of one engine run over `jobs` (exported dicts) with teacher top-20, after a warm-up call."""
    import torch

    engine_jobs = [engine.BranchJob(tuple(j["prompts"]), j["response_ids"]) for j in jobs]
    engine.score_jobs(model, engine_jobs[:1], pad_id, token_budget=budget)  # the head check's forward, once per model
    with torch.inference_mode(), EngineOps(model) as ops:
        engine.score_jobs(model, engine_jobs, pad_id, token_budget=budget, top_k=20)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", required=True, help="jobs exported by bench_scoring.py --export-jobs")
    parser.add_argument("--scoring", action="append", default=[], help="another scoring.py to count beside the platform's")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the stand-in model (Llama-3.2-3B: 28)")
    parser.add_argument("--budget", type=int, default=65536, help="token budget (the GPU default)")
    parser.add_argument("--n", type=int, default=None, help="only the first N interactions")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with gzip.open(args.jobs, "rt") if args.jobs.endswith(".gz") else open(args.jobs) as f:
        exported = json.load(f)
    jobs = exported["jobs"][: args.n]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=exported["tokenizer_vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    print(f"{len(jobs)} interactions, budget {args.budget}, a {args.layers}-layer stand-in model")
    for path in [None, *args.scoring]:
        ops = count_ops(load_engine(path), model, jobs, exported["pad_id"], args.budget)
        print(f"{path or 'sdpo_platform/scoring.py'}: {ops.passes} passes; decoder {ops.inside['launch']:,} launching + "
              f"{ops.inside['view']:,} views; engine outside it {ops.outside['launch']:,} launching + {ops.outside['view']:,} views "
              f"({ops.outside['launch'] / max(ops.inside['launch'], 1):.2f}x the decoder's launching ops)")
        print("   commonest outside: " + ", ".join(f"{k} {v:,}" for k, v in ops.by_op.most_common(6)))


if __name__ == "__main__":
    main()
