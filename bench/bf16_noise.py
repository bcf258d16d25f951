"""How much a bf16 target set (`targets.dtype: auto` on a GPU) moves the advantages that float32 training reads.

The engine scores teacher and student in bf16 on a GPU; training and evaluation run the student in float32.
At step 1 the loss's advantage is then bf16 teacher − float32 student, not the float32 A. This prints that
difference against the float32 A itself, on the default model and the labelled follow-ups of
`data/followup_eval` (bf16 simulated on this CPU: the rounding is the dtype's, not the device's).

    python bench/bf16_noise.py [--n 20]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sdpo_platform.config import DEFAULT_HINDSIGHT_TEMPLATE, TrainingConfig
from sdpo_platform.hindsight import encode_interaction
from sdpo_platform.logprobs import batch_response_logprobs
from sdpo_platform.models import load_model
from sdpo_platform.scoring import BranchJob, score_jobs

ROWS = Path(__file__).resolve().parents[1] / "data" / "followup_eval" / "followups.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="interactions (every other labelled row)")
    args = parser.parse_args()
    skip = TrainingConfig().skip_tokens
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()][: 2 * args.n : 2]
    exact, tokenizer = load_model("default", dtype=torch.float32)
    rounded, _ = load_model("default", dtype=torch.bfloat16)
    encoded = [encode_interaction(tokenizer, [{"role": "user", "content": r["prompt"]}], r["response"], r["followup"],
                                  DEFAULT_HINDSIGHT_TEMPLATE, 512, 64) for r in rows]
    jobs = [BranchJob((e.student_prompt_ids, e.teacher_prompt_ids), e.response_ids) for e in encoded]
    bf16 = score_jobs(rounded, jobs, tokenizer.pad_token_id)  # what a GPU target set stores

    def flat(values) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float64)[skip:] for v in values])

    with torch.no_grad():
        student, teacher = ([t.numpy() for t in batch_response_logprobs(exact, [getattr(e, f"{side}_prompt_ids") for e in encoded],
                                                                        [e.response_ids for e in encoded], tokenizer.pad_token_id)]
                            for side in ("student", "teacher"))
    student32, teacher32 = flat(student), flat(teacher)
    teacher16, student16 = flat(s.logprobs[1] for s in bf16), flat(s.logprobs[0] for s in bf16)
    exact_a, step1_a = teacher32 - student32, teacher16 - student32
    noise = np.abs(step1_a - exact_a)
    print(f"{len(rows)} interactions, {exact_a.size} scored tokens (from token {skip} on, as the loss)")
    print(f"mean |A| float32                     {np.abs(exact_a).mean():.4f}")
    print(f"mean |A step 1 - A| (bf16 teacher)   {noise.mean():.4f}  = {noise.mean() / np.abs(exact_a).mean():.1%} of mean |A|, max {noise.max():.3f}")
    print(f"tokens whose A changes sign          {(np.sign(step1_a) != np.sign(exact_a)).mean():.1%}")
    print(f"mean |student bf16 - float32|        {np.abs(student16 - student32).mean():.4f}")


if __name__ == "__main__":
    main()
