"""Generative metrics (mtdiff.evaluation.fidelity): torch-fidelity with a random-weight Inception
written to a temp file, the Fashion-MNIST-style domain extractor, the ADM reference-npz path and
the hashed reference cache. Small sets keep the Inception part to a few seconds."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn

from mtdiff.evaluation import fidelity as fid


# -- inputs --------------------------------------------------------------------------------------
def structured_images(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """Smooth stripe patterns (uint8 N,H,W,1): a 'data set' whose statistics differ from noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    out = []
    for _ in range(n):
        fx, fy, ph = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.5), rng.uniform(0, 6.28)
        img = 127.5 + 110 * np.sin(fx * xx + ph) * np.cos(fy * yy)
        out.append(img)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)[..., None]


def noise_images(n: int, size: int = 28, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


class TinyCNN(nn.Module):
    """Shaped like the project's FashionCNN: features(x) (B, D) and forward(x) -> logits (B, 10)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.proj = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 10)

    def features(self, x):
        return self.proj(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def inception_weights_file(tmp_path_factory):
    """A random-weight state dict for torch-fidelity's FeatureExtractorInceptionV3 (tests/fixtures/real_size.py)."""
    from fixtures.real_size import inception_weights

    return inception_weights(tmp_path_factory.mktemp("inception") / "inception_random.pth")


_NP_EIGVALS = np.linalg.eigvals


def lowrank_eigvals(m: np.ndarray) -> np.ndarray:
    """``np.linalg.eigvals`` for large matrices of low rank, exactly: with Q an orthonormal basis holding
    range(M) (checked), span(Q) is M-invariant, so eig(M) = eig(Q^T M Q) plus zeros. FID of n-image sets
    gives S1 S2 of rank < n; numpy's general eigvals on the 2048x2048 product takes 10-30 s on 2 CPU cores."""
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 256:
        return _NP_EIGVALS(m)
    q, _ = np.linalg.qr(m @ np.random.default_rng(0).standard_normal((m.shape[0], 32)))
    if np.linalg.norm(m - q @ (q.T @ m)) > 1e-9 * max(np.linalg.norm(m), 1e-300):
        return _NP_EIGVALS(m)  # not low rank: the real thing
    small = _NP_EIGVALS(q.T @ m @ q).astype(np.complex128)
    return np.concatenate([small, np.zeros(m.shape[0] - len(small), np.complex128)])


@pytest.fixture
def fast_fid_eigvals(monkeypatch):
    monkeypatch.setattr(np.linalg, "eigvals", lowrank_eigvals)


def test_fid_lowrank_eigvals_helper_is_exact():
    rng = np.random.default_rng(0)
    s1, s2 = (np.cov(rng.standard_normal((6, 256)), rowvar=False) for _ in range(2))
    m = s1 @ s2
    tr_sqrt = lambda ev: np.sqrt(ev.astype(np.complex128)).real.sum()  # noqa: E731  (torch-fidelity's use)
    # agree up to the sqrt of the ~1e-17 round-off eigenvalues the full solver returns for the null space
    assert tr_sqrt(lowrank_eigvals(m)) == pytest.approx(tr_sqrt(_NP_EIGVALS(m)), rel=1e-5)
    full = rng.standard_normal((256, 256))
    assert np.allclose(np.sort_complex(lowrank_eigvals(full)), np.sort_complex(_NP_EIGVALS(full)))


@pytest.mark.parametrize("n", [5, 40])  # fewer images than dimensions (the low-rank route), and more
def test_fid_from_features_equals_torch_fidelity(n):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    feats = torch.from_numpy(rng.standard_normal((n, 24)).astype(np.float32))
    ref = fid_features_to_statistics(torch.from_numpy(rng.standard_normal((50, 24)).astype(np.float32) + 0.3))
    expected = fid_statistics_to_metric(fid_features_to_statistics(feats), ref, False)["frechet_inception_distance"]
    assert fid.fid_from_features(feats, ref) == pytest.approx(expected, rel=1e-6)
    ref64 = {k: np.asarray(v, np.float64) for k, v in ref.items()}  # an ADM batch's dtype
    assert fid.fid_from_features(feats, ref64) == pytest.approx(expected, rel=1e-6)


# -- names and inputs ----------------------------------------------------------------------------
def test_fid_names_and_kid_subsets():
    # no sample count in a name: runs with different counts share MLflow's columns
    assert fid.metric_name("fid") == "fid" and fid.metric_name("kid_std", "fmnist_cnn") == "kid_std_fmnist_cnn"
    assert [fid.kid_subset_size(n, m) for n, m in ((50000, 50000), (1000, 10000), (6, 6), (2, 9))] == [1000, 500, 3, 2]


def test_fid_dataset_wraps_uint8_as_rgb_chw():
    gray = structured_images(3)
    ds = fid.UInt8Images(gray)
    x = ds[1]
    assert len(ds) == 3 and x.dtype == torch.uint8 and x.shape == (3, 28, 28)
    assert torch.equal(x[0], x[2]) and torch.equal(x[0], torch.from_numpy(gray[1, ..., 0]))
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert torch.equal(fid.UInt8Images(rgb)[0], torch.from_numpy(rgb[0]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):
        fid.UInt8Images(gray.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        fid.UInt8Images(np.zeros((2, 8, 8, 2), np.uint8))


# -- domain extractor ----------------------------------------------------------------------------
def test_fid_domain_extractor_self_zero_noise_large(tiny_cnn, tmp_path):
    name = fid.register_module_extractor(tiny_cnn, "fmnist_cnn")
    assert name.startswith("mtdiff-fmnist_cnn-")
    assert fid.register_module_extractor(tiny_cnn, "fmnist_cnn") == name  # same weights: same registration
    other = TinyCNN()
    assert fid.register_module_extractor(other, "fmnist_cnn") != name  # other weights: other cache identity

    data, noise = structured_images(96), noise_images(96)
    kw = dict(extractor=name, space="fmnist_cnn", cache_root=tmp_path / "cache", batch_size=64)
    same = fid.fidelity_metrics(data, data, **kw)
    far = fid.fidelity_metrics(noise, data, **kw)
    keys = {f"{m}_fmnist_cnn" for m in ("fid", "kid", "kid_std", "precision", "recall", "f_score")}
    assert set(same) == keys and set(far) == keys
    assert far["fid_fmnist_cnn"] > 1e-3
    assert abs(same["fid_fmnist_cnn"]) < 1e-6 * far["fid_fmnist_cnn"] + 1e-9
    assert same["precision_fmnist_cnn"] == 1.0 and same["recall_fmnist_cnn"] == 1.0
    assert far["kid_fmnist_cnn"] > same["kid_fmnist_cnn"]
    assert far["kid_std_fmnist_cnn"] > 0  # subsets of 48 out of 96: a real spread
    assert far["precision_fmnist_cnn"] < 0.5
    # the caller's module is untouched (the extractor works on a frozen copy)
    assert all(p.requires_grad for p in tiny_cnn.parameters())


def test_fid_reference_cache_is_keyed_by_data_hash(tiny_cnn, tmp_path):
    name = fid.register_module_extractor(tiny_cnn, "fmnist_cnn")
    cache = tmp_path / "cache"
    samples = noise_images(32)
    a, b = structured_images(32, seed=0), structured_images(32, seed=5)
    fid.fidelity_metrics(samples, a, extractor=name, cache_root=cache)
    first = sorted(p.name for p in cache.iterdir())
    assert first and all(p.startswith(f"ref-{fid.images_sha1(a)[:12]}") for p in first)
    r1 = fid.fidelity_metrics(samples, a, extractor=name, cache_root=cache)
    assert sorted(p.name for p in cache.iterdir()) == first  # second run: cache hit, nothing new
    r2 = fid.fidelity_metrics(samples, b, extractor=name, cache_root=cache)
    assert len(list(cache.iterdir())) == 2 * len(first)  # changed reference: new entries, no stale reuse
    assert r1["fid"] != r2["fid"]


class _Payload:
    """Unpickling this creates ``path``: what a malicious cache or weights file could do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_fid_reference_cache_is_npz_and_never_unpickled(tiny_cnn, tmp_path, monkeypatch):
    """Issue 11 item 13: the reference cache is .npz read with allow_pickle=False. Planted pickles (at
    torch-fidelity's old .pt names and at the .npz name) are never loaded, and the metrics equal
    torch-fidelity's calculate_metrics (no cache) with an empty cache, a bad one and a warm one."""
    import torch_fidelity

    name = fid.register_module_extractor(tiny_cnn, "fmnist_cnn")
    samples, ref = noise_images(40), structured_images(48)
    cache, marker = tmp_path / "cache", tmp_path / "payload_ran"
    direct = torch_fidelity.calculate_metrics(
        input1=fid.UInt8Images(samples), input2=fid.UInt8Images(ref), feature_extractor=name, cuda=False,
        batch_size=16, fid=True, kid=True, prc=True, kid_subsets=100, kid_subset_size=fid.kid_subset_size(40, 48),
        prc_neighborhood=3, save_cpu_ram=True, cache=False, verbose=False, rng_seed=2020)
    expect = {"fid": direct[torch_fidelity.KEY_METRIC_FID], "kid": direct[torch_fidelity.KEY_METRIC_KID_MEAN],
              "kid_std": direct[torch_fidelity.KEY_METRIC_KID_STD],
              "precision": direct[torch_fidelity.KEY_METRIC_PRECISION],
              "recall": direct[torch_fidelity.KEY_METRIC_RECALL],
              "f_score": direct[torch_fidelity.KEY_METRIC_F_SCORE]}

    cache.mkdir()
    old = f"ref-{fid.images_sha1(ref)[:12]}-{name}"
    planted = [cache / f"{old}-features-features.pt", cache / f"{old}-stat-fid-features.pt"]
    for p in planted:
        torch.save(_Payload(marker), p)
    npz = fid.ref_cache_path(cache, ref, name, None)
    assert npz.suffix == ".npz" and npz.name.startswith(old)
    extracted = []
    real_extract = fid._extract
    monkeypatch.setattr(fid, "_extract", lambda images, *a: extracted.append(len(images)) or real_extract(images, *a))
    kw = dict(extractor=name, batch_size=16)
    for bad in ("pickle", "object_array"):
        if bad == "pickle":
            torch.save(_Payload(marker), npz)
        else:
            np.savez(npz, mu=np.zeros(16, np.float32), sigma=np.eye(16), features_features=np.array([_Payload(marker)]))
        assert fid.fidelity_metrics(samples, ref, cache_root=cache, **kw) == expect  # recomputed, file replaced
        with np.load(npz, allow_pickle=False) as z:
            assert z["features_features"].shape == (48, 16) and z["sigma"].shape == (16, 16)
    extracted.clear()
    assert fid.fidelity_metrics(samples, ref, cache_root=cache, **kw) == expect  # warm cache
    assert extracted == [40]  # only the samples went through the extractor
    assert fid.fidelity_metrics(samples, ref, cache_root=tmp_path / "fresh", **kw) == expect  # no cache
    assert not marker.exists()
    assert all(p.is_file() for p in planted)  # never read, never deleted

    # a weights file torch-fidelity would unpickle with weights_only=False is refused first
    weights = tmp_path / "evil_inception.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, weights)
    with pytest.raises(fid.ConfigError, match="not a plain tensor state dict"):
        fid.fidelity_metrics(samples, ref, weights_path=weights, cache_root=cache)
    assert not marker.exists()


def test_fid_adm_reference_npz_path(tiny_cnn, tmp_path):
    name = fid.register_module_extractor(tiny_cnn, "fmnist_cnn")
    data, noise = structured_images(64), noise_images(64)
    kw = dict(extractor=name, cache_root=tmp_path / "cache")
    npz = fid.write_ref_stats_npz(tmp_path / "ref.npz", data, **kw)
    with np.load(npz) as z:
        assert z["mu"].shape == (16,) and z["sigma"].shape == (16, 16)
    self_fid = fid.fidelity_metrics(data, None, ref_stats_npz=npz, **kw)
    noise_fid = fid.fidelity_metrics(noise, None, ref_stats_npz=npz, **kw)
    assert set(self_fid) == {"fid_adm_ref"}
    assert noise_fid["fid_adm_ref"] > 1e-3
    assert abs(self_fid["fid_adm_ref"]) < 1e-6 * noise_fid["fid_adm_ref"] + 1e-9
    # the same statistics through both paths give the same FID
    both = fid.fidelity_metrics(noise, data, ref_stats_npz=npz, **kw)
    assert both["fid_adm_ref"] == pytest.approx(both["fid"], rel=1e-6)
    # per-run sample cache entries are cleaned up; only the reference's remain
    assert all(p.name.startswith("ref-") for p in (tmp_path / "cache").iterdir())

    np.savez(tmp_path / "bad_dim.npz", mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(ValueError, match="dimension 7"):
        fid.fidelity_metrics(data, None, ref_stats_npz=tmp_path / "bad_dim.npz", **kw)
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(16))
    with pytest.raises(ValueError, match="missing keys"):
        fid.load_ref_stats(tmp_path / "no_sigma.npz")
    with pytest.raises(FileNotFoundError, match="ref_stats_npz"):
        fid.load_ref_stats(tmp_path / "absent.npz")


# -- Inception -----------------------------------------------------------------------------------
def test_fid_inception_weights_resolution(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        fid.inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MTDIFF_OFFLINE", "1")
    path, reason = fid.inception_weights(None, allow_download=True)  # MTDIFF_OFFLINE=1 wins
    assert path is None and "not local" in reason
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert fid.inception_weights(None) == (cached, None)


def test_fid_inception_weights_offline_by_default(tmp_path, monkeypatch, caplog):
    """No download unless asked (issue 34 item 4); a failed download's error goes to the log, not
    into the reason that metrics/evaluate.json keeps."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("MTDIFF_OFFLINE", fid.ALLOW_DOWNLOAD_ENV):
        monkeypatch.delenv(var, raising=False)
    urls = []

    def fake_download(url, dst, progress=True):
        urls.append(url)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path, reason = fid.inception_weights(None)
    assert path is None and urls == []
    assert "evaluate.feature_extractor_weights_path" in reason and "evaluate.download_weights=true" in reason
    path, reason = fid.inception_weights(None, allow_download=True)  # asked: one attempt
    assert path is None and len(urls) == 1
    assert "urlopen" not in reason and "download failed" in reason
    assert "name resolution" in caplog.text
    monkeypatch.setenv(fid.ALLOW_DOWNLOAD_ENV, "1")  # the environment may ask too
    fid.inception_weights(None)
    assert len(urls) == 2


def test_fid_inception_random_weights(inception_weights_file, tmp_path, monkeypatch, fast_fid_eigvals):
    """Inception path end to end on 6-image sets: FID vs noise clearly > 0, FID of a set vs its own
    ADM-style stats ~ 0. Speed: the network resizes to 299x299 (~1 s per image on 2 busy CPU cores);
    the test lets it resize to 139 instead (any size >= 75 fits the architecture), ~4x faster, same
    code path; and the 2048-d FID eigenvalues go through the exact low-rank shortcut above."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    monkeypatch.setattr(fi.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 139)
    data, noise = structured_images(6), noise_images(6)
    kw = dict(weights_path=inception_weights_file, cache_root=tmp_path / "cache", batch_size=6)
    far = fid.fidelity_metrics(noise, data, **kw)
    assert {"fid", "kid", "precision", "recall"} <= set(far)
    assert far["fid"] > 1.0
    # the reference statistics come from the cache the first call filled (no new entries)
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert before and all("inception-v3-compat" in p for p in before)
    npz = fid.write_ref_stats_npz(tmp_path / "ref.npz", data, **kw)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before
    with np.load(npz) as z:
        assert z["mu"].shape == (2048,)
    same = fid.fidelity_metrics(data, None, ref_stats_npz=npz, **kw)
    assert abs(same["fid_adm_ref"]) < 1e-4 * far["fid"]
