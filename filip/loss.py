"""FILIP's token-wise late-interaction loss and the CLIP baseline loss.

Late interaction needs, for every image/text pair, the similarity of every patch with every word:
a Bi x Bt x P x L tensor (512 x 512 x 49 x 77 is ~1e9 numbers). `LateInteraction` never builds it
whole: it walks over image chunks, keeps only the arg-max indices for the backward pass, and in
the backward pass rebuilds each chunk's (sparse) gradient as a dense matrix so both input
gradients are plain matrix products.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one [chunk, P, Bt, L] similarity block when chunk_size is None (256 MiB in bf16).
AUTO_CHUNK_ELEMENTS = 128 * 1024 * 1024

logger = logging.getLogger(__name__)


def _no_autocast(device: torch.device) -> torch.autocast:
    """The interaction runs in its inputs' dtype: an outer autocast (the trainer's bf16) would
    otherwise recast its matrix products and make the configured gather dtype meaningless."""
    return torch.autocast(device.type, enabled=False)


@functools.lru_cache(maxsize=None)
def _matmul_works(dtype: torch.dtype, device_type: str) -> bool:
    """Probed once per dtype and device type (cached), so the fallback warns once."""
    try:
        with torch.autocast(device_type, enabled=False):
            ones = torch.ones(2, 2, dtype=dtype, device=device_type)
            ones @ ones
        return True
    except RuntimeError:
        logger.warning("no %s matrix product on %s: the FILIP loss falls back to float32",
                       dtype, device_type)
        return False


def interaction_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """`dtype`, or float32 where this device's torch build has no matrix product in it (CPU
    builds of older torch versions lack float16 ones); None keeps the features' own dtype."""
    if dtype is None or _matmul_works(dtype, device.type):
        return dtype
    return torch.float32


