"""Configuration of each stage: the one place defaults live, and validation with messages that name the option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import KdcacheError

DTYPES = ("auto", "bf16", "fp16", "fp32")
TARGETS = ("topk", "sample", "topk+sample")
METRICS = ("rouge", "bleu", "perplexity", "pass@k")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise KdcacheError(message)


@dataclass
class DataOptions:
    """Where the examples come from and how they are tokenized (shared by dump-teacher and evaluate)."""

    dataset: str = "cnn_dailymail"
    dataset_config: str | None = None  # cnn_dailymail without one: 3.0.0
    cache_dir: str | None = None  # where `datasets` keeps downloads and Arrow files (its default if None)
    split: str = "train"
    input_column: str | None = None  # seq2seq default: article
    target_column: str | None = None  # seq2seq default: highlights
    text_column: str | None = None  # causal: distil every next-token position of this column
    prefix: str | None = None  # None: "summarize: " for T5-family models, "" otherwise
    max_input_length: int = 512
    max_target_length: int = 128
    max_seq_length: int | None = None  # causal: cap on prompt + completion (or text) tokens
    limit: int | None = None
    task: str | None = None  # None: detected from the model's config
    trust_remote_code: bool = False
    device: str = "auto"

    def validate(self) -> None:
        _require(bool(self.dataset), "--dataset is required")
        _require(self.max_input_length >= 1, f"--max-input-length must be at least 1 (got {self.max_input_length})")
        _require(self.max_target_length >= 1, f"--max-target-length must be at least 1 (got {self.max_target_length})")
        _require(self.limit is None or self.limit >= 1, f"--limit must be at least 1 (got {self.limit})")
        _require(self.max_seq_length is None or self.max_seq_length >= 2, f"--max-seq-length must be at least 2 (got {self.max_seq_length})")
        _require(self.task in (None, "seq2seq", "causal"), f"--task must be seq2seq or causal (got {self.task!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DumpConfig(DataOptions):
    """``kdcache dump-teacher``: run the teacher once over a dataset, write its sparse targets."""

    model: str = "t5-large"
    student: str | None = None  # when given, its tokenizer must be the teacher's (checked before any work)
    output: str = "./teacher_cache"
    topk: int = 64
    targets: str = "topk"  # topk | sample | topk+sample (see kdcache.sparse)
    samples: int = 24  # draws per position for sample / topk+sample
    seed: int = 0  # seeds the sampling (per block, so resume redraws the same)
    # Mantissa bits kept in the stored float16 log-probs: 10 is float16 as is (lossless); 7 is bfloat16's
    # precision and halves their compressed size (docs/results.md measures what it costs in fidelity).
    logprob_bits: int = 10
    batch_size: int = 8
    block_size: int = 1024  # examples per block: the unit of writing, resuming and sharding
    dtype: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        _require(bool(self.model), "--model is required")
        super().validate()
        _require(self.topk >= 1, f"--topk must be at least 1 (got {self.topk})")
        _require(self.targets in TARGETS, f"--targets must be one of {', '.join(TARGETS)} (got {self.targets!r})")
        _require(self.samples >= 1, f"--samples must be at least 1 (got {self.samples})")
        _require(1 <= self.logprob_bits <= 10, f"--logprob-bits must be in 1..10 (got {self.logprob_bits})")
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
    loss: str = "kl"  # the KD divergence: kl, reverse-kl, jsd, tvd
    jsd_beta: float = 0.5  # generalized JSD's mixing weight (0 < beta < 1)
    # Online KD, for reference and benchmarks: this teacher runs on every batch and its full distribution
    # replaces the cached targets (the cache still supplies the examples, so the batches are the same).
    online_teacher: str | None = None
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
    amp_dtype: str = "auto"  # auto, bf16 or fp16: the autocast dtype when mixed precision is on
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
        _require(self.loss in ("kl", "reverse-kl", "jsd", "tvd"), f"--loss must be kl, reverse-kl, jsd or tvd (got {self.loss!r})")
        _require(0 < self.jsd_beta < 1, f"--jsd-beta must be between 0 and 1 (got {self.jsd_beta})")
        _require(self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})")
        _require(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})")
        for name in ("batch_size", "grad_accum", "log_every", "eval_steps", "save_steps", "save_total_limit", "shuffle_buffer"):
            value = getattr(self, name)
            _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        _require(self.warmup_steps >= 0, f"--warmup-steps must not be negative (got {self.warmup_steps})")
        _require(self.num_workers >= 0, f"--num-workers must not be negative (got {self.num_workers})")
        _require(self.max_grad_norm > 0, f"--max-grad-norm must be positive (got {self.max_grad_norm})")
        _require(self.patience is None or self.patience >= 1, f"--patience must be at least 1 (got {self.patience})")
        _require(self.amp_dtype in ("auto", "bf16", "fp16"), f"--amp-dtype must be auto, bf16 or fp16 (got {self.amp_dtype!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalConfig(DataOptions):
    """``kdcache evaluate``: generate and score a model on a dataset."""

    model: str = "./distilled_model/final_model"
    split: str = "test"
    metrics: list[str] = field(default_factory=lambda: ["rouge"])
    num_beams: int = 4
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
    output: str | None = None
    # pass@k on HumanEval (sampled completions run in kdcache's sandbox)
    ks: list[int] = field(default_factory=lambda: [1, 10])
    num_samples: int = 20
    temperature: float = 0.8
    top_p: float = 0.95
    allow_code_execution: bool = False
    execution_timeout: float = 10.0

    def validate(self) -> None:
        _require(bool(self.model), "--model is required")
        super().validate()
        _require(all(k >= 1 for k in self.ks), f"--k values must be at least 1 (got {self.ks})")
        _require(self.num_samples >= 1, f"--num-samples must be at least 1 (got {self.num_samples})")
        _require(self.temperature > 0, f"--temperature must be positive (got {self.temperature})")
        _require(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})")
        _require(self.execution_timeout > 0, f"--execution-timeout must be positive (got {self.execution_timeout})")
        for m in self.metrics:
            _require(m in METRICS, f"--metric must be one of {', '.join(METRICS)} (got {m!r})")
        _require(bool(self.metrics), "at least one --metric is required")
        _require(self.num_beams >= 1, f"--num-beams must be at least 1 (got {self.num_beams})")
        _require(self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, f"--min-new-tokens must be in 0..--max-new-tokens (got {self.min_new_tokens})")
        _require(self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must not be negative (got {self.no_repeat_ngram_size})")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")


# ----------------------------------------------------------------------------------------------
# The distillation config file (`kdcache create-config`, `--config FILE`): five sections whose keys
# map onto the stage configs above. Defaults come from the stage configs, except the per-split sizes,
# which exist only in the file.

_T, _D, _E = TrainConfig, DumpConfig, EvalConfig

FILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "model_config": {
        "teacher_model": _D.model,
        "student_model": _T.student,
        "max_input_length": _D.max_input_length,
        "max_target_length": _D.max_target_length,
        "cache_dir": _D.output,
    },
    "data_config": {
        "dataset_name": _D.dataset,
        "dataset_version": "3.0.0",
        "train_size": 1000,  # rows dumped from the train split (null: all)
        "val_size": 200,
        "test_size": 100,
        "data_cache_dir": _D.cache_dir,
        "num_workers": 4,  # DataLoader workers streaming the cache
    },
    "distillation_config": {"temperature": _T.temperature, "alpha": _T.alpha, "beta": _T.beta},
    "training_config": {
        "batch_size": _T.batch_size,
        "learning_rate": _T.lr,
        "num_epochs": _T.epochs,
        "warmup_steps": _T.warmup_steps,
        "logging_steps": _T.log_every,
        "save_steps": _T.save_steps,
        "eval_steps": _T.eval_steps,
        "gradient_accumulation_steps": _T.grad_accum,
        "max_grad_norm": _T.max_grad_norm,
        "output_dir": _T.output,
        "logs_dir": "logs",  # relative paths are inside output_dir
        "checkpoint_dir": "checkpoints",
    },
    "system_config": {
        "device": _T.device,  # auto: cuda when present, else mps, else cpu
        "mixed_precision": _T.mixed_precision,
        "dry_run": False,
        "seed": _T.seed,
        "log_level": "INFO",
    },
}

# (section, key) → field of each stage config. A key absent from a stage's map is not used by it.
_COMMON = {
    ("model_config", "max_input_length"): "max_input_length",
    ("model_config", "max_target_length"): "max_target_length",
    ("data_config", "dataset_name"): "dataset",
    ("data_config", "dataset_version"): "dataset_config",
    ("data_config", "data_cache_dir"): "cache_dir",
    ("system_config", "device"): "device",
}
FILE_TO_STAGE: dict[str, dict[tuple[str, str], str]] = {
    "dump": {**_COMMON, ("model_config", "teacher_model"): "model", ("model_config", "cache_dir"): "output"},
    "train": {
        ("model_config", "student_model"): "student",
        ("model_config", "cache_dir"): "cache",
        ("data_config", "num_workers"): "num_workers",
        ("distillation_config", "temperature"): "temperature",
        ("distillation_config", "alpha"): "alpha",
        ("distillation_config", "beta"): "beta",
        ("training_config", "batch_size"): "batch_size",
        ("training_config", "learning_rate"): "lr",
        ("training_config", "num_epochs"): "epochs",
        ("training_config", "warmup_steps"): "warmup_steps",
        ("training_config", "logging_steps"): "log_every",
        ("training_config", "save_steps"): "save_steps",
        ("training_config", "eval_steps"): "eval_steps",
        ("training_config", "gradient_accumulation_steps"): "grad_accum",
        ("training_config", "max_grad_norm"): "max_grad_norm",
        ("training_config", "output_dir"): "output",
        ("training_config", "logs_dir"): "logs_dir",
        ("training_config", "checkpoint_dir"): "checkpoint_dir",
        ("system_config", "device"): "device",
        ("system_config", "mixed_precision"): "mixed_precision",
        ("system_config", "seed"): "seed",
    },
    "evaluate": dict(_COMMON),
}
STAGES = {"dump": DumpConfig, "train": TrainConfig, "evaluate": EvalConfig}
SPLIT_SIZE_KEYS = {"train": "train_size", "validation": "val_size", "test": "test_size"}


def _type_ok(value: Any, default: Any) -> bool:
    if value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """Read a JSON (or YAML) distillation config; reject unknown sections/keys and values of the wrong
    type or out of range, naming ``section.key``. Returns the file merged over FILE_DEFAULTS."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise KdcacheError(f"config file {path} does not exist (write one with `kdcache create-config {path}`)")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            import json

            raw = json.loads(text)
    except Exception as exc:
        raise KdcacheError(f"config file {path} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise KdcacheError(f"config file {path} must hold an object with the sections {', '.join(FILE_DEFAULTS)}")
    merged = {section: dict(keys) for section, keys in FILE_DEFAULTS.items()}
    for section, keys in raw.items():
        if section not in FILE_DEFAULTS:
            raise KdcacheError(f"{path}: unknown section {section!r} (sections: {', '.join(FILE_DEFAULTS)})")
        if not isinstance(keys, dict):
            raise KdcacheError(f"{path}: section {section!r} must be an object")
        for key, value in keys.items():
            if key not in FILE_DEFAULTS[section]:
                raise KdcacheError(f"{path}: unknown key {section}.{key} (keys of {section}: {', '.join(FILE_DEFAULTS[section])})")
            default = FILE_DEFAULTS[section][key]
            if not _type_ok(value, default if default is not None else ""):
                raise KdcacheError(f"{path}: {section}.{key} = {value!r} has the wrong type (expected {type(default).__name__})")
            merged[section][key] = value
    # Range checks: each stage validates a config holding just this key's value, so the rules stay in
    # one place (the stage's validate) while the message names the file's key.
    for stage, mapping in FILE_TO_STAGE.items():
        for (section, key), field_name in mapping.items():
            if key not in raw.get(section, {}):
                continue
            try:
                STAGES[stage](**{field_name: merged[section][key]}).validate()
            except KdcacheError as exc:
                raise KdcacheError(f"{path}: {section}.{key} = {merged[section][key]!r} is invalid ({exc})") from None
    for key in SPLIT_SIZE_KEYS.values():
        size = merged["data_config"][key]
        if size is not None and size < 1:
            raise KdcacheError(f"{path}: data_config.{key} = {size!r} is invalid (use a positive number, or null for the whole split)")
    if merged["system_config"]["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise KdcacheError(f"{path}: system_config.log_level = {merged['system_config']['log_level']!r} is invalid (DEBUG, INFO, WARNING or ERROR)")
    return merged


def stage_kwargs(file_cfg: dict[str, dict[str, Any]], stage: str, split: str | None = None) -> dict[str, Any]:
    """The stage config fields a loaded config file sets (relative log/checkpoint dirs resolved under
    the output dir; the split's size becomes ``limit``; evaluate scores the trained model)."""
    out = {field_name: file_cfg[section][key] for (section, key), field_name in FILE_TO_STAGE[stage].items()}
    if stage == "train":
        from pathlib import Path

        for name in ("logs_dir", "checkpoint_dir"):
            if out[name] is not None and not Path(out[name]).is_absolute():
                out[name] = str(Path(out["output"]) / out[name])
    if stage in ("dump", "evaluate"):
        out["limit"] = file_cfg["data_config"][SPLIT_SIZE_KEYS.get(split or ("train" if stage == "dump" else "test"), "train_size")]
    if stage == "evaluate":
        out["model"] = f"{file_cfg['training_config']['output_dir'].rstrip('/')}/final_model"
    return out


def write_config_file(path: str) -> None:
    """Write FILE_DEFAULTS as JSON (or YAML for .yaml/.yml)."""
    import json
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(FILE_DEFAULTS, sort_keys=False)
    else:
        text = json.dumps(FILE_DEFAULTS, indent=2) + "\n"
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)
