"""Text towers and SD embedders against their references: transformers' CLIPTextModel, open_clip's CLIP, ldm's SD2
embedder (run for real) and sgm's SDXL embedder (its steps re-done on open_clip's modules, sgm is not installable).

Tiny models share the reference's random weights (every parameter perturbed, so biases and norms are not trivial);
full-size models are compared by parameter names and shapes on the meta device.
"""

import pytest
import torch

from lib_copier.models.clip_text import CLIPTextConfig, CLIPTextModel
from lib_copier.models.openclip_text import OpenCLIPTextConfig, OpenCLIPTextModel
from lib_copier.models.text_encoders import CLIPEmbedder, OpenCLIPEmbedder, emphasize
from lib_copier.models.tokenizer import END_ID, OPENCLIP_PAD_ID, PromptTokenizer

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a photo of a cat", "masterpiece, best quality, a red fox in the snow, (looking at viewer:1.2)"]
TINY_CLIP = CLIPTextConfig(width=64, layers=3, heads=4)
TINY_OPENCLIP = OpenCLIPTextConfig(width=64, layers=3, heads=4, output_dim=48)
TOLERANCE = 1e-4


def first_chunks(pad_id: int) -> torch.Tensor:
    return PromptTokenizer(pad_id).batch(PROMPTS)[0][:, 0]


def perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_clip(config: CLIPTextConfig):
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_attention_heads=config.heads,
        num_hidden_layers=config.layers,
        max_position_embeddings=config.max_positions,
        hidden_act=config.activation,
    )
    return perturb_(transformers.CLIPTextModel(hf_config), seed=1)


