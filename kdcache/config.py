"""Configuration of each stage: the one place defaults live, and validation with messages that name the option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import KdcacheError

DTYPES = ("auto", "bf16", "fp16", "fp32")
METRICS = ("rouge", "perplexity")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise KdcacheError(message)


@dataclass
class DataOptions:
    """Where the examples come from and how they are tokenized (shared by dump-teacher and evaluate)."""

    dataset: str = ""
    dataset_config: str | None = None
    split: str = "train"
    input_column: str | None = None  # seq2seq default: article
    target_column: str | None = None  # seq2seq default: highlights
    text_column: str | None = None  # causal: distil every next-token position of this column
    prefix: str | None = None  # None: "summarize: " for T5-family models, "" otherwise
    max_input_length: int = 512
    max_target_length: int = 128
    limit: int | None = None
    task: str | None = None  # None: detected from the model's config
    trust_remote_code: bool = False
    device: str = "auto"

    def validate(self) -> None:
        _require(bool(self.dataset), "--dataset is required")
        _require(self.max_input_length >= 1, f"--max-input-length must be at least 1 (got {self.max_input_length})")
        _require(self.max_target_length >= 1, f"--max-target-length must be at least 1 (got {self.max_target_length})")
        _require(self.limit is None or self.limit >= 1, f"--limit must be at least 1 (got {self.limit})")
        _require(self.task in (None, "seq2seq", "causal"), f"--task must be seq2seq or causal (got {self.task!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DumpConfig(DataOptions):
    """``kdcache dump-teacher``: run the teacher once over a dataset, write its sparse targets."""

    model: str = ""
    output: str = "./teacher_cache"
    topk: int = 64
    batch_size: int = 8
    block_size: int = 1024  # examples per block: the unit of writing, resuming and sharding
    dtype: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        _require(bool(self.model), "--model is required")
        super().validate()
        _require(self.topk >= 1, f"--topk must be at least 1 (got {self.topk})")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        _require(self.block_size >= 1, f"--block-size must be at least 1 (got {self.block_size})")
        _require(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")


@dataclass
class TrainConfig:
    """``kdcache train-student``: train a student from a cache; the teacher is never loaded."""

    cache: str = "./teacher_cache"
    student: str = "t5-small"
    output: str = "./distilled_model"  # the run folder: final_model/, best_model/, checkpoints/, logs/
    val_cache: str | None = None  # validation cache (dump-teacher --split validation)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KD term (T² · KL)
    beta: float = 0.3  # weight of the cross-entropy term
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 500
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast on GPUs that support it, else fp16 with a scaler; never on CPU
    log_every: int = 100
    eval_steps: int = 500
    save_steps: int = 1000
    save_total_limit: int = 3  # checkpoints kept (oldest removed first)
    patience: int | None = None  # evaluations without improvement before stopping early
    resume: bool = False  # continue from the latest checkpoint in output/checkpoints
    num_workers: int = 0  # DataLoader worker processes streaming the cache
    shuffle_buffer: int = 4096  # examples mixed across blocks
    logs_dir: str | None = None  # default: output/logs
    checkpoint_dir: str | None = None  # default: output/checkpoints
    trust_remote_code: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        _require(bool(self.cache), "--cache is required")
        _require(bool(self.student), "--student is required")
        _require(self.temperature > 0, f"--temperature must be positive (got {self.temperature})")
        _require(self.alpha >= 0 and self.beta >= 0, f"--alpha and --beta must not be negative (got {self.alpha}, {self.beta})")
        _require(self.alpha > 0 or self.beta > 0, "--alpha and --beta are both 0: nothing to train on")
        _require(self.lr > 0, f"--lr must be positive (got {self.lr})")
        _require(self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})")
        _require(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})")
        for name in ("batch_size", "grad_accum", "log_every", "eval_steps", "save_steps", "save_total_limit", "shuffle_buffer"):
            value = getattr(self, name)
            _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        _require(self.warmup_steps >= 0, f"--warmup-steps must not be negative (got {self.warmup_steps})")
        _require(self.num_workers >= 0, f"--num-workers must not be negative (got {self.num_workers})")
        _require(self.max_grad_norm > 0, f"--max-grad-norm must be positive (got {self.max_grad_norm})")
        _require(self.patience is None or self.patience >= 1, f"--patience must be at least 1 (got {self.patience})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalConfig(DataOptions):
    """``kdcache evaluate``: generate and score a model on a dataset."""

    model: str = ""
    split: str = "test"
    metrics: list[str] = field(default_factory=lambda: ["rouge"])
    num_beams: int = 4
    max_new_tokens: int = 128
    batch_size: int = 8
    output: str | None = None

    def validate(self) -> None:
        _require(bool(self.model), "--model is required")
        super().validate()
        for m in self.metrics:
            _require(m in METRICS, f"--metric must be one of {', '.join(METRICS)} (got {m!r})")
        _require(bool(self.metrics), "at least one --metric is required")
        _require(self.num_beams >= 1, f"--num-beams must be at least 1 (got {self.num_beams})")
        _require(self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
