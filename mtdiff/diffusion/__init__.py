"""MT-Diffusion's diffusion math: schedules, forward process (M1, M3), posterior (M4), loss (M5), sampler."""
from mtdiff.diffusion.process import TASK_ORDER, MTDiffusion
from mtdiff.diffusion.sampler import Sampler
from mtdiff.diffusion.schedules import (
    Schedule,
    build_schedule,
    c_closed_form,
    c_recursion,
    make_betas,
    make_w,
)

__all__ = [
    "MTDiffusion", "Sampler", "Schedule", "TASK_ORDER", "build_schedule", "c_closed_form", "c_recursion",
    "make_betas", "make_w",
]
