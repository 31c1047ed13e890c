"""Train the quickstart's bundled teacher: a small GPT-2-style LM on the built-in ``python-code`` corpus.

Run once by the maintainers; the result ships in ``kdcache/assets/quickstart_teacher`` as float16
safetensors with a byte-level BPE tokenizer and a model card recording this script's command, the data,
the steps, the time and the held-out loss.

    python pipelines/train_quickstart_teacher.py --steps 1200 --output kdcache/assets/quickstart_teacher

Plain PyTorch, one loop: random 256-token windows of the concatenated training split (every module's
chunks, each ended by <|endoftext|>), AdamW, linear warmup then cosine decay.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdcache import corpora

EOS = "<|endoftext|>"


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=128)


def token_stream(tok: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    ids = tok(texts)["input_ids"]
    return np.fromiter((t for seq in ids for t in seq + [tok.eos_token_id]), dtype=np.int64)


@torch.no_grad()
def held_out_loss(model: GPT2LMHeadModel, stream: np.ndarray, ctx: int, batch: int = 16) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the held-out stream."""
    model.eval()
    n = (len(stream) - 1) // ctx
    total, count = 0.0, 0
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        x = torch.from_numpy(np.stack([stream[i * ctx : i * ctx + ctx] for i in idx]))
        y = torch.from_numpy(np.stack([stream[i * ctx + 1 : i * ctx + ctx + 1] for i in idx]))
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="kdcache/assets/quickstart_teacher")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    train_texts = [r["text"] for r in corpora.rows("python-code", "train")]
    val_texts = [r["text"] for r in corpora.rows("python-code", "validation")]
    tok = build_tokenizer(train_texts, args.vocab_size)
    train, val = token_stream(tok, train_texts), token_stream(tok, val_texts)
    print(f"tokenizer {len(tok)} tokens; train {len(train):,} tokens, validation {len(val):,} tokens", flush=True)

    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=args.context, n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    )
    history = []
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(train) - args.context - 1, args.batch_size)
        x = torch.from_numpy(np.stack([train[s : s + args.context] for s in starts])).to(args.device)
        y = torch.from_numpy(np.stack([train[s + 1 : s + args.context + 1] for s in starts])).to(args.device)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            vl = held_out_loss(model, val, args.context)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": vl, "minutes": (time.time() - t0) / 60})
            print(json.dumps(history[-1]), flush=True)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    minutes = (time.time() - t0) / 60
    final = history[-1]
    (out / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
    (out / "README.md").write_text(f"""# kdcache quickstart teacher

A small GPT-2-style causal LM for Python source code, bundled with kdcache so the quickstart runs with
no download. Trained from scratch by kdcache's own script; stored as float16 safetensors.

- **Command:** `{' '.join(['python', *sys.argv])}`
- **Data:** `builtin:python-code`, train split — the Python {sys.version.split()[0]} standard library's
  non-test modules, split 90/5/5 by a hash of the module path, cut at line boundaries into
  ~{corpora.CHUNK_CHARS}-character pieces ({len(train):,} training tokens).
- **Tokenizer:** byte-level BPE, {len(tok)} tokens, trained on the same split; `<|endoftext|>` is BOS/EOS.
- **Model:** GPT-2 architecture, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context},
  {n_params:,} parameters, no dropout.
- **Training:** {args.steps} steps of {args.batch_size} × {args.context}-token random windows
  ({args.steps * args.batch_size * args.context / len(train):.1f} passes over the data), AdamW lr {args.lr}
  (warmup {args.warmup}, cosine to 10%), weight decay 0.1, seed {args.seed}, on {args.device}; {minutes:.1f} minutes.
- **Held-out loss** (validation split, {len(val):,} tokens, non-overlapping {args.context}-token windows):
  {final['val_loss']:.4f} nats/token (perplexity {math.exp(final['val_loss']):.1f}); last training batch {final['train_loss']:.4f}.

The full curve is in `training_log.json`.
""")
    print(f"saved {out} after {minutes:.1f} min; held-out loss {final['val_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
