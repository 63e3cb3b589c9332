"""Inference: the batched MCMC runner and growth schedules."""

from egps_ppl.infer.mcmc import MCMC
from egps_ppl.infer.schedule import BlockSchedule, EntropyAdaptiveSchedule, make_schedule

__all__ = ["MCMC", "BlockSchedule", "EntropyAdaptiveSchedule", "make_schedule"]
