"""Calls fisherforget._C's ops one per fresh process and prints each exit status: which op
crashes a process (a segfault kills only its probe). Used on the GPU machine by device_diag.sh and
verify.sh, from the repository root: ``python benchmarks/device/probe.py [probe names]``."""

import subprocess
import sys

_IMPORT = "import torch, fisherforget._C; ops = torch.ops.fisherforget_C; "
_STEP = ("import torch; from fisherforget import FisherAdamW; "
         "p = torch.nn.Parameter(torch.ones(8, device={device!r})); "
         "o = FisherAdamW([p], backend={backend!r}); p.grad = torch.ones_like(p); o.step(); "
         "print(p)")
PROBES = {
    "import": "import fisherforget._C as m; print(m.__file__)",
    "cpu_isa": _IMPORT + "print(ops.cpu_isa())",
    "build_info": _IMPORT + "print(ops.build_info())",
    "torch_first_build_info": (
        "import glob, torch; torch.ops.load_library(glob.glob('fisherforget/_C*.so')[0]); "
        "print(torch.ops.fisherforget_C.build_info())"),
    "score_cpu": _IMPORT + "a = [torch.ones(5)]; print(ops.fisher_score(a, a, a))",
    "score_cuda": _IMPORT + "a = [torch.ones(5, device='cuda')]; print(ops.fisher_score(a, a, a))",
    "step_cuda": _STEP.format(device="cuda", backend="cuda"),
    "step_cpu": _STEP.format(device="cpu", backend="cpu"),
}
names = sys.argv[1:] or list(PROBES)
for name in names:
    code = PROBES[name]
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                       text=True, timeout=120)
    print(f"== {name}: rc={r.returncode}\n{r.stdout[-600:]}{r.stderr[-1500:]}", flush=True)
