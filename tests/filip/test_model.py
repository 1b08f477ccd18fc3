"""The dual encoder's shapes, normalisation and late-interaction masks."""
from __future__ import annotations

import math

import pytest
import torch

from filip.model import FilipModel, ModelConfig


def tiny_text(batch: int = 3, length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([6, 2, 10])[:batch]
    ids = torch.randint(4, 1000, (batch, length))
    mask = torch.arange(length)[None] < lengths[:, None]
    ids[~mask] = 0
    return ids, mask


@pytest.fixture(scope="module")
def model() -> FilipModel:
    torch.manual_seed(0)
    return FilipModel(ModelConfig.preset("tiny")).eval()


def test_features_shapes_and_unit_norm(model: FilipModel) -> None:
    ids, mask = tiny_text()
    out = model(torch.randn(3, 3, 64, 64), ids, mask)
    assert out["image_tokens"].shape == (3, 16, 256)  # 4 x 4 patches, class token excluded
    assert out["image_pooled"].shape == (3, 256)
    assert out["text_tokens"].shape == (3, 77, 256)
    for key in ("image_tokens", "image_pooled", "text_tokens", "text_pooled"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(out[key].shape[:-1]))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.grid_size == (4, 4)


def test_text_mask_excludes_padding_and_special_tokens(model: FilipModel) -> None:
    ids, mask = tiny_text()
    text = model.encode_text(ids, mask)
    # [start, 4 words, end] -> the 4 words; [start, end] (empty caption) -> keeps its end token.
    assert text.mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert text.mask[1].nonzero().flatten().tolist() == [1]
    torch.testing.assert_close(text.pooled[0], text.tokens[0, 5])
    with_special = FilipModel(ModelConfig.preset("tiny", count_special_tokens=True)).eval()
    assert torch.equal(with_special.encode_text(ids, mask).mask, mask)


def test_padding_does_not_change_real_tokens(model: FilipModel) -> None:
    ids, mask = tiny_text()
    other = ids.clone()
    other[~mask] = 7  # different padding ids
    a, b = model.encode_text(ids, mask), model.encode_text(other, mask)
    torch.testing.assert_close(a.tokens[mask], b.tokens[mask])


def test_logit_scale_output_is_not_clamped_so_its_gradient_lives_past_100() -> None:
    # The trainer clamps the parameter instead (tests/filip/test_trainer.py); a clamp here would
    # give a zero gradient above ln 100 and freeze the temperature.
    m = FilipModel(ModelConfig.preset("tiny"))
    with torch.no_grad():
        m.logit_scale.fill_(math.log(100) + 1)
    ids, mask = tiny_text()
    scale = m(torch.randn(3, 3, 64, 64), ids, mask)["logit_scale"]
    assert scale.item() == pytest.approx(100 * math.e, rel=1e-5)
    scale.backward()
    assert m.logit_scale.grad.item() == pytest.approx(100 * math.e, rel=1e-5)  # d exp(x)/dx, not 0


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(1)
    images, (ids, mask) = torch.randn(3, 3, 64, 64), tiny_text()
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        m = FilipModel(ModelConfig.preset("tiny", grad_checkpointing=flag)).train()
        out = m(images, ids, mask)
        (out["image_tokens"].sum() + out["text_pooled"].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_presets_and_weight_decay_exemptions() -> None:
    base = ModelConfig.preset("base")
    assert (base.patch_size, base.text_layers, base.text_width, base.text_heads, base.context_length,
            base.embed_dim) == (32, 12, 512, 8, 77, 256)
    large = ModelConfig.preset("large")
    assert (large.patch_size, large.text_width, large.text_layers) == (14, 768, 12)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    names = FilipModel(ModelConfig.preset("tiny")).no_weight_decay_names()
    assert {"logit_scale", "visual.cls_token", "visual.pos_embed", "text.token_embedding.weight",
            "text.positional_embedding", "text.ln_final.weight"} <= names
    assert "visual.patch_embed.proj.weight" not in names and "image_projection.weight" not in names
