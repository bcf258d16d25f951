"""Resume points of a training run: a run killed at step 900 of 1,000 goes on from its last point, not from step 1.

A point is one file, `resume.pt` in the run's output folder, written atomically every `training.save_every`
steps: the step, the losses so far, the trainable (LoRA) weights, the optimizer's state, the random
number generators and the MLflow run id. With them the rest of the run is the run that was killed:
batches are drawn from a seeded generator (skipped ahead to the step), so a resumed run ends with the
adapter an uninterrupted one ends with (bit for bit on a CPU; on a GPU up to its non-deterministic kernels,
e.g. attention's backward, which differ between any two runs), and it logs to the same MLflow run.

A point belongs to one run: the fingerprint of everything that changes the numbers (base model,
targets, training settings, weights) must match, so a folder reused with other settings starts over.
The point is deleted once the run has written its adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sdpo_platform.paths import atomic_write

RESUME_FILE = "resume.pt"


def fingerprint(run) -> str:
    """A digest of what a `TrainRun` computes from; not where it logs (a retried Dagster run names its MLflow run anew)."""
    computes = run.model_dump(include={"base_model_path", "targets_path", "training", "target_set", "interaction_weights"})
    return hashlib.sha256(json.dumps(computes, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_point(output_dir: str | Path, run, step: int, losses: list[float], model, optimizer, mlflow_run_id: str) -> None:
    point = {
        "fingerprint": fingerprint(run),
        "step": step,
        "losses": list(losses),
        "trainable": {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": _device_rng_state(model),
        "mlflow_run_id": mlflow_run_id,
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(output_dir) / RESUME_FILE, lambda tmp: torch.save(point, tmp))


def load_point(output_dir: str | Path, run) -> tuple[dict | None, str | None]:
    """(the folder's resume point for this run, or None; the MLflow run id of a point left by another run,
    which nothing will resume)."""
    path = Path(output_dir) / RESUME_FILE
    if not path.exists():
        return None, None
    point = torch.load(path, map_location="cpu", weights_only=False)
    if point["fingerprint"] != fingerprint(run):
        return None, point.get("mlflow_run_id")
    return point, None


def restore(point: dict, model, optimizer) -> None:
    """Weights, optimizer state and random number generators as they were after `point['step']`."""
    missing = set(point["trainable"]) - {name for name, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise ValueError(f"the resume point holds weights this model does not train, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(point["trainable"], strict=False)
    optimizer.load_state_dict(point["optimizer"])
    torch.set_rng_state(point["torch_rng"])
    device = next(model.parameters()).device
    state = point["cuda_rng"]
    if isinstance(state, list):  # points written before: every visible GPU's state, by index
        state = state[device.index or 0] if device.type == "cuda" and len(state) > (device.index or 0) else None
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)


def _device_rng_state(model) -> torch.Tensor | None:
    """The random state of the GPU the model trains on (dropout draws from it); only that one, so a run resumes
    on a node that sees fewer GPUs (restoring every visible GPU's state failed there)."""
    device = next(model.parameters()).device
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def clear_point(output_dir: str | Path) -> None:
    (Path(output_dir) / RESUME_FILE).unlink(missing_ok=True)


def resumable(output_dir: str | Path) -> bool:
    """Whether a folder holds a run killed after a resume point (and not finished since)."""
    return (Path(output_dir) / RESUME_FILE).exists()


def output_folder(fresh: Path, earlier: list[Path]) -> Path:
    """Where a run writes its checkpoint: the folder of an earlier attempt of it that was killed after a resume
    point (Dagster's re-execution of a failed run: its parent's, then its root's), else its own `fresh` one."""
    return next((folder for folder in earlier if resumable(folder)), fresh)
