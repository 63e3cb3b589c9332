"""Inference: the batched MCMC runner and growth schedules."""

from egps_ppl.infer.mcmc import MCMC
from egps_ppl.infer.mcmc_sampler import MCMCSampler
from egps_ppl.infer.samplers import Sampler, SamplerResult, load_sampler, register_sampler
from egps_ppl.infer.schedule import BlockSchedule, EntropyAdaptiveSchedule, make_schedule
from egps_ppl.infer.smc import PowerSMC, resample
from egps_ppl.infer.sps import ScalablePowerSampler, power_conditional, rollout_log_weights

__all__ = [
    "MCMC",
    "BlockSchedule",
    "EntropyAdaptiveSchedule",
    "MCMCSampler",
    "PowerSMC",
    "Sampler",
    "SamplerResult",
    "ScalablePowerSampler",
    "load_sampler",
    "make_schedule",
    "power_conditional",
    "register_sampler",
    "resample",
    "rollout_log_weights",
]
