"""Dead-channel removal: channels with alpha = 0 cut out of the graphs compute exactly what
zeroing them computes, with fewer parameters and MACs."""
from __future__ import annotations

import json
import os

import numpy as np

import pytest

from conftest import export, skimage_photos
from scalecert.runtime import Certifier

# The claim is graph surgery, not weights: the tiny CNN of tests/data/tiny_bundle (random weights, a
# plain conv after the layer) in the default run; the pretrained EfficientNet-Lite0 (a block of
# depthwise and pointwise convs, three more exports of it) under -m slow.
MODELS = ["tiny16", pytest.param("effnet", marks=pytest.mark.slow)]


def _model_args(model: str, request) -> tuple:
    if model == "tiny16":
        return request.getfixturevalue("tiny16_model"), "--patch", "3", "--layer", "relu"
    return "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32", "--layer", "_blocks.0"


@pytest.mark.parametrize("model", MODELS)
def test_removed_channels_equal_zeroed_channels(model, tmp_path_factory, calib_dir, photo_dir, request):
    calib = calib_dir if model == "tiny16" else photo_dir
    args = (*_model_args(model, request), "--calib", calib, "--channel-prune", "0.25", "--prune-rate", "0.2")
    removed = export(tmp_path_factory, "removed", *args)
    zeroed = export(tmp_path_factory, "zeroed", *args, "--keep-dead-channels")
    m_removed = json.load(open(os.path.join(removed, "manifest.json")))
    m_zeroed = json.load(open(os.path.join(zeroed, "manifest.json")))
    channels = m_zeroed["layer"]["channels_kept"]  # all of them: the zeroed variant keeps every channel
    dead = m_removed["sin"]["dead_channels"]
    assert channels in (8, 16) and len(dead) == channels // 4 and m_removed["sin"]["dead_channels_removed"]
    assert not m_zeroed["sin"]["dead_channels_removed"]
    assert m_removed["layer"]["channels_kept"] == channels - len(dead)
    savings = m_removed["sin"]["removal_savings"]
    assert savings["prefix_macs"] > 0 and savings["suffix_macs_per_window"] > 0 and savings["suffix_params"] > 0
    assert m_removed["stats"]["suffix"]["macs"] < m_zeroed["stats"]["suffix"]["macs"]

    a, b = Certifier.load(removed), Certifier.load(zeroed)
    live = np.setdiff1d(np.arange(channels), dead)
    for array in skimage_photos().values():
        px = a.prepare(array)
        fa, ga = a.features(px)
        fb, gb = b.features(px)
        assert (ga == gb).all()
        assert np.abs(fb[:, dead]).max() == 0  # zeroed variant: dead channels are exactly 0
        assert np.abs(fb[:, live]).max() > 0
        assert np.allclose(fa, fb[:, live], atol=1e-5)
        la, lb = a.window_logits(fa, a.windows[:16]), b.window_logits(fb, b.windows[:16])
        assert np.abs(la - lb).max() < 1e-4
        assert (la.argmax(1) == lb.argmax(1)).all()


@pytest.mark.parametrize("model", ["tiny-resnet20", pytest.param("effnet", marks=pytest.mark.slow)])
def test_unremovable_layer_says_why(model, tmp_path_factory, calib_dir, photo_dir, tiny_checkpoint):
    """A layer whose channels reach an Add (a residual) cannot lose them: the manifest says so."""
    if model == "effnet":
        args = ("--arch", "efficientnet-lite0", "--pretrained", "--patch", "32", "--layer", "_blocks.1",
                "--calib", photo_dir)
    else:
        args = (tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", "--layer", "layer1.0", "--calib", calib_dir)
    bundle = export(tmp_path_factory, "skip", *args, "--channel-prune", "0.25")
    sin = json.load(open(os.path.join(bundle, "manifest.json")))["sin"]
    assert sin["dead_channels"] and not sin["dead_channels_removed"] and "Add" in sin["dead_channels_note"]
