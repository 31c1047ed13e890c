"""The ``kdcache`` command line. Parsing only: every command builds a config and calls one library function.

Options default to None here: the config dataclasses (kdcache/config.py) are the one place defaults
live, a ``--config FILE`` fills what it sets, and options given on the command line override both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import kdcache
from kdcache.config import (
    DTYPES,
    METRICS,
    DumpConfig,
    EvalConfig,
    TrainConfig,
    load_config_file,
    stage_kwargs,
    write_config_file,
)
from kdcache.errors import KdcacheError

log = logging.getLogger("kdcache")


def _default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def opt(cls: type, name: str, *decls: str, help: str = "", **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option for config field ``name`` of ``cls``; its help shows the dataclass default."""
    flag = "--" + name.replace("_", "-")
    default = _default(cls, name)
    shown = f"[default: {default}]" if default not in (None, "", []) else ""
    return click.option(*(decls or (flag,)), name, default=None, help=f"{help} {shown}".strip(), **kw)


def _data_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Dataset and tokenization options shared by dump-teacher and evaluate."""
    options = [
        opt(cls, "dataset", help="Hub dataset, builtin:python-code / builtin:python-docstrings, a local .json/.jsonl/.csv/.parquet file, or a save_to_disk folder."),
        opt(cls, "dataset_config", help="Hub dataset configuration (cnn_dailymail: 3.0.0)."),
        opt(cls, "split", help="Dataset split."),
        opt(cls, "task", type=click.Choice(["seq2seq", "causal"]), help="Override the task detected from the model config."),
        opt(cls, "input_column", help="Input column (seq2seq default: article; causal: the prompt)."),
        opt(cls, "target_column", help="Target column (seq2seq default: highlights; causal: the completion)."),
        opt(cls, "text_column", help="Causal only: distil every next-token position of this column (default: text)."),
        opt(cls, "prefix", help='Prepended to every input (default "summarize: " for T5-family models, "" otherwise).'),
        opt(cls, "max_input_length", type=int, help="Tokens kept per input (truncation is counted and reported)."),
        opt(cls, "max_target_length", type=int, help="Tokens kept per target."),
        opt(cls, "max_seq_length", type=int, help="Causal: tokens kept per whole sequence (prompt + completion, or text); 384 saves memory."),
        opt(cls, "limit", type=int, help="Use only the first N rows."),
        opt(cls, "cache_dir", "--dataset-cache-dir", help="Where `datasets` keeps downloads."),
        opt(cls, "device", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps."),
        click.option("--trust-remote-code", is_flag=True, default=None, help="Allow models with custom code from the hub (off: such code never runs)."),
    ]

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(options):
            f = o(f)
        return f

    return wrap


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --dry-run, on every pipeline command."""
    f = click.option("--dry-run", is_flag=True, help="Check the installation: the whole path on a few built-in examples with tiny models of this family, offline, in a temporary folder.")(f)
    return click.option("--config", "config_file", default=None, help="distillation_config.json (or .yaml) from `kdcache create-config`; command-line options override it.")(f)


def _build(cls: type, stage: str, kw: dict[str, Any]) -> Any:
    """File values (if --config), then command-line values, over the dataclass defaults."""
    config_file = kw.pop("config_file", None)
    kw.pop("dry_run", None)
    values: dict[str, Any] = {}
    if config_file:
        file_cfg = load_config_file(config_file)
        values.update(stage_kwargs(file_cfg, stage, kw.get("split")))
        if log.handlers and not _LOG_LEVEL_GIVEN:  # --log-level on the command line wins over the file
            log.handlers[0].setLevel(file_cfg["system_config"]["log_level"].upper())
    values.update({k: v for k, v in kw.items() if v is not None and v != ()})
    return cls(**values)


