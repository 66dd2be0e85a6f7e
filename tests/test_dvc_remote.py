"""Sharing runs through the default DVC remote (.dvc/config): after a tiny run (the session's tiny
project, committed to git and DVC) and `dvc push`, a fresh `git clone` elsewhere gets every output back
bit for bit with `dvc pull`, and `dvc status` there is clean."""
from __future__ import annotations

import configparser
import hashlib
import json
import shutil
from pathlib import Path

from fixtures.dvc_repo import DVC, REPO, sh

# the cached outputs of dvc.yaml (metrics and plots are `cache: false`: they travel with git)
CACHED_OUTS = ("data/prepared", "data/latents", "data/representations", "checkpoints", "samples")


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for top in CACHED_OUTS:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_default_remote_is_a_folder_outside_the_checkout():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    assert cfg["core"]["remote"] == "local"
    url = cfg["'remote \"local\"'"]["url"]
    # DVC resolves a relative url against .dvc/: ../../x is a sibling of the checkout
    remote = (REPO / ".dvc" / url).resolve()
    assert not remote.is_relative_to(REPO), remote


def test_push_then_pull_in_a_fresh_clone_restores_the_outputs(tiny_project, tmp_path):
    root = tiny_project.copy(tmp_path / "work" / "repo")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's default remote
    sh(root, "git", "commit", "-q", "-am", "the default remote")
    assert (root / "checkpoints" / "ema.pt").is_file()
    assert json.loads(sh(root, *DVC, "status", "--json").stdout or "{}") == {}  # as `dvc repro` leaves it
    before = _digests(root)
    assert {p.split("/")[0] for p in before} >= {"data", "checkpoints", "samples"}

    sh(root, *DVC, "push", "-q")  # to the default remote: ../../mtdiff-dvc-remote from .dvc/
    remote = root.parent / "mtdiff-dvc-remote"  # a sibling of the checkout
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the default remote"

    # a clone somewhere else points the default remote at the shared folder with `--local` (untracked)
    clone = tmp_path / "elsewhere" / "deeper" / "clone"
    clone.parent.mkdir(parents=True)
    sh(tmp_path, "git", "clone", "-q", str(root), str(clone))
    sh(clone, *DVC, "remote", "modify", "--local", "local", "url", str(remote))
    assert (clone / ".dvc" / "config.local").is_file()
    assert "config.local" not in sh(clone, "git", "status", "--porcelain").stdout
    assert not (clone / "checkpoints").exists()
    sh(clone, *DVC, "pull", "-q")

    assert _digests(clone) == before  # bit-identical, checkpoints/ema.pt included
    assert json.loads(sh(clone, *DVC, "status", "--json").stdout or "{}") == {}
    assert sh(clone, "git", "status", "--porcelain").stdout == ""
