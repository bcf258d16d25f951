"""MLflow model registry: log a LoRA checkpoint, register it, move the `challenger`/`champion` aliases.

Aliases, never stages (stages are deprecated in MLflow 3). Every new version becomes `challenger`;
`champion` moves only when the evaluation gate passes (or when there is no champion yet), so
`models:/<name>@champion` is always the model that serves and the model whose teacher scores the next
round of hindsight targets.

Why the `transformers` flavor, and its two traps (measured with mlflow 3.17.2, transformers 5.24,
peft 0.21 on a LoRA model; MLflow documents the flavor for transformers 4.x only, so
`tests/test_registry.py` re-checks all of this on every run):

- The default inferred requirements import torchvision, which is not installed:
  `ModuleNotFoundError: torchvision`. We always pass explicit `pip_requirements`.
- Without `base_model_path`, MLflow saves the PEFT-wrapped model's state dict as the *base* weights;
  at load time the wrapped q/v weights are "MISSING" and get freshly initialised, so the model
  reloads with different logits (max diff 0.07-0.27 on tiny models) and only a load report
  hints at it. With `base_model_path=<local base dir>` only the adapter and tokenizer go into the
  artifact, the base is read from that directory at load, and the round trip is exact (diff 0.0).

With those two settings the flavor holds: it logs, reloads offline from `models:/<name>@<alias>` as a
`PeftModel`, and `mlflow.pyfunc` serving works (greedy text from a `prompt` column, rendered through
the tokenizer's own chat template). A hand-written `PythonModel` was therefore not needed.

Serving: `mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"prompt": [...]}),
params={"max_new_tokens": 32})` returns one greedy completion (without the prompt) per row. A prompt that
does not fit the model's positions with its answer keeps its newest tokens (the pipeline's `hole`, reading the
window from the tokenizer, which we set from the model's `max_position_embeddings`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sdpo_platform import paths
from sdpo_platform.config import RegistryConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
_PROMPT_SENTINEL = "\x00PROMPT\x00"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    model_uri: str  # models:/<name>/<version>


def configure_mlflow(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store and make `experiment` active; returns the tracking URI.

    With a local store (SQLite or file) the experiment's artifacts go under the data root, so a whole
    deployment lives in one folder; a remote tracking server keeps choosing its own artifact store.
    """
    uri = tracking_uri or paths.mlflow_tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment or RegistryConfig().experiment
    found = MlflowClient().get_experiment_by_name(name)
    if found is None:
        local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        artifact_location = paths.mlflow_artifact_root() if local_store else None
        experiment_id = MlflowClient().create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer fails here in seconds, naming it; MLflow's own client retries a
    refused connection for minutes before it says anything (a mistyped URI stalled a scheduled run)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10)  # any answer will do: a proxy may want a login
    except requests.RequestException as error:
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable: {type(error).__name__}: {error}") from error