def _dry_run(kw: dict[str, Any], command: str, model_key: str, cls: type) -> bool:
    """Run the dry run instead of the command when --dry-run is given (or the config file says so)."""
    dry = kw.get("dry_run")
    if not dry and kw.get("config_file"):
        dry = load_config_file(kw["config_file"])["system_config"]["dry_run"]
    if not dry:
        return False
    from kdcache.dryrun import dry_run

    model = kw.get(model_key) or (load_config_file(kw["config_file"])["model_config"]["teacher_model"] if kw.get("config_file") else _default(cls, model_key))
    s = dry_run(model, command)
    click.echo(f"dry run of `kdcache {command}` ({s['family']} family, like {s['configured_model']}), offline, tiny models:")
    click.echo(f"  data      {s['dataset']}")
    click.echo(f"  dump      {s['dump']['examples']} examples, {s['dump']['tokens']} distilled tokens, top-{s['dump']['k']} → Zarr cache")
    click.echo(f"  train     {s['train']['steps']} steps, last loss {s['train']['loss']:.4f}; wrote {', '.join(s['train']['wrote'])}")
    click.echo("  evaluate  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in s["evaluate"].items()))
    click.echo(f"ok in {s['seconds']:.1f} s; nothing was kept on disk")
    return True


_LOG_LEVEL_GIVEN = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(kdcache.__version__, prog_name="kdcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default=None, help="Console log level [default: INFO].")
def app(debug: bool, log_level: str | None) -> None:
    """kdcache: distil a large teacher into a small student through an offline teacher-logit cache.

    \b
    kdcache quickstart                                          # the whole job, offline, in ~15 min
    kdcache dump-teacher  --model TEACHER --dataset DATA --output CACHE
    kdcache train-student --cache CACHE --student STUDENT --output RUN
    kdcache evaluate      --model RUN/final_model --dataset DATA --metric rouge
    """
    global _LOG_LEVEL_GIVEN
    _LOG_LEVEL_GIVEN = log_level is not None
    # Only kdcache's own logger prints: libraries (absl via rouge-score, datasets) stay quiet.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    # The console shows --log-level and above; the logger itself passes everything, so the run's log
    # files keep INFO records whatever the console shows.
    log.handlers[0].setLevel((log_level or "INFO").upper())
    log.setLevel(logging.DEBUG)


@app.command("create-config")
@click.argument("path", default="distillation_config.json")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def create_config_cmd(path: str, overwrite: bool) -> None:
    """Write a distillation config (JSON, or YAML for .yaml/.yml) with every key at its default."""
    if Path(path).exists() and not overwrite:
        raise KdcacheError(f"{path} exists; pass --overwrite to replace it")
    write_config_file(path)
    click.echo(f"wrote {path}: edit it, then e.g. `kdcache dump-teacher --config {path}`")


@app.command("dump-teacher")
@opt(DumpConfig, "model", help="Teacher: hub id or local save_pretrained folder.")
@opt(DumpConfig, "student", help="The student you will train: its tokenizer is checked against the teacher's before any work.")
@_data_options(DumpConfig)
@opt(DumpConfig, "topk", type=int, help="Teacher entries kept per position (the rest of the mass goes to the tail bucket).")
@opt(DumpConfig, "targets", type=click.Choice(["topk", "sample", "topk+sample"]), help="topk: exact top-k + tail bucket; sample: unbiased sampled estimate; topk+sample: exact head + sampled tail.")
@opt(DumpConfig, "samples", type=int, help="Draws per position for sample and topk+sample.")
@opt(DumpConfig, "seed", type=int, help="Seed of the sampling.")
@opt(DumpConfig, "logprob_bits", type=int, help="Mantissa bits kept in the float16 log-probs: 10 = lossless, 7 = bf16 precision, smaller cache.")
@opt(DumpConfig, "batch_size", type=int, help="Examples per teacher forward (batches are grouped by length).")
@opt(DumpConfig, "block_size", type=int, help="Examples per block: the unit of writing and resuming.")
@opt(DumpConfig, "dtype", type=click.Choice(DTYPES), help="Teacher weights dtype (auto: bf16 on GPUs that support it, else fp32).")
@opt(DumpConfig, "output", help="Cache directory (a Zarr v3 group).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing complete cache, or one made with other parameters.")
@_common
def dump_teacher_cmd(**kw: Any) -> None:
    """Run the teacher once over a dataset and cache its top-k distributions."""
    if _dry_run(kw, "dump-teacher", "model", DumpConfig):
        return
    summary = kdcache.dump_teacher(_build(DumpConfig, "dump", kw))
    if summary["world"] > 1 and summary["rank"] != 0:
        return  # under torchrun, rank 0 speaks for all
    ranks = f" by rank 0 of {summary['world']}" if summary["world"] > 1 else ""
    click.echo(
        f"cache {summary['output']}: {summary['examples']} examples, {summary['tokens']} distilled tokens "
        f"({summary['blocks_written']}/{summary['blocks_total']} blocks written this run{ranks}), "
        f"mean captured mass {summary['captured_mass_mean']:.3f}, {summary['seconds']:.1f} s"
    )


@app.command("train-student")
@opt(TrainConfig, "cache", help="Teacher cache written by dump-teacher.")
@opt(TrainConfig, "student", help="Student: hub id or local save_pretrained folder (its tokenizer must match the cache's).")
@opt(TrainConfig, "output", help="Run folder: final_model/, best_model/, checkpoints/ and logs/ go here.")
@opt(TrainConfig, "val_cache", help="Validation cache (dump-teacher --split validation): evaluated every --eval-steps; best_model/ keeps the best.")
@opt(TrainConfig, "temperature", type=float, help="Distillation temperature T.")
@opt(TrainConfig, "alpha", type=float, help="Weight of the KD term (T² · KL).")
@opt(TrainConfig, "beta", type=float, help="Weight of the cross-entropy term.")
@opt(TrainConfig, "online_teacher", help="Reference only: run this teacher on every batch and distill its full distribution instead of the cache's targets.")
@opt(TrainConfig, "loss", type=click.Choice(["kl", "reverse-kl", "jsd", "tvd"]), help="The KD divergence on the cached entries + tail bucket.")
@opt(TrainConfig, "jsd_beta", type=float, help="Generalized JSD's mixing weight: 1 → forward KL, 0 → reverse KL.")
@opt(TrainConfig, "lr", "--lr", "--learning-rate", type=float, help="AdamW learning rate (linear warmup, linear decay).")
@opt(TrainConfig, "weight_decay", type=float)
@opt(TrainConfig, "warmup_steps", type=int)
@opt(TrainConfig, "epochs", "--epochs", "--num-epochs", type=int)
@opt(TrainConfig, "max_steps", type=int, help="Optimizer steps; overrides --epochs.")
@opt(TrainConfig, "batch_size", type=int)
@opt(TrainConfig, "grad_accum", "--grad-accum", "--gradient-accumulation-steps", type=int, help="Micro-batches per optimizer step.")
@opt(TrainConfig, "max_grad_norm", type=float)
@opt(TrainConfig, "seed", type=int)
@opt(TrainConfig, "device")
@click.option("--mixed-precision/--no-mixed-precision", "mixed_precision", default=None, help="bf16 (or fp16 + loss scaling) autocast on CUDA; CPU always trains in fp32. [default: on]")
@opt(TrainConfig, "amp_dtype", type=click.Choice(["auto", "bf16", "fp16"]), help="Autocast dtype with mixed precision on CUDA (auto: bf16 where supported, else fp16 + loss scaling).")
@opt(TrainConfig, "log_every", "--log-every", "--logging-steps", type=int, help="Steps between metric records.")
@opt(TrainConfig, "eval_steps", type=int, help="Steps between validations (with --val-cache).")
@opt(TrainConfig, "save_steps", type=int, help="Steps between checkpoints.")
@opt(TrainConfig, "save_total_limit", type=int, help="Checkpoints kept.")
@opt(TrainConfig, "patience", type=int, help="Stop after this many validations without improvement.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the latest checkpoint in the run folder.")
@opt(TrainConfig, "num_workers", type=int, help="DataLoader worker processes streaming the cache.")
@opt(TrainConfig, "shuffle_buffer", type=int, help="Examples mixed across blocks when streaming the cache.")
@opt(TrainConfig, "logs_dir", help="Logs folder [default: OUTPUT/logs].")
@opt(TrainConfig, "checkpoint_dir", help="Checkpoints folder [default: OUTPUT/checkpoints].")
@click.option("--trust-remote-code", is_flag=True, default=None)
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing final_model/ and start over.")
@_common
def train_student_cmd(**kw: Any) -> None:
    """Train a student from the cache alone (the teacher is never loaded)."""
    if _dry_run(kw, "train-student", "student", TrainConfig):
        return
    summary = kdcache.train_student(_build(TrainConfig, "train", kw))
    if summary.get("rank", 0) != 0:
        return  # under torchrun, rank 0 speaks for all
    loss = summary["loss"]
    click.echo(
        f"saved {summary['final_model']}: {summary['steps']} steps in {summary['seconds']:.1f} s"
        + (f", last loss {loss:.4f} (KD {summary['kd_loss']:.4f}, CE {summary['ce_loss']:.4f})" if loss is not None else "")
        + (f"; best validation loss {summary['best_val_loss']:.4f} in {summary['best_model']}" if summary["best_model"] else "")
        + ("; stopped early" if summary["stopped_early"] else "")
    )


@app.command("evaluate")
@click.option("--model", "models", multiple=True, help=f"Model to score: hub id or local folder; repeat to compare side by side. [default: {_default(EvalConfig, 'model')}]")
@_data_options(EvalConfig)
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRICS), help="Repeatable. [default: rouge]")
@opt(EvalConfig, "num_beams", type=int)
@opt(EvalConfig, "max_new_tokens", type=int)
@opt(EvalConfig, "min_new_tokens", type=int)
@opt(EvalConfig, "length_penalty", type=float)
@opt(EvalConfig, "no_repeat_ngram_size", type=int)
@opt(EvalConfig, "batch_size", type=int)
@opt(EvalConfig, "output", help="Write results.json and samples.jsonl here (one subfolder per model when several).")
@click.option("--k", "ks", default=None, help="pass@k: comma-separated k values, e.g. 1,10,20. [default: 1,10]")
@opt(EvalConfig, "num_samples", type=int, help="pass@k: completions sampled per HumanEval problem.")
@opt(EvalConfig, "temperature", type=float, help="pass@k: sampling temperature.")
@opt(EvalConfig, "top_p", type=float, help="pass@k: nucleus sampling.")
@opt(EvalConfig, "execution_timeout", type=float, help="pass@k: seconds per program in the sandbox.")
@click.option("--allow-code-execution", is_flag=True, default=None,
              help="pass@k runs model-written code in a sandbox (see README); it is refused without this flag or KDCACHE_ALLOW_CODE_EXECUTION=1.")
