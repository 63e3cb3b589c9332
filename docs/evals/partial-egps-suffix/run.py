"""Experiment: EGPS's entropy-jump cut with 8 *suffix* tries at temperature 1/alpha (instead of 4-token windows)."""

import torch

from egps_ppl.evals.methods import SamplerMethod
from egps_ppl.evals.runner import evaluate
from egps_ppl.evals.tasks import load_task
from egps_ppl.infer import MCMCSampler
from egps_ppl.kernels import EntropyJumpSite, MultipleTryMetropolis
from egps_ppl.kernels.presets import register_preset
from egps_ppl.models.registry import load_model

torch.set_num_threads(1)
register_preset(
    "egps-suffix",
    lambda target, policy: MultipleTryMetropolis(
        target, num_tries=8, selector=EntropyJumpSite(beta=4.0, floor=1e-3), policy=policy, name="egps-suffix"
    ),
    "entropy-jump cut, 8 suffix tries at temperature 1/alpha, Multiple-Try Metropolis",
)
lm = load_model("smollm2-135m")
summary = evaluate(
    load_task("arithmetic"),
    SamplerMethod(MCMCSampler("egps-suffix", steps=10), alpha=4.0),
    lm,
    seeds=[0, 1],
    limit=30,
    out_dir="runs/arith/egps-suffix",  # stopped after 38 of 60 units
    resume=True,
    progress=False,
    max_new_tokens=48,
)
print(summary)
