"""Benchmark: does the cache pay for itself? Dump speed against a bare teacher forward, the offline KD
step against plain fine-tuning, the online (teacher-in-the-loop) step, loader speed and bytes per token.

    python pipelines/bench.py --quick --json bench.json             # CPU, tiny models: under a minute
    python pipelines/bench.py --shapes t5 --device cuda --json t5.json  # t5-large → t5-small shapes
    python pipelines/bench.py --shapes gpt2 --device cuda              # gpt2 → distilgpt2 shapes

Models are randomly initialised from built-in configs of the real shapes (nothing is downloaded); the
tokenizer is a word-level one of the real vocabulary size built from the Python standard library, and
the data is ``builtin:python-code``. Every number comes from this one run: the machines this runs on are
shared, so compare the ratios, which are measured side by side, rather than absolute speeds across runs.
Peak memory is CUDA's allocator peak on a GPU, and on CPU the growth of peak RSS in a fresh process
(``/proc/self/status`` VmHWM over the RSS after loading), the only honest CPU equivalent.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python pipelines/bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from kdcache import (
    DumpConfig,
    corpora,
    dump_teacher,
    inspect_cache,
    open_cache,
)
from kdcache.batching import collate, length_grouped_batches, model_inputs
from kdcache.losses import IGNORE_INDEX, distillation_loss
from kdcache.models import resolve_device
from kdcache.train import CacheStream, online_targets

# (teacher config, student config, vocabulary, task); sizes of the public checkpoints.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"family": "gpt2", "vocab": 4096, "teacher": dict(n_embd=256, n_layer=4, n_head=4), "student": dict(n_embd=128, n_layer=2, n_head=4)},
    "gpt2": {"family": "gpt2", "vocab": 50257, "teacher": dict(n_embd=768, n_layer=12, n_head=12), "student": dict(n_embd=768, n_layer=6, n_head=12)},
    "t5": {"family": "t5", "vocab": 32100, "teacher": dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16),
           "student": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8)},
}


def word_tokenizer(vocab_size: int, family: str) -> Any:
    """A word-level tokenizer with exactly ``vocab_size`` ids: the standard library's most frequent words
    and symbols, padded with filler words. Realistic sequence lengths and the real softmax width."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<|endoftext|>", "<unk>"]
    counts: collections.Counter[str] = collections.Counter()
    for row in corpora.rows("python-code", "train")[:3000]:
        counts.update(re.findall(r"\w+|[^\w\s]", row["text"]))
    words = specials + [w for w, _ in counts.most_common(vocab_size - len(specials))]
    words += [f"<filler{i}>" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if family == "t5":
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")


def build_models(shapes: str, root: Path) -> tuple[str, str, str]:
    """Save a random teacher and student of ``shapes`` with one tokenizer under ``root``; returns
    (teacher dir, student dir, task)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    spec = SHAPES[shapes]
    tok = word_tokenizer(spec["vocab"], spec["family"])
    out = []
    for role in ("teacher", "student"):
        torch.manual_seed(0)
        if spec["family"] == "t5":
            model = T5ForConditionalGeneration(T5Config(vocab_size=32128 if shapes == "t5" else spec["vocab"], pad_token_id=0,
                                                        eos_token_id=1, decoder_start_token_id=0, **spec[role]))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=spec["vocab"], n_positions=1024, bos_token_id=0, eos_token_id=0, **spec[role]))
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        out.append(str(root / role))
    return out[0], out[1], "seq2seq" if spec["family"] == "t5" else "causal"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_loop(teacher_dir: str, cache_path: str, task: str, device: torch.device, batch_size: int, dtype: torch.dtype) -> float:
    """Distilled tokens per second of a bare teacher forward over the dump's own batches (the same
    examples, the same length grouping, the same batch size): the speed a dump should reach."""
    from kdcache.models import load_model

    model = load_model(teacher_dir, task, dtype=dtype).to(device).eval()
    cache = open_cache(cache_path)
    examples = [{k: v for k, v in cache[i].items() if k in ("input_ids", "labels")} for i in range(len(cache))]
    batches = []
    for b0 in range(0, len(examples), cache.block_size):  # as dump-teacher batches: by length within each block
        blk = examples[b0 : b0 + cache.block_size]
        for group in length_grouped_batches([len(e["input_ids"]) + len(e["labels"]) for e in blk], batch_size):
            batches.append(collate([blk[j] for j in group], task, 0, 0 if task == "seq2seq" else None))
    with torch.inference_mode():
        model(**model_inputs(batches[0], task, device))  # warm-up
        _sync(device)
        t = time.perf_counter()
        for batch in batches:
            model(**model_inputs(batch, task, device)).logits.float()
        _sync(device)
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) / (time.perf_counter() - t)


def _step_fn(kind: str, student: Any, teacher: Any, task: str, device: torch.device, vocab: int, temperature: float = 4.0) -> Any:
    """One optimizer step of ``kind``: "ce" (plain fine-tuning: the model's logits, F.cross_entropy),
    "kd" (kdcache's offline loss, alpha=0.7, beta=0.3, at ``temperature``: kdcache's default is 4) or
    "online" (the teacher's forward on the batch, then the same loss on its full distribution)."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(batch: dict[str, torch.Tensor]) -> None:
        logits = student(**model_inputs(batch, task, device)).logits
        labels = batch["labels"].to(device, non_blocking=True)
        if kind == "ce":
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)
        else:
            if kind == "online":
                ids, lp, tail = online_targets(teacher, batch, task, device, vocab)
            else:
                ids, lp, tail = (batch[k].to(device, non_blocking=True) for k in ("target_ids", "target_logprobs", "tail_logprob"))
            loss = distillation_loss(logits, labels, ids, lp, tail, alpha=0.7, beta=0.3, temperature=temperature, vocab_size=vocab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _batches(cache_path: str, task: str, batch_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    cache = open_cache(cache_path)
    examples = [cache[i] for i in range(min(len(cache), batch_size * n))]
    return [collate(examples[i : i + batch_size], task, 0, 0 if task == "seq2seq" else None) for i in range(0, len(examples), batch_size)]


def step_times(student_dir: str, teacher_dir: str, cache_path: str, task: str, device: torch.device, batch_size: int,
               steps: int, temperature: float = 4.0) -> dict[str, float]:
    """Median seconds per optimizer step for ce, kd and online, on the same batches, interleaved round
    by round so a noisy neighbour slows all three alike."""
    from kdcache.models import load_model

    vocab = int(open_cache(cache_path).meta["vocab_size"])
    batches = _batches(cache_path, task, batch_size, steps)
    teacher = load_model(teacher_dir, task, dtype=torch.float32).to(device).eval()
    fns = {}
    for kind in ("ce", "kd", "online"):
        student = load_model(student_dir, task, dtype=torch.float32).to(device).train()
        fns[kind] = _step_fn(kind, student, teacher, task, device, vocab, temperature)
        fns[kind](batches[0])  # warm-up (optimizer state, kernels)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(steps):
        for kind, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn(batches[r % len(batches)])
            _sync(device)
            times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(kind: str, student_dir: str, teacher_dir: str, cache_path: str, task: str, device_name: str, batch_size: int,
                temperature: float, q: Any) -> None:
    """In a fresh process: the peak memory of three steps of ``kind`` above what loading took."""
    from kdcache.models import load_model

    device = torch.device(device_name)
    torch.set_num_threads(1)
    vocab = int(open_cache(cache_path).meta["vocab_size"])
    batches = _batches(cache_path, task, batch_size, 3)
    student = load_model(student_dir, task, dtype=torch.float32).to(device).train()
    teacher = load_model(teacher_dir, task, dtype=torch.float32).to(device).eval() if kind == "online" else None
    fn = _step_fn(kind, student, teacher, task, device, vocab, temperature)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    for b in batches:
        fn(b)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    q.put(peak - base)


def peak_memory(kind: str, *args: Any) -> int:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(kind, *args, q))
    p.start()
    value = q.get(timeout=600)
    p.join()
    return int(value)


def loader_speed(cache_path: str, task: str, batch_size: int, device: torch.device) -> float:
    """Distilled tokens per second through train-student's own streaming loader (block reads, shuffle
    buffer, collate), to host memory (pinned on CUDA)."""
    from functools import partial

    stream = CacheStream(cache_path, seed=0, shuffle_buffer=4096)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=partial(collate, task=task, pad_id=0, decoder_start_id=0),
                                         pin_memory=device.type == "cuda")
    t = time.perf_counter()
    tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in loader)
    return tokens / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    shapes = args.shapes or ("tiny" if device.type == "cpu" else "t5")
    examples = args.examples or (192 if args.quick else 2048)
    steps = args.steps or (15 if args.quick else 30)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        root = Path(tmp)
        teacher, student, task = build_models(shapes, root)
        cache = str(root / "cache")
        # causal: every next token of code; seq2seq: code → its docstring (the built-in pairs)
        data = {"dataset": "builtin:python-code", "text_column": "text"} if task == "causal" else {"dataset": "builtin:python-docstrings", "input_column": "code",
                                                                                                     "target_column": "docstring"}
        summary = dump_teacher(DumpConfig(model=teacher, split="train", limit=examples, topk=args.topk, max_input_length=args.max_length,
                                          max_target_length=args.max_length, batch_size=args.batch_size,
                                          block_size=max(args.batch_size, examples // 4), device=str(device), output=cache,
                                          dtype="bf16" if dtype == torch.bfloat16 else "fp32", **data))
        forward = forward_loop(teacher, cache, task, device, args.batch_size, dtype)
        st = step_times(student, teacher, cache, task, device, args.train_batch_size, steps, args.temperature)
        mem = {k: peak_memory(k, student, teacher, cache, task, str(device), args.train_batch_size, args.temperature) for k in ("ce", "kd")}
        loader = loader_speed(cache, task, args.train_batch_size, device)
        info = inspect_cache(cache)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": name, "shapes": shapes, "task": task, "examples": examples, "distilled_tokens": info["tokens"], "topk": args.topk,
        "dump_tokens_per_s": summary["tokens_per_s"], "forward_tokens_per_s": forward,
        "dump_vs_forward": summary["tokens_per_s"] / forward,
        "kd_step_s": st["kd"], "ce_step_s": st["ce"], "kd_vs_ce_step": st["kd"] / st["ce"],
        "online_kd_step_s": st["online"], "online_vs_offline_step": st["online"] / st["kd"],
        "kd_peak_memory_bytes": mem["kd"], "ce_peak_memory_bytes": mem["ce"], "kd_vs_ce_peak_memory": mem["kd"] / mem["ce"],
        "loader_tokens_per_s": loader, "bytes_per_token": info["bytes_per_token"],
        "train_batch_size": args.train_batch_size, "steps_timed": steps, "temperature": args.temperature,
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        ("device", r["device"]), ("shapes", f"{r['shapes']} ({r['task']}), {r['distilled_tokens']:,} distilled tokens, top-{r['topk']}"),
        ("dump", f"{r['dump_tokens_per_s']:,.0f} tok/s = {r['dump_vs_forward']:.2f} × bare teacher forward ({r['forward_tokens_per_s']:,.0f} tok/s)"),
        ("offline KD step", f"{r['kd_step_s'] * 1e3:.1f} ms = {r['kd_vs_ce_step']:.2f} × CE-only step ({r['ce_step_s'] * 1e3:.1f} ms), T={r['temperature']:g}"),
        ("online KD step", f"{r['online_kd_step_s'] * 1e3:.1f} ms = {r['online_vs_offline_step']:.2f} × offline KD step"),
        ("peak memory", f"KD {r['kd_peak_memory_bytes'] / 2**20:.1f} MiB = {r['kd_vs_ce_peak_memory']:.2f} × CE-only ({r['ce_peak_memory_bytes'] / 2**20:.1f} MiB)"),
        ("loader", f"{r['loader_tokens_per_s']:,.0f} tok/s"),
        ("cache", f"{r['bytes_per_token']:.1f} bytes per distilled token"),
    ]
    return "\n".join(f"{k:<16} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute on a 2-core CPU")
    ap.add_argument("--shapes", choices=sorted(SHAPES), help="model shapes (default: tiny on CPU, t5 on a GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--examples", type=int)
    ap.add_argument("--steps", type=int, help="timed optimizer steps per kind")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="teacher batch size of the dump")
    ap.add_argument("--train-batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=4.0, help="KD temperature of the timed steps (kdcache's default: 4; 1 shares one softmax with CE)")
    ap.add_argument("--json", help="also write the results as one JSON object to this file")
    args = ap.parse_args(argv)
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
