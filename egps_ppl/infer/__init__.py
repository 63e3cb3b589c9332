"""Inference: the batched MCMC runner, continuous batching across prompts, growth schedules and samplers."""

from egps_ppl.infer.batched import Unit, UnitOutput, run_units, supports_batching
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
    "Unit",
    "UnitOutput",
    "load_sampler",
    "make_schedule",
    "power_conditional",
    "register_sampler",
    "resample",
    "rollout_log_weights",
    "run_units",
    "supports_batching",
]
