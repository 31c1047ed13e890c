"""The ``kdcache`` command line. Parsing only: every command builds a config and calls one library function."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Callable

import click

import kdcache
from kdcache.config import DTYPES, METRICS, DumpConfig, EvalConfig, TrainConfig
from kdcache.errors import KdcacheError

log = logging.getLogger("kdcache")


def _data_options(split_default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Dataset and tokenization options shared by dump-teacher and evaluate."""
    options = [
        click.option("--dataset", required=True, help="Hub dataset name, a local .json/.jsonl/.csv/.parquet file, or a save_to_disk folder."),
        click.option("--dataset-config", default=None, help="Hub dataset configuration (e.g. 3.0.0 for cnn_dailymail)."),
        click.option("--split", default=split_default, show_default=True, help="Dataset split."),
        click.option("--task", type=click.Choice(["seq2seq", "causal"]), default=None, help="Override the task detected from the model config."),
        click.option("--input-column", default=None, help="Input column (seq2seq default: article; causal: the prompt)."),
        click.option("--target-column", default=None, help="Target column (seq2seq default: highlights; causal: the completion)."),
        click.option("--text-column", default=None, help="Causal only: distil every next-token position of this column (default: text)."),
        click.option("--prefix", default=None, help='Prepended to every input (default "summarize: " for T5-family models, "" otherwise).'),
        click.option("--max-input-length", type=int, default=512, show_default=True, help="Tokens kept per input (truncation is counted and reported)."),
        click.option("--max-target-length", type=int, default=128, show_default=True, help="Tokens kept per target."),
        click.option("--limit", type=int, default=None, help="Use only the first N rows."),
        click.option("--device", default="auto", show_default=True, help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps."),
        click.option("--trust-remote-code", is_flag=True, help="Allow models with custom code from the hub (off: such code is never executed)."),
    ]

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(kdcache.__version__, prog_name="kdcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default="INFO", show_default=True)
def app(debug: bool, log_level: str) -> None:
    """kdcache: distil a large teacher into a small student through an offline teacher-logit cache.

    \b
    kdcache dump-teacher  --model TEACHER --dataset DATA --output CACHE
    kdcache train-student --cache CACHE --student STUDENT --output RUN
    kdcache evaluate      --model RUN/final_model --dataset DATA --metric rouge
    """
    # Only kdcache's own logger prints: libraries (absl via rouge-score, datasets) stay quiet.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    # The console shows --log-level and above; the logger itself passes everything, so the run's log
    # files keep INFO records whatever the console shows.
    log.handlers[0].setLevel(log_level.upper())
    log.setLevel(logging.DEBUG)


@app.command("dump-teacher")
@click.option("--model", required=True, help="Teacher: hub id or local save_pretrained folder.")
@_data_options("train")
@click.option("--topk", type=int, default=64, show_default=True, help="Teacher entries kept per position (the rest of the mass goes to the tail bucket).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per teacher forward (batches are grouped by length).")
@click.option("--block-size", type=int, default=1024, show_default=True, help="Examples per block: the unit of writing and resuming.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Teacher weights dtype (auto: bf16 on GPUs that support it, else fp32).")
@click.option("--output", default="./teacher_cache", show_default=True, help="Cache directory (a Zarr v3 group).")
@click.option("--overwrite", is_flag=True, help="Replace an existing complete cache, or one made with other parameters.")
def dump_teacher_cmd(**kw: Any) -> None:
    """Run the teacher once over a dataset and cache its top-k distributions."""
    summary = kdcache.dump_teacher(DumpConfig(**kw))
    click.echo(
        f"cache {summary['output']}: {summary['examples']} examples, {summary['tokens']} distilled tokens "
        f"({summary['blocks_written']}/{summary['blocks_total']} blocks written this run), "
        f"mean captured mass {summary['captured_mass_mean']:.3f}, {summary['seconds']:.1f} s"
    )


@app.command("train-student")
@click.option("--cache", required=True, help="Teacher cache written by dump-teacher.")
@click.option("--student", required=True, help="Student: hub id or local save_pretrained folder (its tokenizer must match the cache's).")
@click.option("--output", default="./distilled_model", show_default=True, help="Run directory: final_model/ and logs/ go here.")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature T.")
@click.option("--alpha", type=float, default=0.7, show_default=True, help="Weight of the KD term (T² · KL).")
@click.option("--beta", type=float, default=0.3, show_default=True, help="Weight of the cross-entropy term.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="AdamW learning rate (linear warmup, linear decay).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--mixed-precision/--no-mixed-precision", default=True, show_default=True, help="bf16 (or fp16 + loss scaling) autocast on CUDA; CPU always trains in fp32.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps between metric records.")
@click.option("--shuffle-buffer", type=int, default=4096, show_default=True, help="Examples mixed across blocks when streaming the cache.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing final_model/.")
def train_student_cmd(**kw: Any) -> None:
    """Train a student from the cache alone (the teacher is never loaded)."""
    summary = kdcache.train_student(TrainConfig(**kw))
    loss = summary["loss"]
    click.echo(
        f"saved {summary['final_model']}: {summary['steps']} steps in {summary['seconds']:.1f} s"
        + (f", last loss {loss:.4f} (KD {summary['kd_loss']:.4f}, CE {summary['ce_loss']:.4f})" if loss is not None else "")
    )


@app.command("evaluate")
@click.option("--model", required=True, help="Model to score: hub id or local folder (e.g. RUN/final_model).")
@_data_options("test")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRICS), default=("rouge",), show_default=True, help="Repeatable.")
@click.option("--num-beams", type=int, default=4, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--output", default=None, help="Write results.json and samples.jsonl here.")
def evaluate_cmd(**kw: Any) -> None:
    """Generate and score: ROUGE-1/2/L/Lsum (rouge-score, stemmed) and token perplexity."""
    kw["metrics"] = list(kw["metrics"])
    out = kdcache.evaluate(EvalConfig(**kw))
    res = out["results"]
    width = max(len(k) for k in res)
    click.echo(f"{'metric':<{width}}  value")
    for key, value in res.items():
        click.echo(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


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
