"""Compile the kernels for a GPU target without a GPU and report what the compiler made of them.

    python benchmarks/compile_report.py [--arch 90] [--json]

Triton ships ``ptxas`` and ``cuobjdump``, so each kernel variant below is compiled to a cubin on
any machine (``TRITON_INTERPRET`` must be unset). For each variant: registers per thread, local
memory (spills), the number of 128-bit global loads and stores in the SASS (16-byte vector
accesses, what a memory-bound kernel needs), and float atomics (there must be none: the score's
reduction is deterministic). The tests run this; a GPU run should compare its timings with it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_report compiles real kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fisherforget.backends.triton import load_kernels  # noqa: E402

load_kernels()  # fisherforget.kernels, installed or from a source checkout
from fisherforget.kernels import fisher, multi_tensor, step  # noqa: E402

_SCALAR_TYPES = {"float64": "fp64", "float32": "fp32", "int32": "i32", "int64": "i64"}


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    signature = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            annotation = str(param.annotation).split(".")[-1]
            signature[name] = _SCALAR_TYPES.get(annotation, "i32")
    return signature


def _variants(block: int):
    fp32, bf16 = tl.float32, tl.bfloat16
    step_pointers = dict(tensor_table_ptr="*i64", chunk_table_ptr="*i64", lr_ptr="*fp32",
                         grad_scale_ptr="*fp32", found_inf_ptr="*fp32")

    def step_variant(label, p=fp32, state=fp32, f=fp32, **flags):
        constexprs = dict(P_DTYPE=p, G_DTYPE=p, M_DTYPE=state, V_DTYPE=state, VMAX_DTYPE=state,
                          F_DTYPE=f, LR_IS_TENSOR=False, HAS_GRAD_SCALE=False,
                          HAS_FOUND_INF=False, AMSGRAD=False, HAS_FISHER=True, ANY_MASK=False,
                          FREEZES=False, ALIGNED=True, BLOCK=block)
        constexprs.update(flags)
        widest = max(d.primitive_bitwidth for d in (p, state, f)) // 8
        constexprs["VEC"] = 16 // widest
        loaded = 4 + constexprs["AMSGRAD"] + constexprs["HAS_FISHER"]  # (the mask is 1 byte)
        stored = 3 + constexprs["AMSGRAD"] + constexprs["HAS_FISHER"]
        return dict(kernel=step._fused_step_kernel, label=label, pointers=step_pointers,
                    constexprs=constexprs, options=multi_tensor.EXACT_FP32, operands_loaded=loaded, operands_stored=stored,
                    freezes=constexprs["FREEZES"])

    yield step_variant("fp32 params/state, Fisher (the 36 B/element case)")
    yield step_variant("fp32, plain AdamW (no Fisher)", HAS_FISHER=False)
    yield step_variant("fp32, everything on", AMSGRAD=True, ANY_MASK=True, FREEZES=True,
                       LR_IS_TENSOR=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)
    yield step_variant("bf16 params, fp32 state", p=bf16)
    yield step_variant("bf16 params, bf16 state and Fisher", p=bf16, state=bf16, f=bf16)
    yield dict(kernel=step._advance_counters_kernel, label="step/count increments",
               pointers=dict(tensor_table_ptr="*i64", found_inf_ptr="*fp32"),
               constexprs=dict(HAS_FOUND_INF=True, BLOCK=128), operands_loaded=0,
               operands_stored=0, freezes=False, num_warps=1)
    yield dict(kernel=fisher._fisher_accumulate_kernel, label="accumulate fp32",
               pointers=dict(tensor_table_ptr="*i64", chunk_table_ptr="*i64",
                             grad_scale_ptr="*fp32"),
               constexprs=dict(F_DTYPE=fp32, G_DTYPE=fp32, HAS_GRAD_SCALE=True, ALIGNED=True,
                               VEC=4, BLOCK=block), operands_loaded=2, operands_stored=1,
               freezes=False, options=multi_tensor.EXACT_FP32)
    yield dict(kernel=fisher._fisher_score_kernel, label="score bf16 grads, fp32 d and F",
               pointers=dict(tensor_table_ptr="*i64", chunk_table_ptr="*i64",
                             partials_ptr="*fp64"),
               constexprs=dict(D_DTYPE=fp32, G_DTYPE=bf16, F_DTYPE=fp32, ALIGNED=True,
                               VEC=4, BLOCK=block), operands_loaded=2, operands_stored=0,
               freezes=False)
    yield dict(kernel=fisher._fisher_score_kernel, label="score fp32",
               pointers=dict(tensor_table_ptr="*i64", chunk_table_ptr="*i64",
                             partials_ptr="*fp64"),
               constexprs=dict(D_DTYPE=fp32, G_DTYPE=fp32, F_DTYPE=fp32, ALIGNED=True,
                               VEC=4, BLOCK=block), operands_loaded=3, operands_stored=0,
               freezes=False)
    yield dict(kernel=fisher._sum_partials_kernel, label="score second stage",
               pointers=dict(partials_ptr="*fp64", out_ptr="*fp64"),
               constexprs=dict(BLOCK=1024), operands_loaded=0, operands_stored=0,
               freezes=False)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, local, sass


def report(arch: int = 90, block: int = multi_tensor._DEFAULT_BLOCK,
           num_warps: int = multi_tensor._DEFAULT_NUM_WARPS) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for variant in _variants(block):
        kernel = variant["kernel"]
        signature = _signature(kernel, variant["pointers"], variant["constexprs"])
        # Pointer arguments are 16-byte aligned, as the launcher's torch tensors are.
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, name in enumerate(signature) if signature[name].startswith("*")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=variant["constexprs"],
                           attrs=attrs)
        # The launchers' own compile options (EXACT_FP32 for the step and the accumulation).
        options = dict(variant.get("options", {}), num_warps=variant.get("num_warps", num_warps))
        compiled = triton.compile(source, target=target, options=options)
        regs, local, sass = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        rows.append(dict(
            kernel=kernel.fn.__name__, variant=variant["label"], arch=f"sm_{arch}",
            registers=regs, spilled_bytes=local,
            shared_bytes=compiled.metadata.shared,
            vector_loads_128=len(re.findall(r"\bLDG\.E\.128\b", sass)),
            vector_loads_64=len(re.findall(r"\bLDG\.E\.64\b", sass)),
            vector_stores_128=len(re.findall(r"\bSTG\.E\.128\b", sass)),
            vector_stores_64=len(re.findall(r"\bSTG\.E\.64\b", sass)),
            # Fused multiply-adds the compiler contracted from separate fp32 mul and add (PTX
            # `fma.rn.f32`). The SASS of an IEEE division or square root uses FFMA internally
            # (Newton steps), so the PTX, not the SASS, says whether the math was contracted.
            fp32_fma=len(re.findall(r"\bfma\.rn(\.ftz)?\.f32\b", ptx)),
            float_atomics=len(re.findall(r"\b(atom|red)\.[a-z.]*\.(add\.)?f(16|32|64)", ptx)),
            operands_loaded=variant["operands_loaded"],
            operands_stored=variant["operands_stored"], freezes=variant["freezes"],
        ))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--block", type=int, default=multi_tensor._DEFAULT_BLOCK)
    parser.add_argument("--num-warps", type=int, default=multi_tensor._DEFAULT_NUM_WARPS)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.block, args.num_warps)
    if args.json:
        print(json.dumps(rows))
        return 0
    header = (f"{'kernel':26} {'variant':50} regs spill smem ld128 ld64 st128 st64 "
              "fma32 f-atomics")
    print(header)
    for r in rows:
        print(f"{r['kernel']:26} {r['variant']:50} {r['registers']:4} {r['spilled_bytes']:5} "
              f"{r['shared_bytes']:4} {r['vector_loads_128']:5} {r['vector_loads_64']:4} "
              f"{r['vector_stores_128']:5} {r['vector_stores_64']:4} {r['fp32_fma']:5} "
              f"{r['float_atomics']:9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
