"""The paper's single-task fine-tune inside the budget (train.finetune_steps / finetune_tasks):
the params that switch it on, the training step across the switch, and what the sampler aggregates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.tiny_run import tiny_params
from mtdiff.config import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

LABEL_AND_MASKED = {"tasks.label.enabled": True, "tasks.masked.enabled": True, "train.steps": 4}


def test_finetune_params_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="finetune_steps 4 must be below train.steps 4"):
        tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_steps": 4})
    with pytest.raises(ConfigError, match=r"finetune_tasks \['representation'\] are not enabled"):
        tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_steps": 2,
                                                    "train.finetune_tasks": ["representation"]})
    # sampling given the label from a model fine-tuned without it would condition on nothing
    with pytest.raises(ConfigError, match="needs 'label' in train.finetune_tasks"):
        tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_steps": 2, "sample.condition": "label"})


def test_tasks_at_switches_to_the_finetune_tasks_with_zero_weight(tmp_path):
    from mtdiff.train.schedule import final_tasks, finetune_starts_at, tasks_at

    params = tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_steps": 1,
                                                         "train.finetune_tasks": ["label"]})
    assert finetune_starts_at(params) == 3
    assert tasks_at(params, 2) is params.tasks and tasks_at(params, 2).enabled == ["label", "masked"]
    late = tasks_at(params, 3)
    assert late.enabled == ["label"] and late.label.weight == 0.0 and late.label.dropout == params.tasks.label.dropout
    assert final_tasks(params).enabled == ["label"]
    plain = tiny_params(tmp_path, **LABEL_AND_MASKED)
    assert finetune_starts_at(plain) is None and final_tasks(plain) is plain.tasks


def _step_and_batch(params):
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.models import build_model
    from mtdiff.train.step import TrainStep

    torch.manual_seed(0)
    model = build_model(params, repr_dim=None, num_classes=10)
    step = TrainStep(model, MTDiffusion(params.diffusion), params, torch.device("cpu"),
                     generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    batch = {"z0": torch.randn(8, 1, 28, 28, generator=g), "label": torch.randint(0, 10, (8,), generator=g)}
    return step, batch


def test_finetune_trains_the_image_loss_alone_and_restarts_the_ema(tmp_path):
    params = tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_steps": 2,
                                                         "train.finetune_tasks": ["label"],
                                                         "train.warmup_steps": 0})
    step, batch = _step_and_batch(params)
    masked_params = {n: p for n, p in step.model.named_parameters() if "masked" in n}
    assert masked_params, "the model has the masked task's encoder and head"
    for _ in range(2):  # the multi-task phase trains the masked task's encoder and head
        before = {n: p.detach().clone() for n, p in masked_params.items()}
        step(batch)
    assert any(not torch.equal(before[n], p) for n, p in masked_params.items())
    assert step.ema.num_updates == 2
    before = {n: p.detach().clone() for n, p in masked_params.items()}
    out = step(batch)  # the first fine-tune step: the masked task out of the forward process and the loss
    assert all(torch.equal(before[n], p) for n, p in masked_params.items())
    assert {"eps", "label", "masked"} <= set(out.losses)  # the left-out head's loss is still reported
    assert step.ema.num_updates == 1  # restarted at the switch, then one update
    step(batch)
    assert all(torch.equal(before[n], p) for n, p in masked_params.items())
    assert step.steps_done == 4


def test_finetune_off_trains_exactly_as_before(tmp_path):
    """finetune_steps 0 and a zero task weight add nothing to the multi-task step (bit-exact)."""
    a, batch = _step_and_batch(tiny_params(tmp_path, **LABEL_AND_MASKED))
    b, _ = _step_and_batch(tiny_params(tmp_path, **LABEL_AND_MASKED, **{"train.finetune_tasks": ["label"]}))
    for i in range(2):
        # the same global RNG state for each (the clean classifier's dropout draws from it)
        torch.manual_seed(10 + i)
        la = a(batch).losses
        torch.manual_seed(10 + i)
        lb = b(batch).losses
        assert all(torch.equal(la[k], lb[k]) for k in la)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("over", [
    # the study's MT-X fine-tune: class-conditional + masked, the masked task out for the last steps
    {"model.class_conditional": True, "tasks.label.enabled": False, "tasks.masked.enabled": True,
     "train.finetune_steps": 2, "sample.cfg_scale": 2.0},
    # joint image-label fine-tuned with the label kept, sampled given it with task guidance
    {"tasks.label.enabled": True, "train.finetune_steps": 2, "train.finetune_tasks": ["label"],
     "sample.task_guidance": 1.5},
], ids=["classcond_masked_ft", "joint_label_ft"])
def test_the_study_fine_tunes_train_and_sample_end_to_end(tmp_path_factory, workdir, over):
    """The train and sample stages on tiny data with the study's fine-tune points' params."""
    from fixtures.tiny_run import data_root, link_data
    from mtdiff.stages import sample, train

    link_data(data_root(tmp_path_factory), workdir)
    params = tiny_params(workdir, **{"train.steps": 4, "sample.condition": "label", "sample.num_samples": 4,
                                     "sample.batch_size": 4, **over})
    assert train.run(params)["steps"] == 4
    with np.load(sample.run(params)["samples_npz"]) as z:
        assert z["arr_0"].shape[0] == 4 and list(z["labels"]) == [0, 1, 2, 3]
