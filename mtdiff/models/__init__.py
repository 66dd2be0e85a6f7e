"""MT-Diffusion model: U-Net or DiT backbone, task encoders E_i and heads D_i (see docs/method.md M2, M5)."""
from mtdiff.models.dit import DiTBackbone, sincos_pos_embed_2d, timestep_features, unpatchify
from mtdiff.models.factory import (TRAIN_FLOPS_PER_FORWARD, build_model, count_params, flops_per_image,
                                   input_shape_from_params)
from mtdiff.config import TASKS
from mtdiff.models.mtdit import MTDiT
from mtdiff.models.tasks import (IdentityEncoder, ImageHead, LabelEncoder, PooledHead,
                                 RepresentationEncoder, TaskModel, rms_normalize)
from mtdiff.models.unet import MTUNet, UNetBackbone

__all__ = ["TASKS", "MTDiT", "MTUNet", "UNetBackbone", "TaskModel", "build_model", "count_params", "TRAIN_FLOPS_PER_FORWARD", "flops_per_image", "input_shape_from_params",
           "DiTBackbone", "sincos_pos_embed_2d", "timestep_features", "unpatchify", "LabelEncoder",
           "RepresentationEncoder", "IdentityEncoder", "PooledHead", "ImageHead", "rms_normalize"]
