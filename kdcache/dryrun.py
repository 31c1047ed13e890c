"""``--dry-run``: the whole path (dump → train → evaluate) in seconds, offline, with tiny models.

The models are of the configured architecture family (T5-style for seq2seq teachers, GPT-2-style for
causal ones) but built from configs with a small byte-level BPE tokenizer trained on built-in text, so
nothing is downloaded. Everything is written to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import corpora
from .config import DumpConfig, EvalConfig, TrainConfig

log = logging.getLogger("kdcache")


def build_tokenizer(texts: list[str], family: str, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer as a ``PreTrainedTokenizerFast``: T5 conventions (``<pad>`` 0,
    ``</s>`` 1 appended to every sequence, ``<unk>`` 2) or GPT-2's (``<|endoftext|>`` as BOS/EOS)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    t5 = family == "t5"
    specials = ["<pad>", "</s>", "<unk>"] if t5 else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if t5 else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if t5:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_model(tok: Any, family: str, d_model: int, layers: int, seed: int) -> Any:
    """A randomly initialised model of the family; T5's embedding is padded past the tokenizer (as
    t5-small's 32128 rows for 32100 tokens) so that path is exercised too."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if family == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=len(tok) + 16, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers,
            num_decoder_layers=layers, num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        ))
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_embd=d_model, n_layer=layers, n_head=2, n_positions=512,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    ))


def family_of(model: str) -> str:
    """``t5`` or ``gpt2`` for the model a command was configured with, without downloading it: a local
    folder's config says; a hub id is judged by its name (encoder-decoder names → t5)."""
    import json

    cfg = Path(model) / "config.json"
    if cfg.is_file():
        conf = json.loads(cfg.read_text())
        return "t5" if conf.get("is_encoder_decoder") or conf.get("model_type") in ("t5", "mt5", "bart") else "gpt2"
    name = model.lower()
    return "t5" if any(k in name for k in ("t5", "bart", "pegasus", "marian")) else "gpt2"


def dry_run(model: str, command: str) -> dict[str, Any]:
    """Run dump-teacher, train-student and evaluate on a handful of built-in examples with tiny models
    of ``model``'s family; returns a summary of what ran (nothing is left on disk)."""
    from .dump import dump_teacher
    from .evaluate import evaluate
    from .models import quiet_transformers
    from .train import train_student

    quiet_transformers()
    t0 = time.perf_counter()
    family = family_of(model)
    corpus = "python-docstrings" if family == "t5" else "python-code"
    columns = {"input_column": "code", "target_column": "docstring"} if family == "t5" else {"text_column": "text"}
    sample = corpora.rows(corpus, "validation")[:200]
    with tempfile.TemporaryDirectory(prefix="kdcache-dry-run-") as tmp:
        root = Path(tmp)
        tok = build_tokenizer([r.get("code", r.get("text", "")) + r.get("docstring", "") for r in sample], family)
        for name, (d, layers, seed) in {"teacher": (64, 2, 0), "student": (32, 1, 1)}.items():
            tiny_model(tok, family, d, layers, seed).save_pretrained(root / name)
            tok.save_pretrained(root / name)
        data = {"dataset": f"builtin:{corpus}", "split": "validation", "limit": 12, "max_input_length": 128,
                "max_target_length": 32, "device": "cpu", **columns}
        dump = dump_teacher(DumpConfig(model=str(root / "teacher"), output=str(root / "cache"), topk=8, batch_size=4,
                                       block_size=4, **data))
        train = train_student(TrainConfig(cache=str(root / "cache"), val_cache=str(root / "cache"), student=str(root / "student"),
                                          output=str(root / "run"), max_steps=4, batch_size=4, grad_accum=1, warmup_steps=1,
                                          log_every=1, eval_steps=2, save_steps=2, lr=1e-3, device="cpu"))
        written = sorted(p.name for p in (root / "run").iterdir())
        metrics = ["rouge", "bleu", "perplexity"] if family == "t5" else ["perplexity"]
        ev = evaluate(EvalConfig(model=str(root / "run" / "final_model"), metrics=metrics, max_new_tokens=8, num_beams=1,
                                 output=str(root / "eval"), **{**data, "limit": 4}))
    return {
        "command": command, "family": family, "configured_model": model, "dataset": f"builtin:{corpus} (validation, 12 rows)",
        "dump": {"examples": dump["examples"], "tokens": dump["tokens"], "k": 8},
        "train": {"steps": train["steps"], "loss": train["loss"], "wrote": written},
        "evaluate": ev["results"], "seconds": time.perf_counter() - t0,
    }
