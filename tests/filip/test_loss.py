"""Late-interaction scores and losses against brute-force references, and across processes."""
from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import filip.loss
from filip.loss import (ClipLoss, FilipLoss, dense_late_interaction_scores, interaction_dtype,
                        late_interaction_scores, select_tokens)


def brute_force_scores(img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's definition, one pair at a time, with explicit token lists (float64)."""
    bi, bt = img.shape[0], txt.shape[0]
    i2t = torch.zeros(bi, bt, dtype=torch.float64)
    t2i = torch.zeros(bi, bt, dtype=torch.float64)
    for i in range(bi):
        for j in range(bt):
            words = txt[j][mask[j]]  # only real tokens exist for this text
            sim = img[i] @ words.T  # [P, n_words]
            i2t[i, j] = sim.max(dim=1).values.mean()
            t2i[i, j] = sim.max(dim=0).values.mean()
    return i2t, t2i


def random_batch(bi: int, bt: int, p: int, l: int, d: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(bi, p, d, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(bt, l, d, generator=gen, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, l + 1, (bt,), generator=gen)
    mask = torch.arange(l)[None] < lengths[:, None]
    mask[0] = False
    mask[0, 0] = True  # a text with a single valid token
    return img, txt, mask


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_scores_and_gradients_match_brute_force(chunk_size: int | None) -> None:
    img, txt, mask = random_batch(5, 6, 7, 9, 16)
    weights = torch.randn(2, 5, 6, dtype=torch.float64)
    img_a, txt_a = img.clone().requires_grad_(), txt.clone().requires_grad_()
    i2t, t2i = late_interaction_scores(img_a, txt_a, mask, chunk_size)
    (weights[0] * i2t + weights[1] * t2i).sum().backward()
    img_b, txt_b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref_i2t, ref_t2i = brute_force_scores(img_b, txt_b, mask)
    (weights[0] * ref_i2t + weights[1] * ref_t2i).sum().backward()
    assert i2t.dtype == torch.float64
    torch.testing.assert_close(i2t, ref_i2t, rtol=0, atol=1e-12)
    torch.testing.assert_close(t2i, ref_t2i, rtol=0, atol=1e-12)
    torch.testing.assert_close(img_a.grad, img_b.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(txt_a.grad, txt_b.grad, rtol=0, atol=1e-12)
    assert txt_a.grad[~mask].abs().max() == 0  # padding gets no gradient


def test_chunked_equals_dense_and_gradcheck() -> None:
    img, txt, mask = random_batch(4, 5, 6, 8, 8, seed=1)
    dense = dense_late_interaction_scores(img, txt, mask)
    for chunk in (1, 2, 4):
        chunked = late_interaction_scores(img, txt, mask, chunk)
        torch.testing.assert_close(chunked[0], dense[0])
        torch.testing.assert_close(chunked[1], dense[1])
    img.requires_grad_()
    txt.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: late_interaction_scores(a, b, mask, 2), (img, txt))


def test_padding_never_wins_a_max() -> None:
    img, txt, mask = random_batch(3, 4, 5, 6, 8, seed=2)
    before = late_interaction_scores(img, txt, mask, 2)
    # Padding that copies an image token exactly would win every max if it were not masked.
    poisoned = txt.clone()
    poisoned[~mask] = img[0, 0]
    after = late_interaction_scores(img, poisoned, mask, 2)
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)


def test_bf16_scores_close_to_float64() -> None:
    img, txt, mask = random_batch(6, 6, 49, 20, 64, seed=3)
    ref = brute_force_scores(img, txt, mask)
    low = late_interaction_scores(img.bfloat16(), txt.bfloat16(), mask)
    assert low[0].dtype == torch.float32
    torch.testing.assert_close(low[0].double(), ref[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(low[1].double(), ref[1], rtol=0, atol=2e-2)


def reference_filip_loss(img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    i2t, t2i = brute_force_scores(img, txt, mask)
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(scale * i2t, labels) + F.cross_entropy(scale * t2i.T, labels)) / 2


def test_filip_loss_matches_reference() -> None:
    img, txt, mask = random_batch(5, 5, 7, 9, 16, seed=4)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = FilipLoss(gather_dtype=None, chunk_size=2, token_keep_ratio=1.0)(img, txt, mask, scale)
    expected = reference_filip_loss(img, txt, mask, scale)
    torch.testing.assert_close(loss, expected)
    (g_loss,) = torch.autograd.grad(loss, scale)
    (g_expected,) = torch.autograd.grad(expected, scale)
    torch.testing.assert_close(g_loss, g_expected)


def test_clip_loss_matches_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * image @ text.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(image, text, scale), expected)


def test_select_tokens_keeps_best_and_passes_gradient() -> None:
    img, txt, mask = random_batch(4, 4, 8, 12, 16, seed=6)
    img = img.float().requires_grad_()
    txt = txt.float().requires_grad_()
    sel_img, sel_txt, sel_mask = select_tokens(img, txt, mask, 0.25, 0.25)
    assert sel_img.shape == (4, 2, 16) and sel_txt.shape == (4, 3, 16) and sel_mask.shape == (4, 3)
    # The best patch of image 0 (max similarity to any valid local word) must be kept.
    sims = img[0].detach() @ txt.detach()[mask].T
    best_patch = sims.max(dim=1).values.argmax()
    assert any(torch.equal(row, img[0, best_patch].detach()) for row in sel_img[0].detach())
    # Text 0 has one valid token: it is selected and the rest of its selection is masked out.
    assert sel_mask[0].sum() == 1
    (sel_img.sum() + sel_txt.sum()).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def test_text_selection_ranks_real_words_and_never_prefers_padding() -> None:
    img, txt, _ = random_batch(2, 2, 6, 12, 16, seed=8)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :10] = True  # a long caption: 10 real words, 3 are kept
    mask[1, :2] = True  # a short one: both real words, then padding
    # Padding that copies an image patch would have the best score of all if it were eligible.
    txt[1, 2:] = img[0, 0]
    # The long caption's best words sit at its end: selection must rank, not cut by position.
    txt[0, 7:10] = img[1, :3]
    sel_img, sel_txt, sel_mask = select_tokens(img, txt, mask, 1.0, 0.25)
    assert torch.equal(sel_img, img)  # ratio 1 leaves a side untouched
    assert sel_txt.shape == (2, 3, 16) and sel_mask.tolist() == [[True] * 3, [True, True, False]]
    def rows(tokens: torch.Tensor) -> set[tuple[float, ...]]:
        return {tuple(row.tolist()) for row in tokens}

    assert rows(sel_txt[0]) == rows(txt[0, 7:10])
    assert rows(sel_txt[1, :2]) == rows(txt[1, :2])


def test_one_process_applies_the_same_selection_per_side() -> None:
    img, txt, mask = random_batch(6, 6, 8, 12, 16, seed=9)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = FilipLoss(gather_dtype=None, image_keep_ratio=0.25, text_keep_ratio=0.5,
                     select_group_size=3)(img, txt, mask, scale)
    halves = [select_tokens(img[r], txt[r], mask[r], 0.25, 0.5) for r in (slice(0, 3), slice(3, 6))]
    sel_img, sel_txt, sel_mask = (torch.cat(parts) for parts in zip(*halves))
    assert sel_img.shape == (6, 2, 16) and sel_txt.shape == (6, 6, 16)
    torch.testing.assert_close(loss, reference_filip_loss(sel_img, sel_txt, sel_mask, scale))
    unselected = FilipLoss(gather_dtype=None, token_keep_ratio=1.0)(img, txt, mask, scale)
    assert abs(loss.item() - unselected.item()) > 1e-3


def _relative_errors(gather_dtype: torch.dtype, img: torch.Tensor, txt: torch.Tensor,
                     mask: torch.Tensor, reference: list[torch.Tensor]) -> list[float]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FilipLoss(gather_dtype=gather_dtype, token_keep_ratio=1.0)(
            img, txt, mask, torch.tensor(50.0, dtype=torch.float64))
    loss.backward()
    return [float((got.double() - ref).norm() / ref.norm())
            for got, ref in zip((loss.detach(), img.grad, txt.grad), reference)]


def test_gather_dtype_sets_the_precision_under_an_outer_autocast() -> None:
    img, txt, mask = random_batch(8, 8, 12, 10, 32, seed=10)
    img_64, txt_64 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss_64 = FilipLoss(gather_dtype=None, token_keep_ratio=1.0)(
        img_64, txt_64, mask, torch.tensor(50.0, dtype=torch.float64))
    loss_64.backward()
    reference = [loss_64.detach(), img_64.grad, txt_64.grad]
    assert max(_relative_errors(torch.float32, img, txt, mask, reference)) < 1e-5
    assert max(_relative_errors(torch.bfloat16, img, txt, mask, reference)) > 1e-3
    float16 = _relative_errors(torch.float16, img, txt, mask, reference)
    assert max(float16) < 1e-2


def test_interaction_dtype_falls_back_to_float32_without_a_matmul(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert interaction_dtype(None, cpu) is None
    assert interaction_dtype(torch.float32, cpu) == torch.float32
    monkeypatch.setattr(filip.loss, "_matmul_works", lambda dtype, device_type: False)
    assert interaction_dtype(torch.float16, cpu) == torch.float32


# -- two processes with gloo --------------------------------------------------------------------

# Full FILIP, FILIP with token selection on both sides, and CLIP: each compared between one
# process on the whole batch and two ranks on its halves.
KINDS = ("filip", "filip_selected", "clip")

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, data: dict[str, Any],
                     results: dict[str, Any]) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        b = data["img"].shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        for kind in KINDS:
            img = data["img"][rows].clone().requires_grad_()
            txt = data["txt"][rows].clone().requires_grad_()
            scale = data["scale"].clone().requires_grad_()
            if kind == "filip":
                loss_fn = FilipLoss(rank, world, chunk_size=1, token_keep_ratio=1.0, gather_dtype=None)
                loss = loss_fn(img, txt, data["mask"][rows], scale)
            elif kind == "filip_selected":
                # Selection scored within each rank's 3 samples (default group: the local batch).
                loss_fn = FilipLoss(rank, world, chunk_size=1, image_keep_ratio=0.5,
                                    text_keep_ratio=0.5, gather_dtype=None)
                loss = loss_fn(img, txt, data["mask"][rows], scale)
            else:
                loss = ClipLoss(rank, world)(img[:, 0], txt[:, 0], scale)
            loss.backward()
            # Each rank's loss is the mean over its rows; the gathers' backward sums every rank's
            # gradient into the local features, and DDP divides by the world size: do the same.
            # The scale is a shared parameter, so DDP all-reduces its gradient first.
            img.grad /= world
            txt.grad /= world
            dist.all_reduce(scale.grad)
            scale.grad /= world
            losses = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(losses, loss.detach().reshape(1))
            results[f"{kind}_{rank}"] = (torch.stack(losses).mean().item(), img.grad, txt.grad,
                                         scale.grad.clone())
        # The production path: token selection and a 16-bit gather; it must run and stay finite.
        img = data["img"][rows].clone().requires_grad_()
        txt = data["txt"][rows].clone().requires_grad_()
        loss = FilipLoss(rank, world, token_keep_ratio=0.5)(img, txt, data["mask"][rows],
                                                            data["scale"])
        loss.backward()
        results[f"selected_{rank}"] = (loss.item(), bool(torch.isfinite(img.grad).all()),
                                       float(img.grad.abs().sum()), float(txt.grad.abs().sum()))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_combined_batch() -> None:
    import torch.multiprocessing as mp

    img, txt, mask = random_batch(6, 6, 5, 7, 8, seed=7)
    data = {"img": img.float(), "txt": txt.float(), "mask": mask, "scale": torch.tensor(12.0)}
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_two_rank_worker, args=(r, 2, port, data, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
        results = dict(results)
    for kind in KINDS:
        img1, txt1 = data["img"].clone().requires_grad_(), data["txt"].clone().requires_grad_()
        scale1 = data["scale"].clone().requires_grad_()
        if kind == "filip":
            loss = FilipLoss(chunk_size=4, gather_dtype=None, token_keep_ratio=1.0)(
                img1, txt1, data["mask"], scale1)
        elif kind == "filip_selected":
            loss = FilipLoss(chunk_size=4, gather_dtype=None, token_keep_ratio=0.5,
                             select_group_size=3)(img1, txt1, data["mask"], scale1)
        else:
            loss = ClipLoss()(img1[:, 0], txt1[:, 0], scale1)
        loss.backward()
        for rank in range(2):
            got_loss, g_img, g_txt, g_scale = results[f"{kind}_{rank}"]
            rows = slice(rank * 3, rank * 3 + 3)
            assert got_loss == pytest.approx(loss.item(), abs=1e-5)
            torch.testing.assert_close(g_img, img1.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g_txt, txt1.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g_scale, scale1.grad, rtol=1e-4, atol=1e-6)
    # Selection really was on: it changes the loss.
    assert abs(results["filip_selected_0"][0] - results["filip_0"][0]) > 1e-3
    for rank in range(2):
        loss_value, finite, img_grad, txt_grad = results[f"selected_{rank}"]
        assert 0 < loss_value < 10 and finite and img_grad > 0 and txt_grad > 0