@_common
def evaluate_cmd(**kw: Any) -> None:
    """Generate and score: ROUGE-1/2/L/Lsum (rouge-score, stemmed), BLEU (sacrebleu), token perplexity,
    and HumanEval pass@k (sampled completions executed in a sandbox; no --dataset needed)."""
    models = list(kw.pop("models")) or [None]
    if kw.get("ks"):
        try:
            kw["ks"] = [int(k) for k in kw["ks"].split(",") if k.strip()]
        except ValueError:
            raise KdcacheError(f"--k takes comma-separated integers, e.g. 1,10,20 (got {kw['ks']!r})") from None
    if _dry_run({**kw, "model": models[0]}, "evaluate", "model", EvalConfig):
        return
    output = kw.pop("output")
    labels = _labels([m or "model" for m in models])
    table: dict[str, dict[str, Any]] = {}
    for model, label in zip(models, labels):
        sub = output if output is None or len(models) == 1 else str(Path(output) / label)
        cfg = _build(EvalConfig, "evaluate", {**kw, "model": model, "output": sub, "metrics": list(kw["metrics"]) or None})
        table[label if len(models) > 1 else cfg.model] = kdcache.evaluate(cfg)["results"]
    if output and len(models) > 1:
        Path(output, "results.json").write_text(json.dumps(table, indent=2) + "\n")
    keys = list(next(iter(table.values())))
    width = max(len(k) for k in keys + ["metric"])
    cols = list(table)
    click.echo(f"{'metric':<{width}}  " + "  ".join(f"{c:>14}" for c in cols))
    for key in keys:
        cells = [table[c].get(key) for c in cols]
        click.echo(f"{key:<{width}}  " + "  ".join(f"{v:>14.4f}" if isinstance(v, float) else f"{v!s:>14}" for v in cells))