def _augment(img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append columns so that padded text tokens score far below any real pair.

    Image tokens get a constant 1 and text tokens get 0 (real) or a large negative number
    (padding, whose features are zeroed). The matrix product then yields the masked similarity
    directly, which saves a full masked_fill pass over the biggest tensor. The extra width is
    rounded up to a multiple of 8 so 16-bit matrix products stay on tensor cores.
    """
    d = img.shape[-1]
    extra = 8 - d % 8 if d % 8 else 8
    with torch.no_grad():
        # Any real similarity is >= -(max|img| * max|txt|); padding gets one less than that.
        floor = img.detach().norm(dim=-1).amax().float() * txt.detach().norm(dim=-1).amax().float()
        pad_value = -(floor + 1.0)
    img_extra = img.new_zeros(*img.shape[:-1], extra)
    img_extra[..., 0] = 1.0
    txt_extra = txt.new_zeros(*txt.shape[:-1], extra)
    txt_extra[..., 0] = torch.where(txt_mask, 0.0, pad_value).to(txt.dtype)
    txt = txt * txt_mask.unsqueeze(-1).to(txt.dtype)
    return torch.cat([img, img_extra], dim=-1), torch.cat([txt, txt_extra], dim=-1)


class LateInteraction(torch.autograd.Function):
    """Chunked late-interaction scores with a memory-light custom backward."""

    @staticmethod
    def forward(ctx: Any, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(img.device):
            return LateInteraction._forward(ctx, img, txt, txt_mask, chunk_size)

    @staticmethod
    def _forward(ctx: Any, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        bi, p, d = img.shape
        bt, l, _ = txt.shape
        img_aug, txt_aug = _augment(img, txt, txt_mask)
        txt_flat = txt_aug.reshape(bt * l, -1)
        # Text-to-image means run over the valid tokens only; weights sum to 1 per text.
        # Scores are accumulated in at least float32 even when the tokens are 16-bit.
        acc = torch.promote_types(img.dtype, torch.float32)
        mean_weight = txt_mask.to(acc) / txt_mask.sum(dim=1, keepdim=True).clamp(min=1).to(acc)
        i2t = img.new_empty(bi, bt, dtype=acc)
        t2i = img.new_empty(bi, bt, dtype=acc)
        # int16 keeps the saved indices small (P and L are far below 32k).
        idx_dtype = torch.int16 if max(p, l) < 2 ** 15 else torch.int64
        best_word = torch.empty(bi, p, bt, dtype=idx_dtype, device=img.device)
        best_patch = torch.empty(bi, bt, l, dtype=idx_dtype, device=img.device)
        for start in range(0, bi, chunk_size):
            stop = min(start + chunk_size, bi)
            c = stop - start
            # [c*P, Bt*L] in one matrix product, viewed as [c, P, Bt, L]: no copy.
            sim = (img_aug[start:stop].reshape(c * p, -1) @ txt_flat.T).view(c, p, bt, l)
            word_max, word_idx = sim.max(dim=3)  # [c, P, Bt]: best word for each patch
            patch_max, patch_idx = sim.max(dim=1)  # [c, Bt, L]: best patch for each word
            del sim
            i2t[start:stop] = word_max.to(acc).mean(dim=1)
            t2i[start:stop] = (patch_max.to(acc) * mean_weight).sum(dim=2)
            best_word[start:stop] = word_idx.to(idx_dtype)
            best_patch[start:stop] = patch_idx.to(idx_dtype)
        ctx.save_for_backward(img_aug, txt_aug, mean_weight, best_word, best_patch)
        ctx.chunk_size = chunk_size
        ctx.dims = (p, d)
        return i2t, t2i

    @staticmethod
    def backward(ctx: Any, grad_i2t: torch.Tensor | None, grad_t2i: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        # The backward may run under whatever autocast state the caller of .backward() had.
        with _no_autocast(grad_i2t.device if grad_i2t is not None else grad_t2i.device):
            return LateInteraction._backward(ctx, grad_i2t, grad_t2i)

    @staticmethod
    def _backward(ctx: Any, grad_i2t: torch.Tensor | None, grad_t2i: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        img_aug, txt_aug, mean_weight, best_word, best_patch = ctx.saved_tensors
        p, d = ctx.dims
        bi = img_aug.shape[0]
        bt, l, _ = txt_aug.shape
        dtype = img_aug.dtype
        if grad_i2t is None:
            grad_i2t = torch.zeros(bi, bt, dtype=mean_weight.dtype, device=img_aug.device)
        if grad_t2i is None:
            grad_t2i = torch.zeros(bi, bt, dtype=mean_weight.dtype, device=img_aug.device)
        txt_flat = txt_aug.reshape(bt * l, -1)
        grad_img = torch.empty_like(img_aug)
        acc = mean_weight.dtype
        grad_txt = torch.zeros(bt * l, txt_aug.shape[-1], dtype=acc, device=txt_aug.device)
        for start in range(0, bi, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, bi)
            c = stop - start
            # d score / d sim is non-zero only where a max was taken: rebuild those weights.
            weight = torch.zeros(c, p, bt, l, dtype=dtype, device=img_aug.device)
            src_i2t = (grad_i2t[start:stop] / p).to(dtype)[:, None, :, None].expand(c, p, bt, 1)
            weight.scatter_add_(3, best_word[start:stop].long().unsqueeze(3), src_i2t)
            src_t2i = (grad_t2i[start:stop, :, None] * mean_weight).to(dtype).unsqueeze(1)
            weight.scatter_add_(1, best_patch[start:stop].long().unsqueeze(1), src_t2i)
            weight = weight.view(c * p, bt * l)
            img_chunk = img_aug[start:stop].reshape(c * p, -1)
            grad_img[start:stop] = (weight @ txt_flat).view(c, p, -1)
            grad_txt += (weight.T @ img_chunk).to(acc)
        grad_txt = grad_txt.view(bt, l, -1)[..., :d].to(txt_aug.dtype)
        return grad_img[..., :d], grad_txt, None, None


def _auto_chunk(bt: int, p: int, l: int) -> int:
    return max(1, AUTO_CHUNK_ELEMENTS // max(1, bt * p * l))


def late_interaction_scores(img_tokens: torch.Tensor, txt_tokens: torch.Tensor,
                            txt_mask: torch.Tensor, chunk_size: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP similarities between every image and every text, both [Bi, Bt] (>= float32).

    i2t[i, j] = mean over patches p of max over valid words l of <img[i, p], txt[j, l]>;
    t2i[i, j] = mean over valid words l of max over patches p of the same. Padding (mask False)
    never wins a max and never enters a mean. Every text needs at least one valid token.
    `chunk_size` images are scored at a time (None: sized to a fixed memory budget). The matrix
    products run in the inputs' dtype (the wider of the two) even under autocast.
    """
    if img_tokens.dtype != txt_tokens.dtype:
        common = torch.promote_types(img_tokens.dtype, txt_tokens.dtype)
        img_tokens, txt_tokens = img_tokens.to(common), txt_tokens.to(common)
    if chunk_size is None:
        chunk_size = _auto_chunk(txt_tokens.shape[0], img_tokens.shape[1], txt_tokens.shape[1])
    return LateInteraction.apply(img_tokens, txt_tokens, txt_mask.bool(), int(chunk_size))


def dense_late_interaction_scores(img_tokens: torch.Tensor, txt_tokens: torch.Tensor,
                                  txt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores from the full 4-D tensor: a reference for tests and small batches only."""
    sim = torch.einsum("ipd,jld->ijpl", img_tokens, txt_tokens)
    valid = txt_mask.bool()[None, :, None, :]
    i2t = sim.masked_fill(~valid, float("-inf")).amax(dim=3).mean(dim=2)
    per_word = sim.amax(dim=2)  # [Bi, Bt, L]
    weight = txt_mask.to(sim.dtype) / txt_mask.sum(dim=1, keepdim=True).to(sim.dtype)
    t2i = (per_word * weight[None]).sum(dim=2)
    return i2t, t2i


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for the local slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.world = group, dist.get_rank(group), world
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == "nccl":
            local = torch.empty_like(grad[:n])
            dist.reduce_scatter_tensor(local, grad, group=ctx.group)
            return local, None
        # gloo has no reduce_scatter: all-reduce and keep our slice.
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * n:(ctx.rank + 1) * n].clone(), None


def gather_features(tensor: torch.Tensor, world_size: int, with_grad: bool = True,
                    group: Any = None) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order."""
    if world_size == 1:
        return tensor
    if with_grad:
        return _GatherWithGrad.apply(tensor, group)
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.cat(out, dim=0)


def _symmetric_ce(rows_i2t: torch.Tensor, rows_t2i: torch.Tensor, offset: int) -> torch.Tensor:
    labels = torch.arange(rows_i2t.shape[0], device=rows_i2t.device) + offset
    return (F.cross_entropy(rows_i2t, labels) + F.cross_entropy(rows_t2i, labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over pooled features (the CLIP baseline), open_clip style.

    Each rank scores its local rows against the gathered columns; DDP's gradient averaging
    then yields the gradient of the loss over the whole global batch.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def forward(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor,
                logit_scale: torch.Tensor, **_: Any) -> torch.Tensor:
        all_image = gather_features(image_pooled, self.world_size, self.gather_with_grad)
        all_text = gather_features(text_pooled, self.world_size, self.gather_with_grad)
        logits_i2t = logit_scale * image_pooled @ all_text.T
        logits_t2i = logit_scale * text_pooled @ all_image.T
        return _symmetric_ce(logits_i2t.float(), logits_t2i.float(), self.rank * image_pooled.shape[0])


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of `n` positions (the padded width for text, so every rank gathers the
    same shape): round(n * ratio), at least 1; ratio 1 keeps all."""
    return n if ratio >= 1.0 else max(1, round(n * ratio))


def _token_scores(img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                  chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's best similarity to any real word of the group's texts, each word's best
    similarity to any patch of the group's images; padding scores the lowest float32."""
    b, p, d = img.shape
    l = txt.shape[1]
    neg = torch.finfo(torch.float32).min
    txt_flat = (txt * txt_mask.unsqueeze(-1).to(txt.dtype)).reshape(b * l, d)
    valid_cols = txt_mask.reshape(b * l)
    chunk = chunk_size or _auto_chunk(b, p, l)
    patch_score = torch.empty(b, p, device=img.device)
    word_score = torch.full((b * l,), neg, device=img.device)
    for start in range(0, b, chunk):
        sim = (img[start:start + chunk].reshape(-1, d) @ txt_flat.T).float()
        patch_score[start:start + chunk] = sim.masked_fill(~valid_cols, neg).amax(dim=1).view(-1, p)
        word_score = torch.maximum(word_score, sim.amax(dim=0))
    return patch_score, word_score.view(b, l).masked_fill(~txt_mask, neg)


def select_tokens(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                  image_keep_ratio: float, text_keep_ratio: float, group_size: int | None = None,
                  chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each sample's tokens with the highest max-similarity within its group of samples.

    The paper's rule, applied before the all-gather to cut communication: a patch is ranked by
    its best similarity to any real word of the group's texts, a word by its best similarity to
    any of the group's patches. A group is `group_size` consecutive local samples (None: the
    whole local batch, the paper's "local worker"); a fixed group size makes the selection the
    same however the global batch is split over processes. Text keeps the best
    round(L * text_keep_ratio) positions by score, never by position, and padding ranks below
    every real token (a selected padding position stays masked). Indices are chosen without
    gradient and in the inputs' dtype; gathering by them keeps the features' gradient.
    Returns (image tokens [B, kp, D], text tokens [B, kl, D], text mask [B, kl]).
    """
    b, p, d = img_tokens.shape
    l = txt_tokens.shape[1]
    keep_p, keep_l = keep_count(p, image_keep_ratio), keep_count(l, text_keep_ratio)
    group = group_size or b
    with torch.no_grad(), _no_autocast(img_tokens.device):
        scores = [_token_scores(img_tokens[s:s + group].detach(), txt_tokens[s:s + group].detach(),
                                txt_mask[s:s + group], chunk_size) for s in range(0, b, group)]
        patch_idx = torch.cat([s[0] for s in scores]).topk(keep_p, dim=1).indices
        word_idx = torch.cat([s[1] for s in scores]).topk(keep_l, dim=1).indices
    if keep_p < p:
        img_tokens = img_tokens.gather(1, patch_idx.unsqueeze(-1).expand(b, keep_p, d))
    if keep_l < l:
        txt_tokens = txt_tokens.gather(1, word_idx.unsqueeze(-1).expand(b, keep_l, d))
        txt_mask = txt_mask.gather(1, word_idx)
    return img_tokens, txt_tokens, txt_mask


class FilipLoss(nn.Module):
    """Symmetric InfoNCE over FILIP late-interaction similarities.

    Token features are cast to `gather_dtype` (default float16, as the paper gathered them; float32
    on a device whose torch build has no float16 matrix product) and the whole interaction runs
    in that dtype whatever the caller's autocast, so float32 means float32. Token selection
    (`select_tokens`) keeps `image_keep_ratio` of the patches and `text_keep_ratio` of the text
    positions (each defaulting to `token_keep_ratio`; 1 keeps all), with one process as with
    many, scored within groups of `select_group_size` local samples (None: the local batch; fix
    it to make the result independent of how a global batch is split over processes).
    Distributed: the selected tokens are gathered with
    gradient along with the text masks; each rank scores its local images against all texts and
    all images against its local texts.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, chunk_size: int | None = None,
                 token_keep_ratio: float = 0.25, gather_dtype: torch.dtype | None = torch.float16,
                 gather_with_grad: bool = True, image_keep_ratio: float | None = None,
                 text_keep_ratio: float | None = None, select_group_size: int | None = None
                 ) -> None:
        super().__init__()
        self.image_keep_ratio = token_keep_ratio if image_keep_ratio is None else image_keep_ratio
        self.text_keep_ratio = token_keep_ratio if text_keep_ratio is None else text_keep_ratio
        for name in ("image_keep_ratio", "text_keep_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if select_group_size is not None and select_group_size < 1:
            raise ValueError(f"select_group_size must be >= 1, got {select_group_size}")
        self.rank, self.world_size = rank, world_size
        self.chunk_size = chunk_size
        self.gather_dtype = gather_dtype
        self.gather_with_grad = gather_with_grad
        self.select_group_size = select_group_size

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                logit_scale: torch.Tensor, **_: Any) -> torch.Tensor:
        text_mask = text_mask.bool()
        dtype = interaction_dtype(self.gather_dtype, image_tokens.device)
        if dtype is not None:
            image_tokens, text_tokens = image_tokens.to(dtype), text_tokens.to(dtype)
        if self.image_keep_ratio < 1.0 or self.text_keep_ratio < 1.0:
            image_tokens, text_tokens, text_mask = select_tokens(
                image_tokens, text_tokens, text_mask, self.image_keep_ratio, self.text_keep_ratio,
                self.select_group_size, self.chunk_size)
        if self.world_size == 1:
            i2t, t2i = late_interaction_scores(image_tokens, text_tokens, text_mask, self.chunk_size)
            return _symmetric_ce(logit_scale * i2t, logit_scale * t2i.T, 0)
        all_img = gather_features(image_tokens, self.world_size, self.gather_with_grad)
        all_txt = gather_features(text_tokens, self.world_size, self.gather_with_grad)
        all_mask = gather_features(text_mask.to(torch.uint8), self.world_size, False).bool()
        i2t_rows, _ = late_interaction_scores(image_tokens, all_txt, all_mask, self.chunk_size)
        _, t2i_cols = late_interaction_scores(all_img, text_tokens, text_mask, self.chunk_size)
        b = image_tokens.shape[0]
        return _symmetric_ce(logit_scale * i2t_rows, logit_scale * t2i_cols.T, self.rank * b)