def reference_open_clip(config: OpenCLIPTextConfig, keep_visual: bool = False):
    """open_clip's CLIP without its image tower, which is how ldm and sgm hold it (they delete it themselves)."""
    torch.manual_seed(0)
    text_cfg = dict(width=config.width, heads=config.heads, layers=config.layers, vocab_size=config.vocab_size)
    vision_cfg = dict(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    model = open_clip.model.CLIP(embed_dim=config.output_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    visual = model.visual
    del model.visual
    perturb_(model, seed=2)
    if keep_visual:
        model.visual = visual
    return model


def with_text_model(key: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; checkpoints (and transformers 4) have it."""
    return key if key.startswith("text_model.") else "text_model." + key


# --- CLIP (Hugging Face layout) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_pair():
    reference = hf_clip(TINY_CLIP)
    ours = CLIPTextModel(TINY_CLIP).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@torch.no_grad()
def test_clip_matches_transformers(clip_pair):
    reference, ours = clip_pair
    ids = first_chunks(END_ID)
    expected = reference(input_ids=ids, output_hidden_states=True)
    got = ours(ids)
    assert len(got.hidden_states) == len(expected.hidden_states) == TINY_CLIP.layers + 1
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) < TOLERANCE
    assert max_diff(got.penultimate, expected.hidden_states[-2]) < TOLERANCE
    assert max_diff(got.pooled, expected.pooler_output) < TOLERANCE


@pytest.mark.parametrize("torch_2_1", [False, True])
def test_clip_loads_sd1_checkpoint_layout(clip_pair, monkeypatch, torch_2_1):
    """SD1 files hold `text_model.…` keys and the `position_ids` buffer transformers 4 saved. torch before 2.5 (2.1 in
    A1111 1.10) names the hook that accepts them only privately."""
    if torch_2_1:
        monkeypatch.delattr(torch.nn.Module, "register_load_state_dict_pre_hook", raising=False)
    reference, _ = clip_pair
    stored = {with_text_model(k): v for k, v in reference.state_dict().items()}
    stored["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    CLIPTextModel(TINY_CLIP).load_state_dict(stored, strict=True)


@torch.no_grad()
def test_clip_embedder_layers(clip_pair):
    reference, ours = clip_pair
    ids = first_chunks(END_ID)
    hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states
    sd1, sdxl, clip_skip = CLIPEmbedder(TINY_CLIP), CLIPEmbedder(TINY_CLIP, "penultimate"), None
    clip_skip = CLIPEmbedder(TINY_CLIP, "penultimate", final_norm=True)
    for embedder in (sd1, sdxl, clip_skip):
        embedder.transformer.load_state_dict(ours.state_dict())
    final_norm = getattr(reference, "text_model", reference).final_layer_norm  # transformers 4 nests it
    assert max_diff(sd1.encode_ids(ids)[0], final_norm(hidden[-1])) < TOLERANCE
    assert max_diff(sdxl.encode_ids(ids)[0], hidden[-2]) < TOLERANCE  # sgm: hidden_states[11] of 12, raw
    assert max_diff(clip_skip.encode_ids(ids)[0], final_norm(hidden[-2])) < TOLERANCE  # A1111 clip skip 2
    assert sd1.encode_ids(ids)[1] is None


# --- OpenCLIP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_pair():
    reference = reference_open_clip(TINY_OPENCLIP)
    ours = OpenCLIPTextModel(TINY_OPENCLIP).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def open_clip_hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each resblock's output, run by open_clip's own modules (batch first, as open_clip 3 runs them)."""
    x = model.token_embedding(ids) + model.positional_embedding
    states = [x]
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=model.attn_mask)
        states.append(x)
    return states


@torch.no_grad()
def test_openclip_matches_open_clip(openclip_pair):
    reference, ours = openclip_pair
    ids = first_chunks(OPENCLIP_PAD_ID)
    got = ours(ids)
    states = open_clip_hidden_states(reference, ids)
    assert max_diff(got.penultimate, states[-2]) < TOLERANCE
    assert max_diff(got.last_hidden_state, reference.ln_final(states[-1])) < TOLERANCE
    assert max_diff(got.pooled, reference.encode_text(ids)) < TOLERANCE  # open_clip's own pooling and projection


@torch.no_grad()
def test_sdxl_openclip_embedder_follows_sgm(openclip_pair):
    """sgm's FrozenOpenCLIPEmbedder2 (legacy=False): raw penultimate state; pooled = ln_final(last)[EOS] @ proj."""
    reference, ours = openclip_pair
    ids = first_chunks(OPENCLIP_PAD_ID)
    states = open_clip_hidden_states(reference, ids)
    last = reference.ln_final(states[-1])
    pooled = last[torch.arange(len(ids)), ids.argmax(dim=-1)] @ reference.text_projection
    embedder = OpenCLIPEmbedder(TINY_OPENCLIP, "penultimate", final_norm=False)
    embedder.model.load_state_dict(ours.state_dict())
    context, got_pooled = embedder.encode_ids(ids)
    assert max_diff(context, states[-2]) < TOLERANCE and max_diff(got_pooled, pooled) < TOLERANCE


@pytest.mark.parametrize("layer", ["penultimate", "last"])
@torch.no_grad()
def test_sd2_embedder_matches_ldm(monkeypatch, layer):
    """ldm's own FrozenOpenCLIPEmbedder, given a tiny open_clip model in place of the downloaded ViT-H."""
    ldm_modules = pytest.importorskip("ldm.modules.encoders.modules")
    reference = reference_open_clip(TINY_OPENCLIP, keep_visual=True)
    # ldm was written for open_clip 2, whose attention ran sequence-first; it permutes to that layout itself.
    for block in reference.transformer.resblocks:
        block.attn.batch_first = False
    monkeypatch.setattr(ldm_modules.open_clip, "create_model_and_transforms", lambda *a, **k: (reference, None, None))
    ldm_embedder = ldm_modules.FrozenOpenCLIPEmbedder(device="cpu", layer=layer)

    ours = OpenCLIPEmbedder(TINY_OPENCLIP, layer)
    ours.load_state_dict(ldm_embedder.state_dict(), strict=True)  # both hold the tower under `model.`
    ids = first_chunks(OPENCLIP_PAD_ID)
    assert max_diff(ours.encode_ids(ids)[0], ldm_embedder.encode_with_transformer(ids)) < TOLERANCE


# --- SD-level encode: chunks, batches, emphasis, dtype ------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_bigg_tiny(openclip_pair):
    embedder = OpenCLIPEmbedder(TINY_OPENCLIP, final_norm=False)
    embedder.model.load_state_dict(openclip_pair[1].state_dict())
    return embedder.eval()


@torch.no_grad()
def test_encode_joins_chunks_and_pads_batches(sdxl_bigg_tiny):
    embedder = sdxl_bigg_tiny
    long_prompt = " ".join(["cat"] * 100)
    context, pooled = embedder.encode(["a dog", long_prompt])
    assert context.shape == (2, 2 * 77, 64) and pooled.shape == (2, 48)
    ids, _ = embedder.tokenizer.batch(["a dog", long_prompt])
    chunk_context, chunk_pooled = embedder.encode_ids(ids.reshape(4, 77))
    assert max_diff(context[1, 77:], chunk_context[3]) < 1e-6  # second chunk of the long prompt
    empty_chunk = torch.tensor([embedder.tokenizer.empty_chunk().ids])
    assert max_diff(context[0, 77:], embedder.encode_ids(empty_chunk)[0][0]) < 1e-5  # padding chunk
    assert max_diff(pooled, chunk_pooled[[0, 2]]) < 1e-6  # pooled from each prompt's first chunk


def test_emphasis_scales_tokens_and_restores_the_mean():
    context = torch.rand(2, 77, 8) + 0.5
    ones = torch.ones(2, 77)
    assert emphasize(context, ones) is context
    weights = ones.clone()
    weights[0, 3] = 1.5
    got = emphasize(context, weights)
    assert torch.allclose(got.mean(dim=(1, 2)), context.mean(dim=(1, 2)))
    ratio = got[0] / context[0]
    assert torch.allclose(ratio[3], ratio[0] * 1.5) and torch.allclose(ratio[0], ratio[10])
    assert torch.equal(got[1], context[1])  # the other prompt is untouched


def test_emphasis_leaves_a_zero_mean_chunk_unscaled():
    """An untrained encoder's final layer norm gives every token mean 0; A1111's rescale would divide 0 by 0."""
    context = torch.nn.functional.layer_norm(torch.randn(1, 77, 16), (16,))
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.3
    got = emphasize(context, weights)
    assert torch.isfinite(got).all() and torch.allclose(got, context * weights[..., None])


@torch.no_grad()
def test_emphasis_changes_context_but_not_pooled(sdxl_bigg_tiny):
    plain, plain_pooled = sdxl_bigg_tiny.encode(["a red cat"])
    weighted, weighted_pooled = sdxl_bigg_tiny.encode(["a (red:1.5) cat"])
    assert max_diff(plain, weighted) > 1e-3
    assert torch.equal(plain_pooled, weighted_pooled)  # A1111 pools before emphasis


@torch.no_grad()
def test_encode_follows_the_weights_dtype():
    embedder = CLIPEmbedder(CLIPTextConfig(width=32, layers=1, heads=2)).to(torch.float64)
    context, pooled = embedder.encode(["(a cat)"])
    assert context.dtype == torch.float64 and context.shape == (1, 77, 32) and pooled is None


def test_bad_layer_is_named():
    with pytest.raises(ValueError, match="layer 'first'"):
        CLIPEmbedder(TINY_CLIP, layer="first")


# --- full-size layouts on the meta device ------------------------------------------------------------------------


def shapes(module: torch.nn.Module, rename=lambda k: k) -> dict[str, tuple[int, ...]]:
    return {rename(k): tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def test_clip_l_layout_matches_transformers():
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                hidden_act="quick_gelu",
            )
        )
        ours = CLIPEmbedder(CLIPTextConfig(), layer="penultimate")
    assert shapes(ours.transformer) == shapes(reference, with_text_model)
    assert all(k.startswith("transformer.text_model.") for k in ours.state_dict())


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("ViT-H-14", OpenCLIPTextConfig()),  # SD2
        ("ViT-bigG-14", OpenCLIPTextConfig(width=1280, layers=32, heads=20, output_dim=1280)),  # SDXL
    ],
)
def test_openclip_layout_matches_open_clip(arch, config):
    with torch.device("meta"):
        reference = open_clip.model.CLIP(**open_clip.get_model_config(arch))
        del reference.visual
        ours = OpenCLIPEmbedder(config)
    assert shapes(ours.model) == shapes(reference)
    assert all(k.startswith("model.") for k in ours.state_dict())
    # LoRA code meets the same module types in both, fused attention included.
    for name in ("attn", "attn.out_proj", "mlp.c_fc"):
        ours_module = ours.model.transformer.resblocks[0].get_submodule(name)
        assert type(ours_module) is type(reference.transformer.resblocks[0].get_submodule(name))