def _labels(models: list[str]) -> list[str]:
    """Short distinct names for models (their folder names, or the parent's for .../final_model)."""
    out = []
    for m in models:
        p = Path(m)
        name = f"{p.parent.name}/{p.name}" if p.name in ("final_model", "best_model") and p.parent.name else p.name or m
        out.append(name.replace("/", "_"))
    return [f"{n}_{i}" if out.count(n) > 1 else n for i, n in enumerate(out)]


@app.command("quickstart")
@click.option("--budget", type=click.Choice(["tiny", "default", "large"]), default="default", show_default=True,
              help="tiny: a smoke test (~3 min on CPU); default: ~15 min on 2 CPU cores; large: for a GPU.")
@click.option("--output", default="./quickstart", show_default=True, help="Folder for the caches, students, results.json and results.png.")
@click.option("--device", default="auto", show_default=True)
@click.option("--teacher", default=None, help="Another causal teacher to use instead of the bundled one.")
@click.option("--overwrite", is_flag=True, help="Redo a quickstart whose results.json already exists in --output.")
def quickstart_cmd(budget: str, output: str, device: str, teacher: str | None, overwrite: bool) -> None:
    """Distil the bundled teacher into a small student on the Python standard library, offline, and
    compare with the same student trained without a teacher."""
    from pipelines.quickstart import run

    out = run(output=output, budget=budget, device=device, teacher=teacher, overwrite=overwrite)
    res, st = out["results"], out["settings"]
    click.echo(f"\nheld-out results on builtin:python-code test split ({st['test_tokens']:,} tokens), "
               f"students trained {st['steps']} steps on {st['train_examples']:,} examples, {st['device']}:\n")
    click.echo(f"{'model':<12} {'parameters':>11} {'loss':>8} {'perplexity':>11} {'top-1 agreement':>16}")
    for name, r in res.items():
        click.echo(f"{name:<12} {r['parameters']:>11,} {r['loss']:>8.4f} {r['perplexity']:>11.2f} {r['top1_agreement']:>16.3f}")
    gain = res["student_ce"]["loss"] - res["student_kd"]["loss"]
    verdict = "ahead of" if gain > 0 else "behind"
    click.echo(f"\ndistilled student is {verdict} the CE-only student by {abs(gain):.4f} nats/token "
               f"({st['seconds'] / 60:.1f} min in all)")
    click.echo(f"results: {out['paths']['results']}\nplot:    {out['paths']['plot']}\n"
               f"models:  {out['paths']['student_kd']}/final_model, {out['paths']['student_ce']}/final_model")


