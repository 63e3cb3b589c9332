"""egps_ppl: sample language-model completions from the power distribution π(x) ∝ p(x | prompt)^α.

The pieces: :mod:`egps_ppl.target` (the unnormalised target), :mod:`egps_ppl.models` (backends with batched,
cached ``extend``/``score``), :mod:`egps_ppl.kernels` (site selectors, proposals, MH/MTM corrections,
combinators), :mod:`egps_ppl.infer` (the batched runner and schedules), :mod:`egps_ppl.diagnostics` (ArviZ),
:mod:`egps_ppl.testing` (exact invariance checks) and :mod:`egps_ppl.evals` (evaluation tasks and harness).
"""

__version__ = "0.1.0"
