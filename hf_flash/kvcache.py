"""flash_attn_with_kvcache (placeholder: the decode kernels land with issue 5)."""


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("flash_attn_with_kvcache lands with the decode kernels")


def paged_varlen_prefill(*args, **kwargs):
    raise NotImplementedError("flash_attn_varlen_func(block_table=...) lands with the decode kernels")