@app.command("plot")
@click.argument("run_dir")
def plot_cmd(run_dir: str) -> None:
    """Redraw RUN_DIR/logs/curves.png from the run's training_metrics.json."""
    from kdcache.plots import plot_run

    click.echo(f"wrote {plot_run(run_dir)}")


@app.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def inspect_cmd(cache: str, as_json: bool) -> None:
    """Show what a cache holds: provenance, counts, size, target statistics, completion state."""
    info = kdcache.inspect_cache(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    teacher, tok, ds = info["teacher"] or {}, info["tokenizer"] or {}, info["dataset"] or {}

    def num(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    rows = [
        ("cache", info["path"]),
        ("format", f"{info['format']} v{info['format_version']}"),
        ("state", info["state"]),
        ("task", info["task"]),
        ("teacher", f"{teacher.get('name')} ({num(teacher.get('parameters'), ',')} parameters, {teacher.get('dtype')})"),
        ("tokenizer", f"{tok.get('fingerprint')} ({tok.get('vocab_size')} tokens)"),
        ("dataset", f"{ds.get('name')} config={ds.get('config')} split={ds.get('split')}"),
        ("targets", f"{info['targets']}, k={info['k']}"),
        ("examples", f"{info['examples']:,} of {info['examples_planned']:,}"),
        ("distilled tokens", f"{info['tokens']:,}"),
        ("bytes on disk", f"{info['bytes']:,} ({num(info['bytes_per_token'], '.1f')} per token)"),
        ("captured mass", f"mean {num(info['captured_mass_mean'], '.4f')}, 5th percentile {num(info['captured_mass_p5'], '.3f')}"),
        ("teacher entropy", f"mean {num(info['entropy_mean'], '.4f')} nats"),
        ("entries per token", num(info["entries_per_token"], ".1f")),
    ]
    fid = info["fidelity"]
    if fid:
        kl = (f"{fid['kl']:.4f} nats" if fid["kl"] is not None else
              f"infinite at {fid['kl_infinite_fraction']:.0%} of positions (a sampled estimate is unbiased, not close per position)")
        rows += [
            ("fidelity", f"on {fid['positions']:,} probed positions: captured mass {fid['captured_mass']:.4f}, "
                         f"TVD {fid['tvd']:.4f}, KL(teacher||target) {kl}"),
        ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


@app.command("verify")
@click.argument("cache")
def verify_cmd(cache: str) -> None:
    """Read every chunk (checksums) and check counts, offsets and attributes. Exit 0 only if all is sound."""
    problems = kdcache.verify_cache(cache)
    for p in problems:
        click.echo(f"problem: {p}", err=True)
    if problems:
        click.echo(f"{cache}: {len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"{cache}: ok (every chunk read, checksums and structure sound)")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors → one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command name.
    debug = "--debug" in args or os.environ.get("KDCACHE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app.main(args=args, prog_name="kdcache", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kdcache: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KdcacheError as exc:
        if debug:
            raise
        click.echo(f"kdcache: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("kdcache: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
