"""FlashAttention-2 forward/backward launchers (being written)."""


def forward(*a, **k):
    raise NotImplementedError("kernel landing")


def backward(*a, **k):
    raise NotImplementedError("kernel landing")


def dbias_shape(bias):
    return bias.shape


def dropout_keep_mask(*a, **k):
    raise NotImplementedError("kernel landing")
