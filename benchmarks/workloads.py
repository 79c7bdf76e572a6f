"""Benchmark workloads: sets of parameter shapes (no weights), and the dtypes they run in.

Workload names:

``llama-125m``
    The parameters of a Llama-architecture model of ~135M parameters (SmolLM-135M's shapes:
    hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings).
``llama-1b``
    ~1.1B parameters (TinyLlama-1.1B's shapes: hidden 2048, 22 layers, 32 heads / 4 KV heads,
    MLP 5632, vocab 32000, untied LM head).
``llama-tiny``
    The same structure at toy size (CPU dry runs and tests).
``flat-2^K`` / ``flat-N``
    One flat tensor of ``2^K`` (or ``N``) elements.
``many-small-NxM``
    ``N`` tensors of ``M`` elements each (launch- and bookkeeping-bound).

The Llama shapes come from a shape list computed from the config (the default, no dependency), or
from a ``transformers.LlamaForCausalLM`` built on the meta device (``shapes_from="transformers"``);
a test checks the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = [
    "Workload",
    "DtypeConfig",
    "DTYPE_CONFIGS",
    "LLAMA_CONFIGS",
    "FULL_WORKLOADS",
    "QUICK_WORKLOADS",
    "TINY_WORKLOADS",
    "TINY_MAX_ELEMENTS",
    "get_workload",
    "llama_shapes",
    "llama_shapes_from_transformers",
    "tiny_counterpart",
]

LLAMA_CONFIGS: dict[str, dict] = {
    "llama-125m": dict(  # SmolLM-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "llama-1b": dict(  # TinyLlama-1.1B
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
    ),
}

# Defaults: the GPU set (issue 5), the CPU --quick set, and the toy set of tests and dry runs.
FULL_WORKLOADS = ("llama-125m", "llama-1b", "flat-2^28", "many-small-2000x4096")
QUICK_WORKLOADS = ("flat-2^22", "many-small-128x4096")
TINY_WORKLOADS = ("llama-tiny", "flat-2^12", "many-small-16x256")
# --tiny keeps a workload up to this size and swaps a larger one for its toy counterpart.
TINY_MAX_ELEMENTS = 2**17


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str
    source: str = "shape list"
    notes: Optional[str] = None

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_elements(self) -> int:
        return sum(_numel(shape) for shape in self.shapes)

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "description": self.description,
            "num_tensors": self.num_tensors,
            "num_elements": self.num_elements,
            "source": self.source,
        }
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass(frozen=True)
class DtypeConfig:
    """Param dtype and the dtype ours keeps its moments and Fisher in."""

    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    fisher_dtype: torch.dtype = field(default=torch.float32)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "param_dtype": str(self.param_dtype).replace("torch.", ""),
            "state_dtype": str(self.state_dtype).replace("torch.", ""),
            "fisher_dtype": str(self.fisher_dtype).replace("torch.", ""),
        }


DTYPE_CONFIGS: dict[str, DtypeConfig] = {
    "fp32": DtypeConfig("fp32", torch.float32, torch.float32),
    # bf16 params, fp32 moments and Fisher: ours' default for low-precision params.
    "bf16": DtypeConfig("bf16", torch.bfloat16, torch.float32),
    # bf16 everywhere: like for like with torch.optim.AdamW, which keeps state in the param dtype.
    "bf16-bf16state": DtypeConfig("bf16-bf16state", torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


def llama_shapes(config: dict) -> list[tuple[int, ...]]:
    """The parameter shapes of ``LlamaForCausalLM(LlamaConfig(**config))``, in module order."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(config["num_hidden_layers"]):
        shapes += [
            (heads * head_dim, hidden),  # q_proj
            (kv_heads * head_dim, hidden),  # k_proj
            (kv_heads * head_dim, hidden),  # v_proj
            (hidden, heads * head_dim),  # o_proj
            (inter, hidden),  # gate_proj
            (inter, hidden),  # up_proj
            (hidden, inter),  # down_proj
            (hidden,),  # input_layernorm
            (hidden,),  # post_attention_layernorm
        ]
    shapes.append((hidden,))  # final norm
    if not config.get("tie_word_embeddings", False):
        shapes.append((vocab, hidden))  # lm_head
    return shapes


def llama_shapes_from_transformers(config: dict) -> list[tuple[int, ...]]:
    """Build ``LlamaForCausalLM`` on the meta device (no memory, no weights) and list its
    parameter shapes (tied weights appear once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return [tuple(p.shape) for p in model.parameters()]


def _parse_count(text: str) -> int:
    match = re.fullmatch(r"2\^(\d+)", text)
    if match:
        return 2 ** int(match.group(1))
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"cannot read an element count from {text!r} (use N or 2^K)")


def get_workload(name: str, shapes_from: str = "list") -> Workload:
    """The workload called ``name`` (see the module docstring for the names)."""
    if name in LLAMA_CONFIGS:
        config = LLAMA_CONFIGS[name]
        shapes, source, notes = llama_shapes(config), "shape list from the LlamaConfig", None
        if shapes_from == "transformers":
            try:
                shapes = llama_shapes_from_transformers(config)
                source = "transformers LlamaForCausalLM on the meta device"
            except Exception as exc:  # no transformers here: the shape list is the same thing
                notes = f"transformers unavailable ({type(exc).__name__}: {exc}); used the list"
        elif shapes_from != "list":
            raise ValueError(f"shapes_from must be 'list' or 'transformers', got {shapes_from!r}")
        total = sum(_numel(s) for s in shapes)
        description = (
            f"Llama parameters, {total / 1e6:.1f}M in {len(shapes)} tensors "
            f"(hidden {config['hidden_size']}, {config['num_hidden_layers']} layers)"
        )
        return Workload(name, tuple(shapes), description, source, notes)
    if name.startswith("flat-"):
        n = _parse_count(name[len("flat-"):])
        return Workload(name, ((n,),), f"one flat tensor of {n:,} elements")
    match = re.fullmatch(r"many-small-(\d+)x(\d+)", name)
    if match:
        count, size = int(match.group(1)), int(match.group(2))
        if count < 1 or size < 1:
            raise ValueError(f"workload {name!r}: counts must be positive")
        return Workload(
            name, ((size,),) * count, f"{count:,} tensors of {size:,} elements each"
        )
    raise ValueError(
        f"unknown workload {name!r}; use one of {sorted(LLAMA_CONFIGS)}, flat-2^K, flat-N, "
        "many-small-NxM"
    )


def tiny_counterpart(name: str) -> str:
    """The toy-sized workload of the same kind (dry runs exercise the same code paths)."""
    if name in LLAMA_CONFIGS:
        return "llama-tiny"
    if name.startswith("flat-"):
        return "flat-2^12"
    if name.startswith("many-small-"):
        return "many-small-16x256"
    raise ValueError(f"unknown workload {name!r}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
