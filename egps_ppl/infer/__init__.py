"""Inference: the batched MCMC runner and growth schedules."""

from egps_ppl.infer.mcmc import MCMC
from egps_ppl.infer.schedule import BlockSchedule, EntropyAdaptiveSchedule, make_schedule
from egps_ppl.infer.smc import PowerSMC, resample
from egps_ppl.infer.sps import ScalablePowerSampler, power_conditional, rollout_log_weights

__all__ = [
    "MCMC",
    "BlockSchedule",
    "EntropyAdaptiveSchedule",
    "PowerSMC",
    "ScalablePowerSampler",
    "make_schedule",
    "power_conditional",
    "resample",
    "rollout_log_weights",
]
