"""Figures of the studies: matplotlib (Agg backend) PNGs written through tf.io.gfile.

`pyplot()` and `save_figure()` are shared by every study; `study_a` holds
study A's figures.
"""

import os


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Writes `fig` as a PNG to `path` (local or gs://), creating its directory, and closes it."""
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
