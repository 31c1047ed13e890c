"""Loading teachers, students and tokenizers (hub ids or local folders, one code path), devices, dtypes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import KdcacheError, first_line

TASKS = ("seq2seq", "causal")


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None → cuda if available, else mps, else cpu; anything else is checked to exist."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KdcacheError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KdcacheError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU that supports it, else fp32 (fp16 would overflow T5's activations)."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return table[dtype]


def _check_local(name_or_path: str, what: str) -> None:
    """A name that looks like a path must exist; a hub id (``org/name``) is left to transformers."""
    p = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local and not p.expanduser().exists():
        raise KdcacheError(f"{what} path {name_or_path} does not exist")


def load_config(name_or_path: str, *, trust_remote_code: bool = False, what: str = "model") -> PretrainedConfig:
    _check_local(name_or_path, what)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdcacheError(f"cannot load {what} {name_or_path!r}: {first_line(exc)}") from exc


def detect_task(config: PretrainedConfig, override: str | None = None) -> str:
    """encoder-decoder → seq2seq, anything else → causal, unless ``override`` says otherwise."""
    if override:
        if override not in TASKS:
            raise KdcacheError(f"--task must be one of {', '.join(TASKS)}, got {override!r}")
        return override
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    _check_local(name_or_path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdcacheError(f"cannot load a tokenizer from {name_or_path!r}: {first_line(exc)}") from exc
    if tok.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padding positions are masked everywhere, so the
        # EOS id is a safe filler and keeps the vocabulary (and the fingerprint) unchanged.
        if tok.eos_token is None:
            raise KdcacheError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, task: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a seq2seq or causal LM from a hub id or a local ``save_pretrained`` folder (safetensors
    preferred; transformers loads .bin checkpoints with ``weights_only=True``)."""
    cls = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
    _check_local(name_or_path, "model")
    try:
        model = cls.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdcacheError(f"cannot load {task} model {name_or_path!r}: {first_line(exc)}") from exc
    return model


def tokenizer_vocab_size(tok: PreTrainedTokenizerBase) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tok)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token → id, added tokens included) and the BOS/EOS/UNK ids: equal
    fingerprints mean the same ids mean the same strings, whatever the tokenizer class (slow or fast)
    or where it was loaded from. The pad id is left out: kdcache may set it (GPT-2 has none), and
    padded positions are never distilled."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials: dict[str, Any] = {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk")}
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(specials, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()[:32]


def model_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding: the logits' last dimension (may exceed the tokenizer's size)."""
    return int(model.get_output_embeddings().weight.shape[0])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def quiet_transformers() -> None:
    """transformers warns on long inputs that kdcache truncates and reports itself, and draws its own
    progress bars for loading and saving weights; kdcache's bars and log lines say what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# Teachers whose vocabulary differs from their usual students', and the variant that shares it.
SHARED_TOKENIZER_VARIANTS = {"microsoft/CodeGPT-small-py": "microsoft/CodeGPT-small-py-adaptedGPT2"}


def shared_tokenizer_hint(teacher: str) -> str:
    """What to do when a teacher's tokenizer is not the student's."""
    variant = SHARED_TOKENIZER_VARIANTS.get(teacher.rstrip("/"))
    if variant:
        return f"use a teacher that shares the student's tokenizer, e.g. {variant} (GPT-2's vocabulary)"
    return "use a teacher and a student that share one tokenizer"


def check_same_tokenizer(teacher: str, teacher_tok: PreTrainedTokenizerBase, student: str, student_tok: PreTrainedTokenizerBase) -> None:
    """Refuse, before any work, a teacher/student pair whose token ids mean different strings."""
    a, b = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if a != b:
        raise KdcacheError(
            f"teacher {teacher} ({len(teacher_tok)} tokens) and student {student} ({len(student_tok)} tokens) have different "
            f"tokenizers, so the teacher's token ids would be wrong for the student; {shared_tokenizer_hint(teacher)}"
        )
