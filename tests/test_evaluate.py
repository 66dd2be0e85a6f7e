"""Evaluate stage and task metrics: label-head accuracy through MTDiffusion.classify, the domain
classifier on samples, representation cosine, masked/transition errors, and the evaluate.json /
plot-CSV schema on tiny inputs (tiny random model, tiny random Fashion-MNIST CNN, no Inception)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mtdiff.diffusion import MTDiffusion
from mtdiff.evaluation import accuracy as acc
from mtdiff.io import save_npy, save_npz, write_json
from mtdiff.models.tasks import TaskModel
from mtdiff.stages import evaluate

K = 10
LEVELS = np.linspace(-0.9, 0.9, K)  # class k <-> constant image at LEVELS[k] in [-1, 1]


class LevelModel(nn.Module):
    """Stub MT-DiT: the label head reads the image's mean level; the representation head returns mean * u."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.register_buffer("u", torch.linspace(1, 2, dim))
        self.task_names = ["label", "representation"]

    def forward(self, z_t, t):
        mean = z_t.mean(dim=(1, 2, 3))
        logits = -200.0 * (mean[:, None] - torch.as_tensor(LEVELS, dtype=z_t.dtype)[None]) ** 2
        return {"eps": torch.zeros_like(z_t), "label": logits, "representation": mean[:, None] * self.u}

    head = TaskModel.head  # one head's output: here the whole forward, as for a DiT

    def aggregate(self, task_inputs):
        raise AssertionError("nothing is given when classifying")


def level_images(labels: np.ndarray, size: int = 8) -> np.ndarray:
    return np.broadcast_to(LEVELS[labels][:, None, None, None], (len(labels), 1, size, size)).astype(np.float32)


@pytest.fixture
def diffusion(make_params):
    return MTDiffusion(make_params().diffusion)  # T = 1000: z_T is noise (abar_T ~ 4e-5)


# -- accuracy ------------------------------------------------------------------------------------
def test_evaluate_topk_and_per_class():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    assert acc.topk_hits(logits, y, 1).tolist() == [True, False, False]
    assert acc.topk_hits(logits, y, 2).tolist() == [True, True, True]
    pc = acc.per_class_accuracy(np.array([1, 0, 1, 1]), np.array([0, 0, 2, 2]), 4)
    assert pc[0] == 0.5 and pc[2] == 1.0 and np.isnan(pc[1]) and np.isnan(pc[3])


def test_evaluate_label_head_accuracy_vs_t(diffusion):
    labels = np.arange(60) % K
    z0 = level_images(labels)
    model = LevelModel()
    res = acc.label_head_accuracy(model, diffusion, z0, labels, [1, 1000], ensemble_t=[1, 2], topk=(1, 5),
                                  batch_size=16, seed=3)
    assert res.n == 60 and res.num_classes == K and res.per_class_t == 1
    assert res.per_t[1][1] == 1.0 and res.ensemble[1] == 1.0  # clean images: the head reads the level exactly
    assert res.per_t[1000][1] < 0.5  # pure noise at t = T: near chance
    assert res.per_t[1000][5] >= res.per_t[1000][1]
    assert np.array_equal(res.per_class, np.ones(K))
    again = acc.label_head_accuracy(model, diffusion, z0, labels, [1, 1000], ensemble_t=[1, 2], topk=(1, 5),
                                    batch_size=7, seed=3)
    assert again.per_t[1] == res.per_t[1]
    with pytest.raises(ValueError, match=r"outside \[1, 1000\]"):
        acc.label_head_accuracy(model, diffusion, z0, labels, [0, 5])
    with pytest.raises(ValueError, match="labels"):
        acc.label_head_accuracy(model, diffusion, z0, labels[:5], [1])


class TemplateModel(nn.Module):
    """Stub class-conditional model: it predicts the noise exactly when the image is its class's
    constant level (``LEVELS``), so the Diffusion Classifier's error is 0 for the true class only."""

    class_conditional = True

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, z_t, t, class_labels):
        template = torch.as_tensor(LEVELS, dtype=z_t.dtype)[class_labels][:, None, None, None].expand_as(z_t)
        return {"eps": self.diffusion.predict_eps(z_t, template, None, t)}


