"""The benchmarks of fisherforget: a folder of the checkout, not part of the installed package.

``python -m benchmarks [--quick | step | score | estimate | overhead ...]`` (``make bench``) times
the optimizer step, the Fisher score and Fisher estimation against their baselines:
``baselines`` holds every baseline; ``step``, ``score``, ``estimate`` define what is timed;
``overhead`` the CPU step ratios and the host cost per step; ``core`` runs them; ``timing``
measures; ``workloads`` lists the shape sets; ``report`` writes the JSON, markdown, plot and
summary; ``cli`` is the command line. Scripts beside them: ``gpu_check.sh`` (the one prepared run
on a GPU machine), ``compile_report.py`` (what the Triton kernels compile to), ``cpu_kernels.py``,
``lwf_scoring.py``, ``lwf_real.py``, ``lwf_tables.py``. See ``docs/benchmarks.md``.
"""
