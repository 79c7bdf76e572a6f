"""Benchmarks of the optimizer step, the Fisher score and Fisher estimation
(``fisherforget bench``).

``baselines`` holds every baseline; ``step``, ``score``, ``estimate`` define what is timed;
``core`` runs them; ``timing`` measures; ``workloads`` lists the shape sets; ``report`` writes the
JSON, markdown, plot and summary; ``cli`` is the command line. See ``docs/benchmarks.md``.
"""