def test_diffusion_classifier_picks_the_class_that_predicts_the_noise_best(diffusion):
    labels = np.arange(2 * K) % K
    z0 = level_images(labels)
    model = TemplateModel(diffusion)
    assert acc.diffusion_classifier_accuracy(model, diffusion, z0, labels, K, draws=3, batch_size=7) == 1.0
    wrong = (labels + 1) % K  # the same images under other labels: every one misclassified
    assert acc.diffusion_classifier_accuracy(model, diffusion, z0, wrong, K, draws=3) == 0.0


def test_diffusion_classifier_runs_the_joint_model_through_its_label_code(make_params):
    """The joint model takes class c as its label code in the forward process (M2/M3), not as an input."""
    from mtdiff.models import build_model

    params = make_params({**TINY})
    torch.manual_seed(0)
    model = build_model(params, repr_dim=None, num_classes=K).eval()
    seen = []
    real_aggregate = model.aggregate
    model.aggregate = lambda inputs, **kw: seen.append(inputs["label"][0].item()) or real_aggregate(inputs, **kw)
    labels = np.arange(4) % K
    z0 = np.random.default_rng(0).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32)
    diffusion = MTDiffusion(params.diffusion)
    a = acc.diffusion_classifier_accuracy(model, diffusion, z0, labels, K, draws=2, seed=1)
    assert seen == list(range(K)) and 0.0 <= a <= 1.0
    assert acc.diffusion_classifier_accuracy(model, diffusion, z0, labels, K, draws=2, seed=1) == a  # seeded


def test_evaluate_representation_similarity(diffusion):
    labels = np.arange(30) % K
    z0 = level_images(labels)
    model = LevelModel(dim=4)
    feats = LEVELS[labels][:, None] * np.linspace(1, 2, 4)[None]  # the "encoder's" features: level * u
    cos = acc.representation_similarity(model, diffusion, z0, feats, [1, 1000], batch_size=8)
    assert cos[1] == pytest.approx(1.0, abs=1e-5)
    assert abs(cos[1000]) < 0.6  # the sign of the noise's mean: +-1 at random
    with pytest.raises(ValueError, match="representation head gives"):
        acc.representation_similarity(model, diffusion, z0, feats[:, :3], [1])


