"""Attention whose memory grows linearly with the sequence length (the `sdpa` path).

A dense mask costs one entry per (query, key) pair: 64k tokens make a 4-billion-entry mask on every
layer. Instead the model describes who may see whom with an `AttentionLayout`, a few integers per
token of the cache, and attention is computed in blocks whose masks are built on the fly:

* a query at cache index i sees key j iff j <= i, token j is real (not padding), both belong to the
  same packed document, and, on chunked (RoPE) layers, both lie in the same chunk;
* chunk ids count from a row's first real token (left padding is skipped) and, for documents packed
  into one row, from each document's first token, as transformers' mask builders do; so the results
  equal the dense-mask path.

Without padding or packing no mask is needed and the fused `scaled_dot_product_attention` kernel
(linear memory on CPU and GPU) runs directly: a full-attention layer over a fresh prompt
(`is_causal`), any layer decoding one token, a chunked layer whose queries start on a chunk boundary
(the prompt is padded to whole chunks and reshaped to (batch x chunks, heads, chunk, head_dim), causal
inside each block, which is exact), and, in CPU inference, a full-attention layer on a prompt slice
after cached tokens (cached prefix and causal slice merged through their log-sum-exps). Everything else (padding, packing, a prompt slice after cached tokens) runs query
block by query block against only the keys the block can see, with a boolean mask of at most
`MASK_BUDGET` entries: the chunk and the block on chunked layers, the cached prefix on full layers.
"""

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

# Entries of one block's boolean mask (times the batch); bounds the extra memory of the masked path.
MASK_BUDGET = 1 << 22


