"""Greedy decoding for MarianMT with a preallocated KV cache, optionally replayed as CUDA graphs.

transformers' ``generate`` spends most of its time outside the model at large batches: it copies
every step's logits to float32 and runs logits processors over them, grows the KV cache with
``torch.cat`` and synchronises every step. This loop keeps everything in the model's dtype, writes
keys and values into fixed buffers, fuses the q/k/v projections and checks for "all finished"
every few steps only. With a fixed shape per (batch, source length) the whole step is captured
once as a CUDA graph, so a step costs one launch. The arithmetic is the model's own (same weights,
same order of residual and post-norm), so greedy outputs equal ``generate``'s up to float rounding.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .generation import unsupported_generation_options


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


@dataclass
class _Layer:
    """One decoder layer's weights, with the self-attention q/k/v and cross-attention k/v fused."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    self_out: torch.nn.Linear
    self_norm: torch.nn.LayerNorm
    cross_q: torch.nn.Linear
    cross_kv_w: torch.Tensor
    cross_kv_b: torch.Tensor
    cross_out: torch.nn.Linear
    cross_norm: torch.nn.LayerNorm
    fc1: torch.nn.Linear
    fc2: torch.nn.Linear
    final_norm: torch.nn.LayerNorm
    act: Any


class _DecodeState:
    """Fixed buffers for one (batch, source length) shape; a CUDA graph reads and writes only these."""

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, src_len: int, steps: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # Zeros, not empty: masked cache slots are multiplied by 0 and NaN garbage would survive that.
        self.self_k = torch.zeros(n_layers, batch, heads, steps, head_dim, dtype=dtype, device=device)
        self.self_v = torch.zeros_like(self.self_k)
        self.cross_k = torch.zeros(n_layers, batch, heads, src_len, head_dim, dtype=dtype, device=device)
        self.cross_v = torch.zeros_like(self.cross_k)
        self.src_bias = torch.zeros(batch, 1, 1, src_len, dtype=dtype, device=device)  # 0 or -inf (padding)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, steps, dtype=torch.long, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []  # one per output position