def log_checkpoint(
    adapter_dir: str | Path,
    base_model_path: str | Path,
    run_id: str | None,
    model_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    *,
    max_new_tokens: int | None = None,
) -> RegisteredVersion:
    """Log base+adapter as an MLflow model in `run_id` (or a new run), register it, tag it, alias it `challenger`.

    `tags` (data partition, target set, validation status, ...) and `metrics` (as `metric.<name>`)
    go onto the model version, so the registry alone answers "what was this trained on and how did
    it score". `max_new_tokens` is the default generation length of the served pyfunc model.
    """
    _ensure_configured()
    base_model_path = local_base_path(base_model_path)
    model, tokenizer = _load_base_with_adapter(Path(adapter_dir), base_model_path)
    max_new_tokens = RegistryConfig().serve_max_new_tokens if max_new_tokens is None else max_new_tokens

    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        info = _log_model(model, tokenizer, Path(base_model_path), max_new_tokens)
    else:
        with mlflow.start_run(run_id=run_id) as run:
            info = _log_model(model, tokenizer, Path(base_model_path), max_new_tokens)
            run_id = run.info.run_id

    registered = mlflow.register_model(info.model_uri, model_name)
    version = int(registered.version)
    client = MlflowClient()
    version_tags = {
        **tags,
        **{f"metric.{key}": repr(float(value)) for key, value in metrics.items()},
        "base_model_path": str(Path(base_model_path).resolve()),
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(model_name, str(version), key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, str(version))
    return RegisteredVersion(model_name, version, run_id, f"models:/{model_name}/{version}")


def local_base_path(base: str | Path) -> Path:
    """The base model's local folder: MLflow records the base of an adapter-only model as a path, so a hub id
    (`model: HuggingFaceTB/SmolLM2-135M-Instruct`) is taken to its snapshot in the local cache, where scoring
    and training loaded it from."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser().resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(base), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as error:  # not cached, or not a hub id
        raise ValueError(f"base model {str(base)!r}: not a folder, nor a hub id in the local cache ({error})") from error


ROUNDTRIP_TOLERANCE = 1e-4  # max |logit difference| between a registered version and its checkpoint


def promote(model_name: str, version: int, gate_passed: bool, reloads: bool = True) -> list[str]:
    """Make `version` the champion if the gate passed or nothing is champion yet, never if it does not reload
    as its checkpoint (`roundtrip_logit_diff`); returns its aliases sorted.

    The gate outcome is kept as a version tag, so a challenger that was not promoted says why.
    """
    _ensure_configured()
    client = MlflowClient()
    client.set_model_version_tag(model_name, str(version), "gate_passed", str(gate_passed).lower())
    if reloads and (gate_passed or current_champion(model_name) is None):
        client.set_registered_model_alias(model_name, CHAMPION, str(version))
    return sorted(client.get_model_version(model_name, str(version)).aliases)


def current_champion(model_name: str) -> int | None:
    """The version aliased `champion`, or None when the model or the alias does not exist yet."""
    _ensure_configured()
    try:
        aliases = MlflowClient().get_registered_model(model_name).aliases
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def registered_snapshots() -> set[str]:
    """Every `targets_snapshot` tag of every registered model version: the rows each was trained and
    evaluated on, which `sdpo targets prune` must keep."""
    _ensure_configured()
    client, found, token = MlflowClient(), set(), None
    while True:  # every page: a shared server holds more versions than one page
        page = client.search_model_versions(max_results=1000, page_token=token)
        found |= {v.tags["targets_snapshot"] for v in page if v.tags.get("targets_snapshot")}
        token = page.token
        if not token:
            return found


def round_model(model_name: str, base_spec: str, next_round_from: str = "champion", root: Path | None = None) -> tuple[str, str]:
    """(model spec, label) that scores a round's hindsight targets and carries its new LoRA.

    With `next_round_from="champion"` and a champion registered, that is the champion merged into a
    plain model directory (DESIGN's frozen teacher, moved forward one champion at a time: champion →
    new targets → new champion); its files differ from the base's, so it gets its own target set.
    Otherwise the configured base model. The label says which, for tags and logs.
    """
    version = round_champion(model_name, next_round_from)
    if version is None:
        return base_spec, round_label(model_name, base_spec, None)
    return str(champion_model_dir(model_name, version, root)), round_label(model_name, base_spec, version)


def round_champion(model_name: str, next_round_from: str = "champion") -> int | None:
    """The champion version a round starts from, or None when it starts from the base (a cheap registry
    lookup: the schedule asks it on every tick, without merging anything)."""
    if next_round_from not in ("champion", "base"):
        raise ValueError(f"next_round_from must be 'champion' or 'base', not {next_round_from!r}")
    return current_champion(model_name) if next_round_from == "champion" else None


def round_label(model_name: str, base_spec: str, version: int | None) -> str:
    """`models:/name/N` for a champion, `base:spec` for the base: how tags and logs name a round's model."""
    return f"base:{base_spec}" if version is None else f"models:/{model_name}/{version}"


MERGED_FROM = "merged_from.json"  # in a merged folder: which registered weights it holds


def champion_model_dir(model_name: str, version: int, root: Path | None = None) -> Path:
    """Version `version` with its adapter merged into its base, saved once under the data root's models/.

    Built in a folder of its own and renamed into place, so a folder under the name is complete, and when
    two processes build it at once (a scheduled round beside a manual one) the first rename wins and the
    other drops its copy. The folder records which registered weights it holds (`MERGED_FROM`: the
    version's run and source); a folder built from other weights (the registry was rebuilt, the tracking
    server changed) or without that record (a build interrupted by an older version of this code) is
    built again.
    """
    import json
    import secrets
    import shutil

    target = paths.models_dir(root) / "rounds" / f"{model_name}-v{version}"
    _ensure_configured()
    registered = MlflowClient().get_model_version(model_name, str(version))
    source = {"run_id": registered.run_id, "source": registered.source}

    def holds_it() -> bool:
        try:
            return json.loads((target / MERGED_FROM).read_text()) == source and any(target.glob("*.safetensors"))
        except (OSError, ValueError):
            return False

    if holds_it():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*target.parent.glob(f".{target.name}.*"), target.with_name(f"{target.name}.partial")]:  # builds a crash left
        if not leftover.exists():  # behind (an hour old: not running), and the single `.partial` of earlier versions
            continue
        if time.time() - leftover.stat().st_mtime > 3600:
            shutil.rmtree(leftover, ignore_errors=True)
    model, tokenizer = load_registered(f"models:/{model_name}/{version}")
    partial = target.with_name(f".{target.name}.partial-{secrets.token_hex(6)}")
    model.merge_and_unload().save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / MERGED_FROM).write_text(json.dumps(source))
    for _ in range(3):
        if holds_it():  # another process finished first
            break
        if target.exists():  # other weights, or a folder left incomplete: set aside, then replaced
            aside = target.with_name(f".{target.name}.stale-{secrets.token_hex(6)}")
            try:
                os.rename(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            os.rename(partial, target)
            return target
        except OSError:  # another process renamed its copy in first: check what it holds
            continue
    shutil.rmtree(partial, ignore_errors=True)
    if not holds_it():
        raise RuntimeError(f"could not put the merged version {version} in place at {target}")
    return target


def load_registered(model_uri: str, base_model_path: str | Path | None = None):
    """(PeftModel in eval mode, tokenizer) for `models:/<name>@<alias>` or any model URI, offline.

    The base weights come from the local directory recorded at logging time; pass `base_model_path`
    when that folder has moved since. (The data root cannot move under a local store: MLflow records
    artifact locations as absolute paths.)
    """
    _ensure_configured()
    components = mlflow.transformers.load_model(
        model_uri,
        return_type="components",
        base_model_path=str(base_model_path) if base_model_path is not None else None,
    )
    return components["model"].eval(), components["tokenizer"]


def record_reload(model_name: str, version: int, adapter_dir: str | Path, base_model_path: str | Path) -> float:
    """`roundtrip_logit_diff` of a just-registered version, kept as its `checks` tag; run it before `promote`,
    which it tells through `reloads_exactly`."""
    diff = roundtrip_logit_diff(f"models:/{model_name}/{version}", adapter_dir, base_model_path)
    verdict = "passed" if reloads_exactly(diff) else f"failed: reloads {diff:.2e} away from its checkpoint"
    MlflowClient().set_model_version_tag(model_name, str(version), "checks", verdict)
    return diff


def reloads_exactly(diff: float) -> bool:
    return diff <= ROUNDTRIP_TOLERANCE


def champion_to_beat(model_name: str, next_round_from: str) -> str | None:
    """The current champion as a plain model folder when it is not the round's base (rounds start from the base
    model, `next_round_from: base`), so evaluation measures it too; else None (the round's base is the champion)."""
    version = current_champion(model_name) if next_round_from == "base" else None
    return None if version is None else str(champion_model_dir(model_name, version))


def roundtrip_logit_diff(model_uri: str, adapter_dir: str | Path, base_model_path: str | Path, prompt: str = "Hello! How are you?") -> float:
    """Max |logit difference| between the registered model and base+adapter loaded directly.

    The registry runs this after every registration, before any promotion: a silently mis-loaded base
    (the transformers flavor's trap above) shows up as a large difference, not as an error.
    """
    import torch

    expected_model, tokenizer = _load_base_with_adapter(Path(adapter_dir), local_base_path(base_model_path))
    loaded_model, _ = load_registered(model_uri)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.inference_mode():
        expected = expected_model(ids).logits.float()
        got = loaded_model(ids.to(loaded_model.device)).logits.float().cpu()
    return float((expected - got).abs().max())


def _ensure_configured() -> None:
    """Never fall back to MLflow's ./mlflow.db in the working directory: state lives under the data root."""
    if not mlflow.is_tracking_uri_set() and not os.environ.get("MLFLOW_TRACKING_URI"):
        configure_mlflow()


def _load_base_with_adapter(adapter_dir: Path, base_model_path: Path):
    """The base in float32 (as trained) with the adapter; the tokenizer saved with the adapter, else the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_model_path)
    return model, tokenizer


def _log_model(model, tokenizer, base_model_path: Path, max_new_tokens: int):
    """The transformers flavor with the two settings the module docstring explains."""
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    generation = {"max_new_tokens": max_new_tokens, "do_sample": False}
    signature = infer_signature(pd.DataFrame({"prompt": ["Hello"]}), ["Hi!"], params=generation)
    # a served prompt that does not fit the model's positions with its answer keeps its newest tokens (the
    # pipeline's "hole"), as scoring cuts prompts; it reads the window from the tokenizer, which often has none
    window = getattr(model.config, "max_position_embeddings", None)
    if window and tokenizer.model_max_length > window:
        tokenizer.model_max_length = window
    return mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        base_model_path=str(base_model_path.resolve()),
        pip_requirements=_pip_requirements(),
        torch_dtype=torch.float32,
        prompt_template=_chat_prompt_template(tokenizer),
        model_config={**generation, "return_full_text": False, "handle_long_generation": "hole"},
        signature=signature,
    )


def _chat_prompt_template(tokenizer) -> str:
    """The tokenizer's chat template rendered around `{prompt}`, so served prompts look like training prompts."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PROMPT_SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    escaped = rendered.replace("{", "{{").replace("}", "}}")
    return escaped.replace(_PROMPT_SENTINEL, "{prompt}")


def _pip_requirements() -> list[str]:
    """Exact versions of what loading needs (MLflow's inferred list would import torchvision)."""
    from importlib.metadata import version

    packages = ["mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"]
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]
