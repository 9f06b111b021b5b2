"""Patches (the a-factors) of convolutions for the structured rules (`_structured`)."""

import tensorflow as tf


def conv_patches(layer, inputs, padding):
    """(N, P, k..., C_in) patches of a 1-D/2-D channels-last convolution, in kernel order.

    Built from strided slices of the padded input, one per kernel offset:
    data movement only (`tf.image.extract_patches` compiles under XLA to a
    convolution with a one-hot filter, A² multiply-adds per output position,
    which took 80 % of a ResNet-18 structured block).
    """
    x = tf.convert_to_tensor(inputs)
    ks, st, dl = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    if layer.rank == 1:
        x = x[:, :, None, :]
        ks, st, dl = ks + [1], st + [1], dl + [1]
    pads, outs = [[0, 0]], []
    for size, k, s, d in zip(x.shape[1:3], ks, st, dl):
        size, span = int(size), (k - 1) * d + 1
        if padding == "same":  # TensorFlow's SAME: the extra pixel after
            out = -(-size // s)
            total = max((out - 1) * s + span - size, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (size - span) // s + 1
            pads.append([0, 0])
        outs.append(out)
    if any(p != [0, 0] for p in pads):
        x = tf.pad(x, pads + [[0, 0]])
    views = [
        x[:, i * dl[0]: i * dl[0] + (outs[0] - 1) * st[0] + 1: st[0],
          j * dl[1]: j * dl[1] + (outs[1] - 1) * st[1] + 1: st[1], :]
        for i in range(ks[0]) for j in range(ks[1])
    ]
    p = views[0][:, :, :, None] if len(views) == 1 else tf.stack(views, 3)
    return tf.reshape(p, [tf.shape(p)[0], outs[0] * outs[1], ks[0] * ks[1], int(x.shape[-1])])


def causal_pad(layer, inputs):
    """A causal Conv1D's input padded on the left of its time axis."""
    left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
    pads = [[0, 0]] * 3
    pads[1 if layer.data_format == "channels_last" else 2] = [left, 0]
    return tf.pad(inputs, pads)
