"""``fisherforget demo``: train a tiny ``transformers`` causal LM with ``FisherAdamW`` swapped in.

The model is built from a config (no download); the corpus is generated here: arithmetic
progressions modulo the vocabulary (``start, start+stride, start+2*stride, ...``), which a small
model learns within a few hundred steps. Each logged line shows the training loss, the held-out
loss and the Fisher estimate's statistics.
"""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="FisherAdamW backend (default auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=20)


VOCAB = 61  # prime, so every stride generates the whole ring


def progressions(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    stride = torch.randint(1, 8, (batch, 1), generator=generator)
    return (start + stride * torch.arange(seq_len)) % VOCAB


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def run(args: argparse.Namespace) -> int:
    from fisherforget import FisherAdamW

    device = torch.device(args.device)
    model = tiny_llama(args.seed).to(device)
    optimizer = FisherAdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fisher="ema",
                            fisher_beta=0.95, backend=args.backend)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    data = torch.Generator().manual_seed(args.seed)
    held_out = progressions(256, args.seq_len, torch.Generator().manual_seed(10_000 + args.seed))
    held_out = held_out.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama: {n_params:,} params on {device}, FisherAdamW(fisher='ema', "
          f"backend={args.backend!r}), {args.steps} steps of {args.batch_size}x{args.seq_len}")
    print(f"{'step':>5} {'train':>8} {'held-out':>9} {'F mean':>10} {'F p50':>10} "
          f"{'F p99':>10} {'time':>7}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = progressions(args.batch_size, args.seq_len, data).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                val = model(input_ids=held_out, labels=held_out).loss.item()
            print(f"{step:>5} {loss.item():>8.4f} {val:>9.4f} {optimizer.fisher_mean():>10.3e} "
                  f"{optimizer.fisher_quantile(0.5):>10.3e} "
                  f"{optimizer.fisher_quantile(0.99):>10.3e} "
                  f"{time.perf_counter() - start:>6.1f}s")
    return 0