@dataclass(frozen=True)
class AttentionLayout:
    """Which keys each query may see, in O(length) memory, for one kind of layer.

    Tensors are indexed by cache position (0 = the first token ever given to the cache) and hold
    `query_end` or more positions; the queries of this call are positions [query_start, query_end).
    """

    query_start: int
    query_end: int
    valid: torch.Tensor | None = None  # (B, L) bool, False on padding; None: every token is real
    document: torch.Tensor | None = None  # (B, L) packed-document index; None: one document per row
    chunk: torch.Tensor | None = None  # (B or 1, L) chunk index (chunked layers only)
    chunk_size: int | None = None  # None on full-attention layers

    @property
    def plain(self) -> bool:
        """No padding and no packing: only causality and chunk boundaries count."""
        return self.valid is None and self.document is None

    def for_queries(self, start: int, end: int) -> "AttentionLayout":
        """The same layout for the queries at cache positions [start, end) (one prefill slice)."""
        return replace(self, query_start=start, query_end=end)


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of every token when several documents are packed into a row (positions
    restart), else None. A new document starts wherever a position is not its predecessor + 1."""
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    document = starts.cumsum(-1)
    return None if bool((document[:, -1] == 0).all()) else document


def build_layouts(
    layer_types,
    chunk_size: int | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past: int,
    length: int,
    batch: int,
) -> dict:
    """One `AttentionLayout` per layer kind for `length` new tokens after `past` cached ones.

    `attention_mask` is the usual 2D padding mask over cached + new tokens (1 = real token).
    Packing is recognised only without a mask and without cached tokens, as transformers does.
    """
    total = past + length
    device = position_ids.device
    valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D (batch, tokens) here, got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] < total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache and the inputs hold {total}: "
                "pass a mask over the cached tokens and the new ones"
            )
        valid = attention_mask[:, :total].to(device=device, dtype=torch.bool)
        if bool(valid.all()):
            valid = None
    positions = position_ids.expand(batch, -1)
    document = packed_documents(positions) if attention_mask is None and past == 0 else None

    layouts = {}
    for kind in set(layer_types):
        if kind == "full_attention":
            layouts[kind] = AttentionLayout(past, total, valid, document)
            continue
        if document is not None:
            chunk = torch.div(positions, chunk_size, rounding_mode="floor")
        else:
            index = torch.arange(total, device=device)[None]
            if valid is not None:
                left_padding = (valid.long().cumsum(-1) == 0).sum(-1, keepdim=True)
                index = index - left_padding
            chunk = torch.div(index, chunk_size, rounding_mode="floor")
        layouts[kind] = AttentionLayout(past, total, valid, document, chunk, chunk_size)
    return layouts


def _sdpa(query, key, value, scaling, dropout, mask=None, is_causal=False):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )


def _prefix_then_causal(query, key, value, split: int, scaling: float) -> torch.Tensor | None:
    """Keys [0, split) visible to every query, keys [split, S) causal with the queries: two fused
    passes merged through their log-sum-exps, so no mask is built. CPU inference only (the kernel
    that returns the log-sum-exp is torch's CPU flash attention); None where it is unavailable."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None or query.device.type != "cpu" or torch.is_grad_enabled():
        return None
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    prefix, prefix_lse = kernel(query, key[:, :, :split], value[:, :, :split], 0.0, False, scale=scaling)
    own, own_lse = kernel(query, key[:, :, split:], value[:, :, split:], 0.0, True, scale=scaling)
    total = torch.logaddexp(prefix_lse, own_lse)
    merged = prefix.float() * (prefix_lse - total).exp()[..., None] + own.float() * (own_lse - total).exp()[..., None]
    return merged.to(query.dtype)


def _chunk_blocks(query, key, value, chunk_size: int, scaling: float, dropout: float) -> torch.Tensor:
    """Causal attention inside consecutive chunks, the first starting at query 0 (keys aligned). The whole
    chunks go through one batched kernel; a last partial chunk runs on its own, unpadded (padding a short
    prompt to a whole chunk would cost up to chunk/length times the work)."""
    batch, heads, length, dim = query.shape
    whole = length // chunk_size * chunk_size
    parts = []
    if whole:
        blocks = whole // chunk_size

        def to_blocks(x):
            return x[:, :, :whole].reshape(batch, x.shape[1], blocks, chunk_size, dim).transpose(1, 2).reshape(
                batch * blocks, x.shape[1], chunk_size, dim
            )

        out = _sdpa(to_blocks(query), to_blocks(key), to_blocks(value), scaling, dropout, is_causal=True)
        parts.append(out.view(batch, blocks, heads, chunk_size, dim).transpose(1, 2).reshape(batch, heads, whole, dim))
    if whole < length:
        rest = slice(whole, length)
        parts.append(_sdpa(query[:, :, rest], key[:, :, rest], value[:, :, rest], scaling, dropout, is_causal=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _block_mask(layout: AttentionLayout, q_lo: int, q_hi: int, k_lo: int, k_hi: int, device) -> torch.Tensor:
    """Boolean keep-mask (B or 1, 1, q_hi - q_lo, k_hi - k_lo) between cache positions."""
    q_index = torch.arange(q_lo, q_hi, device=device)[:, None]
    k_index = torch.arange(k_lo, k_hi, device=device)[None]
    keep = (k_index <= q_index)[None]
    if layout.valid is not None:
        keep = keep & layout.valid[:, None, k_lo:k_hi]
    if layout.document is not None:
        keep = keep & (layout.document[:, q_lo:q_hi, None] == layout.document[:, None, k_lo:k_hi])
    if layout.chunk is not None:
        keep = keep & (layout.chunk[:, q_lo:q_hi, None] == layout.chunk[:, None, k_lo:k_hi])
    # A padding query sees nothing; let it see its whole block instead of producing NaN (its output
    # is never used, but NaN would leak through 0-weighted sums in later layers).
    keep = keep | ~keep.any(-1, keepdim=True)
    return keep[:, None]


def linear_memory_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: AttentionLayout,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """q (B, H, T, d), k/v (B, Hkv, S, d) holding cache positions [end - S, end) -> (B, T, H, d).

    The keys are what the cache returned: every earlier token on full layers, at least the current
    chunk's earlier tokens on chunked layers.
    """
    batch, _, length, _ = query.shape
    keys = key.shape[-2]
    end = layout.query_end
    start, kv_start = end - length, end - keys
    if start != layout.query_start:
        raise ValueError(f"the layout describes queries from {layout.query_start}, the inputs start at {start}")
    if kv_start > start:
        raise ValueError(f"keys start at cache position {kv_start}, after the first query at {start}")
    chunk = layout.chunk_size

    if layout.plain:
        if chunk is None and keys == length:
            return _sdpa(query, key, value, scaling, dropout, is_causal=length > 1).transpose(1, 2)
        if length == 1:
            first = kv_start if chunk is None else max(kv_start, (end - 1) // chunk * chunk)
            out = _sdpa(query, key[:, :, first - kv_start :], value[:, :, first - kv_start :], scaling, dropout)
            return out.transpose(1, 2)
        if chunk is None and dropout == 0.0:
            out = _prefix_then_causal(query, key, value, start - kv_start, scaling)
            if out is not None:
                return out.transpose(1, 2)
        if chunk is not None and start % chunk == 0:
            own = start - kv_start
            return _chunk_blocks(query, key[:, :, own:], value[:, :, own:], chunk, scaling, dropout).transpose(1, 2)

    if chunk is None:
        block = max(1, min(length, MASK_BUDGET // (batch * keys)))
    else:
        block = max(1, min(length, chunk, MASK_BUDGET // (batch * 2 * chunk)))
    outputs = []
    for q_lo in range(start, end, block):
        q_hi = min(end, q_lo + block)
        k_lo = kv_start if chunk is None else max(kv_start, q_lo - chunk + 1)
        mask = _block_mask(layout, q_lo, q_hi, k_lo, q_hi, query.device)
        span = slice(k_lo - kv_start, q_hi - kv_start)
        outputs.append(
            _sdpa(query[:, :, q_lo - start : q_hi - start], key[:, :, span], value[:, :, span], scaling, dropout, mask)
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def kv_cache_bytes(config, tokens: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of keys and values `DynamicCache(config)` holds after `tokens` tokens:

        2 * num_key_value_heads * head_dim * bytes_per_value * (full_layers * tokens + chunked_layers * min(tokens, chunk - 1))

    per sequence; full (NoPE) layers keep every token, chunked layers at most chunk - 1.
    """
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim * bytes_per_value
    chunked = sum(kind == "chunked_attention" for kind in config.layer_types)
    full = len(config.layer_types) - chunked
    window = min(tokens, config.attention_chunk_size - 1) if chunked else 0
    return batch * per_token_layer * (full * tokens + chunked * window)
