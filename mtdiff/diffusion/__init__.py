"""MT-Diffusion's diffusion math: schedules, forward process (M1, M3), posterior (M4), loss (M5), samplers."""
from mtdiff.diffusion.process import TASK_ORDER, MTDiffusion
from mtdiff.diffusion.schedules import (
    Schedule,
    build_schedule,
    c_closed_form,
    c_recursion,
    make_betas,
    make_w,
)

__all__ = [
    "MTDiffusion", "Schedule", "TASK_ORDER", "build_schedule", "c_closed_form", "c_recursion",
    "make_betas", "make_w",
]