def test_evaluate_classifier_accuracy_and_image_errors():
    class Brightness(nn.Module):
        def forward(self, x):  # x in [-1, 1]: class = nearest level
            m = x.mean(dim=(1, 2, 3))
            return -((m[:, None] - torch.as_tensor(LEVELS, dtype=x.dtype)[None]) ** 2)

    labels = np.arange(20) % K
    imgs = np.round((level_images(labels, 28).transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    a, per_class = acc.classifier_accuracy(Brightness(), imgs, labels, batch_size=6)
    assert a == 1.0 and per_class.shape == (K,)
    wrong = (labels + 1) % K
    assert acc.classifier_accuracy(Brightness(), imgs, wrong)[0] == 0.0
    # class entropy of the predictions: balanced 1, one class 0, two of K classes log 2 / log K
    pred = acc.classify(Brightness(), imgs, batch_size=7)
    assert np.array_equal(pred, labels) and acc.class_entropy(pred, K) == pytest.approx(1.0)
    assert acc.class_entropy(np.zeros(9, np.int64), K) == 0.0
    assert acc.class_entropy(np.array([0, 1, 0, 1]), K) == pytest.approx(np.log(2) / np.log(K))
    with pytest.raises(ValueError, match="class_entropy needs"):
        acc.class_entropy(np.zeros(0, np.int64), K)

    ref = np.full((2, 4, 4, 1), 255, np.uint8)
    out = ref.copy()
    mask = np.ones((2, 4, 4), np.uint8)
    mask[:, :2] = 0                          # top half hidden
    out[:, :2] = 0                           # hidden part entirely wrong (error 1 per pixel)
    out[:, 3] = 0                            # a visible row wrong too: must not count
    assert acc.masked_region_mse(out, ref, mask) == pytest.approx(1.0)
    assert acc.image_mse(out, ref) == pytest.approx(0.75)
    assert acc.psnr(0.01) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="hides no pixel"):
        acc.masked_region_mse(out, ref, np.ones_like(mask))
    with pytest.raises(ValueError, match="mask"):
        acc.masked_region_mse(out, ref, mask[:, :3])


# -- the stage -----------------------------------------------------------------------------------
CLASSES = [f"class{k}" for k in range(K)]


def write_prepared(params, n_test: int = 48, latents: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = np.arange(n_test) % K
    base = (level_images(labels, 28).transpose(0, 2, 3, 1) + 1) * 127.5
    images = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    d = params.prepared_dir
    save_npy(d / "test_images.npy", images)
    save_npy(d / "test_labels.npy", labels.astype(np.int64))
    (d / "classes.json").write_text(json.dumps(CLASSES))
    if latents:
        z = params.latents_dir / "test"
        save_npy(z / "mean.npy", (images.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float16))
        save_npy(z / "labels.npy", labels.astype(np.int64))
    return images


def write_samples(params, images: np.ndarray, condition: str, **extra) -> None:
    save_npz(params.samples_dir / "samples.npz", arr_0=images, **extra)
    write_json(params.samples_dir / "meta.json", {"condition": condition, "num_samples": len(images)})


def write_encoder(params) -> None:
    """The representations stage's two Fashion-MNIST networks, tiny and untrained."""
    from mtdiff.encoders import EVAL_NET_FILE, FashionCNN, FashionEvalNet, save_fmnist_encoder

    torch.manual_seed(0)
    save_fmnist_encoder(FashionCNN(dim=16, width=4).eval(), params.representations_dir / "encoder.pt")
    save_fmnist_encoder(FashionEvalNet(dim=16, width=4).eval(), params.representations_dir / EVAL_NET_FILE)


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


TINY = {"model.channels": 8, "model.channel_mult": [1, 2], "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 1, "model.head_hidden": 16,
        "diffusion.timesteps": 100, "sample.steps": 10, "evaluate.num_samples": 32, "evaluate.num_ref": 32,
        "evaluate.batch_size": 16, "evaluate.diffusion_classifier_images": 16, "evaluate.diffusion_classifier_draws": 2}


def test_evaluate_stage_schema_label_condition(make_params, monkeypatch, workdir):
    from mtdiff.models import build_model

    params = make_params({**TINY, "evaluate.inception": False})
    images = write_prepared(params)
    labels = np.arange(40) % K
    write_samples(params, images[:40], "label", labels=labels.astype(np.int64))
    write_encoder(params)
    torch.manual_seed(0)
    model = build_model(params, repr_dim=None, num_classes=K).eval()
    calls = []

    def fake_load(p, device):
        calls.append(device)
        return model, MTDiffusion(p.diffusion), {"num_classes": K}

    monkeypatch.setattr(evaluate, "load_model", fake_load)

    out = evaluate.run(params)
    m = json.loads((params.metrics_dir / "evaluate.json").read_text())
    assert out["metrics_path"] == str(params.metrics_dir / "evaluate.json") and calls
    # both feature spaces: the representation encoder's and the evaluation network's
    domain = {f"{k}_{space}" for k in ("fid", "kid", "kid_std", "precision", "recall", "f_score", "cond_acc",
                                        "class_entropy")
              for space in ("fmnist_cnn", "fmnist_eval")}
    label = {"label_acc_t1", "label_acc_t10", "label_acc_t50", "label_acc_ens", "label_acc_head_ens"}  # clean: both
    always = {"num_samples", "num_reference", "num_test_eval", "condition", "data_source",
              "inception_skipped_reason", "domain_skipped_reason", "label_head_skipped_reason",
              "diffusion_classifier_skipped_reason"}
    generative = {"diffusion_classifier_acc", "diffusion_classifier_images", "diffusion_classifier_draws"}
    assert set(m) == always | domain | label | generative
    assert m["diffusion_classifier_images"] == 16.0 and 0.0 <= m["diffusion_classifier_acc"] <= 1.0
    assert m["num_samples"] == 32.0 and m["num_reference"] == 32.0 and m["num_test_eval"] == 32.0
    assert m["condition"] == "label" and m["data_source"] == "fashion_mnist"
    assert m["inception_skipped_reason"] == "evaluate.inception is false"
    assert m["domain_skipped_reason"] == "" and m["label_head_skipped_reason"] == ""
    assert m["diffusion_classifier_skipped_reason"] == ""
    for k in domain | label:
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    for k in label | {"cond_acc_fmnist_cnn", "cond_acc_fmnist_eval", "class_entropy_fmnist_cnn"}:
        assert 0.0 <= m[k] <= 1.0
    # the class histogram is the encoder's top-1 over the samples evaluated
    from mtdiff.encoders import load_fmnist_encoder
    net = load_fmnist_encoder(params.representations_dir / "encoder.pt")
    pred = acc.classify(net, images[:32])
    assert m["class_entropy_fmnist_cnn"] == pytest.approx(acc.class_entropy(pred, K))
    assert m["fid_fmnist_eval"] != m["fid_fmnist_cnn"]  # two different spaces

    plots = params.metrics_dir / "plots"
    vs_t = read_csv(plots / "label_accuracy_vs_t.csv")
    assert vs_t[0] == ["t", "accuracy"] and [int(r[0]) for r in vs_t[1:]] == [1, 10, 50, 100]
    assert float(vs_t[1][1]) == m["label_acc_t1"]
    per_class = read_csv(plots / "per_class_accuracy.csv")
    assert per_class[0] == ["class", "class_index", "accuracy"] and len(per_class) == 1 + K
    assert per_class[1][:2] == ["class0", "0"]
    assert len(read_csv(plots / "per_class_sample_accuracy.csv")) == 1 + K

    # MLflow off: what would have been logged is kept beside the metrics
    pending = [json.loads(line) for line in __import__("mtdiff.pipeline.tracking").pipeline.tracking.pending_file("evaluate").read_text().splitlines()]
    logged = [r for r in pending if r["what"] == "log_metrics"]
    # one key per number: the stage run logs evaluate.json's numbers under the keys the pipeline's
    # parent run (read_metrics) and the sweep table (flatten_metrics) use
    from mtdiff.pipeline.dvc_runner import read_metrics
    from mtdiff.pipeline.report import flatten_metrics

    parent_keys = read_metrics([params.metrics_dir / "evaluate.json"])
    assert "evaluate/fid_fmnist_cnn" in parent_keys
    assert parent_keys == flatten_metrics({"metrics/evaluate.json": m})
    stage_logged = logged[0]["args"][0]
    assert {k: v for k, v in stage_logged.items() if k != "evaluate/wall_time_s"} == parent_keys

    # same params and inputs: the same numbers (seeded noise, KID subsets)
    evaluate.run(params)
    assert json.loads((params.metrics_dir / "evaluate.json").read_text()) == m


def test_evaluate_label_acc_ens_is_the_clean_classifier_where_the_model_has_one(make_params, monkeypatch):
    """tasks.label.classifier clean: label_acc_ens (and the per-class plot) come from the clean-image
    classifier on the test split; the label head's ensemble stays beside it as label_acc_head_ens."""
    from mtdiff.models import build_model

    params = make_params({**TINY, "evaluate.inception": False, "evaluate.diffusion_classifier_images": 0,
                          "tasks.label.classifier": "clean"})
    images = write_prepared(params)
    write_samples(params, images[:40], "label", labels=(np.arange(40) % K).astype(np.int64))
    write_encoder(params)
    torch.manual_seed(0)
    model = build_model(params, repr_dim=None, num_classes=K).eval()
    monkeypatch.setattr(evaluate, "load_model", lambda p, device: (model, MTDiffusion(p.diffusion), {"num_classes": K}))
    evaluate.run(params)
    m = json.loads((params.metrics_dir / "evaluate.json").read_text())
    test_labels = np.load(params.prepared_dir / "test_labels.npy")[:32]
    z0 = images[:32].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    expected, per_class = acc.clean_classifier_accuracy(model, z0, test_labels)
    assert m["label_acc_ens"] == expected[1]
    head = acc.label_head_accuracy(model, MTDiffusion(params.diffusion), z0, test_labels, params.evaluate.classify_t,
                                   seed=params.seed)
    assert m["label_acc_head_ens"] == head.ensemble[1]
    rows = read_csv(params.metrics_dir / "plots" / "per_class_accuracy.csv")[1:]
    assert [float(r[2]) for r in rows] == [round(float(a), 6) for a in per_class if np.isfinite(a)]


def test_clean_classifier_accuracy_top_k_and_per_class():
    class Levels(nn.Module):  # the classifier reads the clean image's level
        def classifier_logits(self, z0):
            return -200.0 * (z0.mean(dim=(1, 2, 3))[:, None] - torch.as_tensor(LEVELS, dtype=z0.dtype)[None]) ** 2

    labels = np.arange(30) % K
    z0 = level_images(labels)
    top, per_class = acc.clean_classifier_accuracy(Levels(), z0, labels, topk=(1, 5), batch_size=7)
    assert top == {1: 1.0, 5: 1.0} and np.array_equal(per_class, np.ones(K))
    wrong = (labels + 1) % K
    top, per_class = acc.clean_classifier_accuracy(Levels(), z0, wrong, topk=(1, 5))
    # the next level is the second-nearest but for the last class (its 'next' is class 0): 27 of 30
    assert top[1] == 0.0 and top[5] == pytest.approx(0.9) and np.array_equal(per_class, np.zeros(K))
    with pytest.raises(ValueError, match="labels"):
        acc.clean_classifier_accuracy(Levels(), z0, labels[:3])


@pytest.mark.parametrize("condition", ["masked", "transition"])
def test_evaluate_stage_image_conditions_via_cli(make_params, monkeypatch, workdir, condition):
    overrides = {**TINY, "tasks.label.enabled": False, f"tasks.{condition}.enabled": True,
                 "sample.condition": condition, "evaluate.num_samples": 16}
    params = make_params(overrides)
    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch_home"))  # no Inception weights there
    monkeypatch.setenv("MTDIFF_OFFLINE", "1")
    images = write_prepared(params, latents=False)
    ref = images[:20]
    samples = np.clip(ref.astype(int) + 30, 0, 255).astype(np.uint8)
    if condition == "masked":
        mask = np.ones((20, 28, 28), np.uint8)
        mask[:, 10:20] = 0
        write_samples(params, samples, condition, reference=ref, mask=mask)
        expect = acc.masked_region_mse(samples[:16], ref[:16], mask[:16])
    else:
        write_samples(params, samples, condition, reference=ref, source=images[20:40])
        expect = acc.image_mse(samples[:16], ref[:16])

    # through the CLI entry point, as DVC runs it
    argv = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in
            {**overrides, "data.out_dir": params.data.out_dir, "sample.out_dir": params.sample.out_dir,
             "evaluate.out_dir": params.evaluate.out_dir, "train.out_dir": params.train.out_dir}.items()]
    evaluate.main(argv)
    m = json.loads((params.metrics_dir / "evaluate.json").read_text())
    assert set(m) == {"num_samples", "num_reference", "num_test_eval", "condition", "data_source",
                      "inception_skipped_reason", "domain_skipped_reason", "label_head_skipped_reason",
                      "diffusion_classifier_skipped_reason", f"{condition}_mse", f"{condition}_psnr"}
    assert m[f"{condition}_mse"] == pytest.approx(expect)
    assert m[f"{condition}_psnr"] == pytest.approx(10 * np.log10(1 / expect))
    assert "Inception weights not local" in m["inception_skipped_reason"]
    assert "encoder.pt missing" in m["domain_skipped_reason"]
    assert m["label_head_skipped_reason"] == "tasks.label.enabled is false"
    assert m["diffusion_classifier_skipped_reason"].startswith("the model takes no label")
    for name in ("label_accuracy_vs_t.csv", "per_class_accuracy.csv", "per_class_sample_accuracy.csv"):
        rows = read_csv(params.metrics_dir / "plots" / name)
        assert len(rows) == 1  # header only: the outputs exist for DVC, with nothing to plot


def test_evaluate_stage_errors(make_params, workdir):
    params = make_params(TINY)
    with pytest.raises(FileNotFoundError, match="run the sample stage"):
        evaluate.run(params)
    images = write_prepared(params)
    write_samples(params, images[:8].astype(np.float32), "label")
    with pytest.raises(ValueError, match="uint8"):
        evaluate.run(params)
    params = make_params({**TINY, "tasks.masked.enabled": True, "sample.condition": "masked"})
    write_samples(params, images[:8], "masked")
    with pytest.raises(ValueError, match="'reference' and 'mask'"):
        evaluate.run(params)
