"""Calls fisherforget._C's ops one per fresh process and prints each exit status: which op
crashes a process (a segfault kills only its probe). Used on the GPU machine by device_diag.sh and
verify.sh, from the repository root: ``python benchmarks/device/probe.py [probe names]``."""
import subprocess, sys
PROBES = {
    "import": "import fisherforget._C as m; print(m.__file__)",
    "cpu_isa": "import torch, fisherforget._C; print(torch.ops.fisherforget_C.cpu_isa())",
    "build_info": "import torch, fisherforget._C; print(torch.ops.fisherforget_C.build_info())",
    "torch_first_build_info": "import torch; torch.ops.load_library(__import__('glob').glob('fisherforget/_C*.so')[0]); print(torch.ops.fisherforget_C.build_info())",
    "score_cpu": "import torch, fisherforget._C; a=[torch.ones(5)]; print(torch.ops.fisherforget_C.fisher_score(a,a,a))",
    "score_cuda": "import torch, fisherforget._C; a=[torch.ones(5,device='cuda')]; print(torch.ops.fisherforget_C.fisher_score(a,a,a))",
    "step_cuda": "import torch; from fisherforget import FisherAdamW; p=torch.nn.Parameter(torch.ones(8,device='cuda')); o=FisherAdamW([p],backend='cuda'); p.grad=torch.ones_like(p); o.step(); print(p)",
    "step_cpu": "import torch; from fisherforget import FisherAdamW; p=torch.nn.Parameter(torch.ones(8)); o=FisherAdamW([p],backend='cpu'); p.grad=torch.ones_like(p); o.step(); print(p)",
}
names = sys.argv[1:] or list(PROBES)
for name in names:
    code = PROBES[name]
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120)
    print(f"== {name}: rc={r.returncode}\n{r.stdout[-600:]}{r.stderr[-1500:]}", flush=True)