class FastGreedyDecoder:
    """Greedy ``generate`` replacement for one MarianMTModel (eval mode, any device and dtype)."""

    def __init__(self, model: Any, cuda_graphs: bool = True, attention: str = "sdpa", max_graphs: int = 3,
                 check_every: int = 4) -> None:
        problems = unsupported_generation_options(model)
        if problems:
            raise ValueError(f"generation options not supported by the fast greedy loop: {problems}")
        self.model = model
        cfg = model.config
        dec = model.model.decoder
        self.heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // self.heads
        self.scaling = self.head_dim ** -0.5
        self.embed = dec.embed_tokens.weight
        self.embed_scale = dec.embed_scale
        self.positions = dec.embed_positions.weight
        # The output projection is padded to a multiple of 64 rows (zero weights, -inf bias): 58,101
        # columns of logits make an unaligned row stride, which keeps cuBLAS off its fastest kernels.
        weight, bias = model.lm_head.weight, model.final_logits_bias[0]
        extra = -weight.shape[0] % 64
        self.lm_weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
        self.lm_bias = torch.cat([bias, bias.new_full((extra,), float("-inf"))])
        self.layers = [self._fuse(layer) for layer in dec.layers]
        gen = model.generation_config
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
        self.start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None \
            else cfg.decoder_start_token_id
        self.eos = _ids(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id)
        self.banned = [ids[0] for ids in gen.bad_words_ids or []]
        forced = _ids(gen.forced_eos_token_id)
        self.forced_eos = forced[0] if forced else None
        self.device = self.embed.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.attention = attention  # sdpa | matmul (explicit, for one query per sequence)
        self.max_graphs = max_graphs
        self.check_every = check_every
        self._states: OrderedDict[tuple[int, ...], _DecodeState] = OrderedDict()
        # Index tensors live on the device: a host-to-device copy is not allowed inside graph capture.
        self._eos_t = torch.tensor(self.eos, device=self.device)
        self._banned_t = torch.tensor(self.banned, dtype=torch.long, device=self.device)
        self._pad_t = torch.tensor(self.pad, device=self.device)
        self._forced_t = torch.tensor(self.forced_eos if self.forced_eos is not None else -1, device=self.device)

    @staticmethod
    def _fuse(layer: Any) -> _Layer:
        sa, ca = layer.self_attn, layer.encoder_attn
        return _Layer(
            qkv_w=torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]),
            qkv_b=torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]),
            self_out=sa.out_proj, self_norm=layer.self_attn_layer_norm, cross_q=ca.q_proj,
            cross_kv_w=torch.cat([ca.k_proj.weight, ca.v_proj.weight]),
            cross_kv_b=torch.cat([ca.k_proj.bias, ca.v_proj.bias]),
            cross_out=ca.out_proj, cross_norm=layer.encoder_attn_layer_norm,
            fc1=layer.fc1, fc2=layer.fc2, final_norm=layer.final_layer_norm, act=layer.activation_fn)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention of one query per sequence; ``bias`` is 0 / -inf over the keys (None: all visible)."""
        if self.attention == "sdpa":
            mask = None if bias is None else bias == 0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        # One query: two batched matrix-vector products that read K and V once, no kernel tiling waste.
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        if bias is not None:
            scores = scores + bias
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)

    def _step(self, st: _DecodeState, t: int, min_new: int, max_new: int) -> None:
        """Token ``t`` for the whole batch; only tensor ops on ``st``, so that it can be graph-captured.

        ``t`` is a Python int: each step is its own graph, and self-attention reads only the t + 1
        filled cache slots (no mask, half the cache traffic of a fixed-length step on average).
        """
        batch = st.out.shape[0]
        h = F.embedding(st.tokens, self.embed) * self.embed_scale + self.positions[t]
        for i, lw in enumerate(self.layers):
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b).view(batch, 3, self.heads, 1, self.head_dim)
            st.self_k[i, :, :, t:t + 1].copy_(qkv[:, 1])
            st.self_v[i, :, :, t:t + 1].copy_(qkv[:, 2])
            a = self._attend(qkv[:, 0], st.self_k[i, :, :, :t + 1], st.self_v[i, :, :, :t + 1], None)
            h = lw.self_norm(h + lw.self_out(a.reshape(batch, -1)))
            q = lw.cross_q(h).view(batch, self.heads, 1, self.head_dim)
            a = self._attend(q, st.cross_k[i], st.cross_v[i], st.src_bias)
            h = lw.cross_norm(h + lw.cross_out(a.reshape(batch, -1)))
            h = lw.final_norm(h + lw.fc2(lw.act(lw.fc1(h))))
        # Bias added apart from the matmul, as MarianMTModel does, so the rounding is the same.
        logits = F.linear(h, self.lm_weight) + self.lm_bias
        if self.banned:
            logits.index_fill_(1, self._banned_t, float("-inf"))
        if t < min_new:
            logits.index_fill_(1, self._eos_t, float("-inf"))
        if self.forced_eos is not None and t == max_new - 1:
            nxt = self._forced_t.expand(batch)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = torch.where(st.finished, self._pad_t, nxt)
        st.finished |= (nxt.unsqueeze(1) == self._eos_t).any(dim=1)
        st.out[:, t].copy_(nxt)
        st.tokens.copy_(nxt)

    def _reset(self, st: _DecodeState) -> None:
        st.tokens.fill_(self.start)
        st.finished.zero_()
        st.out.fill_(self.pad)

    def _state(self, batch: int, src_len: int, max_new: int, min_new: int) -> _DecodeState:
        key = (batch, src_len, max_new, min_new)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        while len(self._states) >= self.max_graphs:
            self._states.popitem(last=False)
        st = _DecodeState(len(self.layers), batch, self.heads, self.head_dim, src_len, max_new,
                          self.embed.dtype, self.device)
        if self.use_graphs:
            # Warm up on a side stream (lazy cuBLAS/SDPA initialisation must not happen during capture).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._reset(st)
                for t in range(max_new):
                    self._step(st, t, min_new, max_new)
            torch.cuda.current_stream().wait_stream(side)
            self._reset(st)
            pool = None  # the steps run one after another, so they can share one memory pool
            for t in range(max_new):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(st, t, min_new, max_new)
                pool = graph.pool()
                st.graphs.append(graph)
        self._states[key] = st
        return st

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy token ids [batch, <= max_new_tokens] (no start token; pad after EOS), like ``generate``."""
        batch, src_len = input_ids.shape
        st = self._state(batch, src_len, max_new_tokens, min_new_tokens)
        enc = self.model.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        for i, lw in enumerate(self.layers):
            kv = F.linear(enc, lw.cross_kv_w, lw.cross_kv_b).view(batch, src_len, 2, self.heads, self.head_dim)
            st.cross_k[i].copy_(kv[:, :, 0].transpose(1, 2))
            st.cross_v[i].copy_(kv[:, :, 1].transpose(1, 2))
        st.src_bias.copy_(torch.zeros_like(st.src_bias).masked_fill(
            attention_mask.view(batch, 1, 1, src_len) == 0, float("-inf")))
        self._reset(st)
        done = max_new_tokens
        for step in range(max_new_tokens):
            if st.graphs:
                st.graphs[step].replay()
            else:
                self._step(st, step, min_new_tokens, max_new_tokens)
            # .all() forces a device sync, so it is asked only every few steps.
            if (step + 1) % self.check_every == 0 and bool(st.finished.all()):
                done = step + 1
                break
        return st.out[:, :done].clone()
