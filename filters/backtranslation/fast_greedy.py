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


def unsupported_generation_options(model: Any) -> list[str]:
    """Options in the model's generation config that this loop does not reproduce (empty: safe to use)."""
    gen = model.generation_config
    found = []
    if gen.repetition_penalty not in (None, 1.0):
        found.append("repetition_penalty")
    if gen.no_repeat_ngram_size:
        found.append("no_repeat_ngram_size")
    if gen.suppress_tokens or gen.begin_suppress_tokens:
        found.append("suppress_tokens")
    if any(len(ids) != 1 for ids in gen.bad_words_ids or []):
        found.append("multi-token bad_words_ids")
    if gen.forced_bos_token_id is not None:
        found.append("forced_bos_token_id")
    return found


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
        self.src_mask = torch.zeros(batch, 1, 1, src_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, steps, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None


class FastGreedyDecoder:
    """Greedy ``generate`` replacement for one MarianMTModel (eval mode, any device and dtype)."""

    def __init__(self, model: Any, cuda_graphs: bool = True, max_graphs: int = 3, check_every: int = 4) -> None:
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
        self.lm_weight = model.lm_head.weight
        self.lm_bias = model.final_logits_bias[0]
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
        self.max_graphs = max_graphs
        self.check_every = check_every
        self._states: OrderedDict[tuple[int, ...], _DecodeState] = OrderedDict()
        self._eos_t = torch.tensor(self.eos, device=self.device)

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

    def _step(self, st: _DecodeState, min_new: int, max_new: int) -> None:
        """One token for the whole batch; only tensor ops on ``st`` so that it can be graph-captured."""
        batch, steps = st.out.shape
        t = st.pos
        h = F.embedding(st.tokens, self.embed) * self.embed_scale + self.positions.index_select(0, t)
        self_mask = (torch.arange(st.self_k.shape[3], device=t.device) <= t).view(1, 1, 1, -1)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b).view(batch, 3, self.heads, 1, self.head_dim)
            st.self_k[i].index_copy_(2, t, qkv[:, 1])
            st.self_v[i].index_copy_(2, t, qkv[:, 2])
            a = F.scaled_dot_product_attention(qkv[:, 0], st.self_k[i], st.self_v[i], attn_mask=self_mask,
                                               scale=self.scaling)
            h = lw.self_norm(h + lw.self_out(a.reshape(batch, -1)))
            q = lw.cross_q(h).view(batch, self.heads, 1, self.head_dim)
            a = F.scaled_dot_product_attention(q, st.cross_k[i], st.cross_v[i], attn_mask=st.src_mask,
                                               scale=self.scaling)
            h = lw.cross_norm(h + lw.cross_out(a.reshape(batch, -1)))
            h = lw.final_norm(h + lw.fc2(lw.act(lw.fc1(h))))
        # Bias added apart from the matmul, as MarianMTModel does, so the rounding is the same.
        logits = F.linear(h, self.lm_weight) + self.lm_bias
        if self.banned:
            logits[:, self.banned] = float("-inf")
        if min_new > 0:
            early = (t < min_new).view(1, 1)
            logits[:, self.eos] = logits[:, self.eos].masked_fill(early, float("-inf"))
        nxt = logits.argmax(dim=-1)
        if self.forced_eos is not None:
            nxt = torch.where(t == max_new - 1, self.forced_eos, nxt)
        nxt = torch.where(st.finished, self.pad, nxt)
        st.finished |= torch.isin(nxt, self._eos_t)
        st.out.index_copy_(1, t, nxt.unsqueeze(1))
        st.tokens.copy_(nxt)
        st.pos.add_(1)

    def _reset(self, st: _DecodeState) -> None:
        st.tokens.fill_(self.start)
        st.pos.zero_()
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
                for _ in range(2):
                    self._reset(st)
                    self._step(st, min_new, max_new)
            torch.cuda.current_stream().wait_stream(side)
            self._reset(st)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                self._step(st, min_new, max_new)
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
        st.src_mask.copy_(attention_mask.bool().view(batch, 1, 1, src_len))
        self._reset(st)
        done = max_new_tokens
        for step in range(max_new_tokens):
            if st.graph is not None:
                st.graph.replay()
            else:
                self._step(st, min_new_tokens, max_new_tokens)
            # .all() forces a device sync, so it is asked only every few steps.
            if (step + 1) % self.check_every == 0 and bool(st.finished.all()):
                done = step + 1
                break
        return st.out[:, :done].clone()
