"""Dead-channel removal: channels with alpha = 0 cut out of the graphs compute exactly what
zeroing them computes, with fewer parameters and MACs."""
from __future__ import annotations

import json
import os

import numpy as np

from conftest import export, skimage_photos
from scalecert.runtime import Certifier


def test_removed_channels_equal_zeroed_channels(tmp_path_factory, photo_dir):
    args = ("--arch", "efficientnet-lite0", "--pretrained", "--patch", "32", "--layer", "_blocks.0",
            "--calib", photo_dir, "--channel-prune", "0.25", "--prune-rate", "0.2")
    removed = export(tmp_path_factory, "removed", *args)
    zeroed = export(tmp_path_factory, "zeroed", *args, "--keep-dead-channels")
    m_removed = json.load(open(os.path.join(removed, "manifest.json")))
    m_zeroed = json.load(open(os.path.join(zeroed, "manifest.json")))
    dead = m_removed["sin"]["dead_channels"]
    assert len(dead) == 4 and m_removed["sin"]["dead_channels_removed"]
    assert not m_zeroed["sin"]["dead_channels_removed"]
    assert m_removed["layer"]["channels_kept"] == 12
    savings = m_removed["sin"]["removal_savings"]
    assert savings["prefix_macs"] > 0 and savings["suffix_macs_per_window"] > 0 and savings["suffix_params"] > 0
    assert m_removed["stats"]["suffix"]["macs"] < m_zeroed["stats"]["suffix"]["macs"]

    a, b = Certifier.load(removed), Certifier.load(zeroed)
    live = np.setdiff1d(np.arange(16), dead)
    for array in skimage_photos().values():
        px = a.prepare(array)
        fa, ga = a.features(px)
        fb, gb = b.features(px)
        assert (ga == gb).all()
        assert np.abs(fb[:, dead]).max() == 0  # zeroed variant: dead channels are exactly 0
        assert np.allclose(fa, fb[:, live], atol=1e-5)
        la, lb = a.window_logits(fa, a.windows[:16]), b.window_logits(fb, b.windows[:16])
        assert np.abs(la - lb).max() < 1e-4
        assert (la.argmax(1) == lb.argmax(1)).all()


def test_unremovable_layer_says_why(tmp_path_factory, photo_dir):
    bundle = export(tmp_path_factory, "skip", "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32",
                    "--layer", "_blocks.1", "--calib", photo_dir, "--channel-prune", "0.25")
    sin = json.load(open(os.path.join(bundle, "manifest.json")))["sin"]
    assert not sin["dead_channels_removed"] and "Add" in sin["dead_channels_note"]
