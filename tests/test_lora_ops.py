"""LoRA math: exact and SVD merges, kohya's resize rules, extraction, applying to a state dict."""

import pytest
import torch

from lib_copier.errors import CopierError
from lib_copier.lora.naming import Target
from lib_copier.lora.ops import apply_to_state_dict, cancels, dynamic_rank, extract, merge_exact, merge_svd, resize
from lib_copier.lora.weights import KOHYA_CLAMP, LoRAWeights


def random_lora(seed, shapes, rank=4, alpha=2.0):
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for key, shape in shapes.items():
        down = torch.randn(rank, *shape[1:], generator=gen)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen)
        modules[key] = LoRAWeights(down, up, alpha)
    return modules


SHAPES = {"lora_unet_a": (32, 24), "lora_unet_conv": (16, 8, 3, 3), "lora_te_b": (24, 24)}


def dense(pairs):
    total = {}
    for modules, ratio in pairs:
        for key, m in modules.items():
            total[key] = total.get(key, 0) + ratio * m.delta()
    return total


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_merge_equals_the_sum_of_deltas():
    pairs = [(random_lora(0, SHAPES), 1.0), (random_lora(1, SHAPES, rank=2, alpha=1), -0.7)]
    merged = merge_exact(pairs)
    expected = dense(pairs)
    for key, module in merged.items():
        assert module.rank == 6 and module.scale == 1.0
        assert relative(module.delta(), expected[key]) < 1e-6


def test_svd_merge_at_full_rank_reproduces_the_sum():
    pairs = [(random_lora(0, SHAPES), 1.0), (random_lora(1, SHAPES), -1.0)]
    merged = merge_svd(pairs, rank=8, clamp_quantile=KOHYA_CLAMP)  # nothing is truncated, so nothing is clamped
    expected = dense(pairs)
    for key, module in merged.items():
        assert module.alpha == module.rank == 8
        assert module.delta().shape == expected[key].shape
        assert relative(module.delta(), expected[key]) < 1e-4


# The largest module shapes of SD1, SD2 and SDXL: feed-forward out (the one a dense float32 SVD got 0.35 wrong) and in,
# SDXL's cross-attention from the 2048-wide context, SD2's 1024-wide one, a 3x3 conv of the deepest blocks.
LARGE_SHAPES = {
    "lora_unet_ff_net_2": (1280, 5120),
    "lora_unet_ff_net_0_proj": (10240, 1280),
    "lora_unet_attn2_to_k_xl": (1280, 2048),
    "lora_unet_attn2_to_k_sd2": (1280, 1024),
    "lora_unet_resnets_conv": (1280, 1280, 3, 3),
}


@pytest.mark.parametrize("rank", [12, 16])
def test_svd_merge_is_exact_on_the_large_modules_when_the_rank_holds_the_sum(rank):
    pairs = [(random_lora(0, LARGE_SHAPES, rank=4, alpha=4), 1.0), (random_lora(1, LARGE_SHAPES, rank=8, alpha=8), 1.0)]
    merged = merge_svd(pairs, rank=rank, conv_rank=rank, clamp_quantile=KOHYA_CLAMP)  # it must not touch this
    for key, expected in dense(pairs).items():
        assert merged[key].rank == 12  # the summed rank: asked for more, zero directions would only fill the file
        assert relative(merged[key].delta(), expected) < 1e-4, key


def test_svd_merge_truncation_is_the_best_low_rank_approximation():
    pairs = [(random_lora(0, SHAPES), 1.0), (random_lora(1, SHAPES), 1.0)]
    merged = merge_svd(pairs, rank=3, conv_rank=2, clamp_quantile=1.0)
    expected = dense(pairs)
    for key, module in merged.items():
        matrix = expected[key].flatten(1)
        s = torch.linalg.svdvals(matrix)
        keep = 2 if key == "lora_unet_conv" else 3
        assert module.rank == keep
        optimal = float(s[keep:].pow(2).sum().sqrt())
        assert float((module.delta().flatten(1) - matrix).norm()) == pytest.approx(optimal, rel=1e-4)


def test_resize_to_full_rank_is_lossless_and_keeps_alpha_over_rank():
    modules = random_lora(3, SHAPES, rank=6, alpha=3.0)
    resized, report = resize(modules, rank=6)
    for key, module in resized.items():
        assert module.rank == 6 and module.scale == pytest.approx(0.5)
        assert relative(module.delta(), modules[key].delta()) < 1e-5
    assert all(row.fro_retained == pytest.approx(1.0) for row in report)


def test_resize_of_a_rank_past_a_side_of_the_layer_keeps_the_delta_in_factors_that_fit():
    """A rank-10 LoRA on 6x20 and 20x6 layers asked for rank 8: it has only 6 directions there, so it becomes rank 6
    exactly, with alpha/rank kept (a wide layer's file had a 6x6 up with an 8-row down; a tall one crashed)."""
    modules = random_lora(4, {"lora_unet_wide": (6, 20), "lora_unet_tall": (20, 6)}, rank=10, alpha=5.0)
    resized, report = resize(modules, rank=8)
    for key, module in resized.items():
        assert module.up.shape[1] == module.down.shape[0] == module.rank == 6 and module.scale == pytest.approx(0.5)
        assert relative(module.delta(), modules[key].delta()) < 1e-5
    assert [row.new_rank for row in report] == [6, 6]


def spectrum_lora(values, out_dim=40, in_dim=30, alpha=None):
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(out_dim, len(values), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_dim, len(values), generator=gen))
    s = torch.tensor(values)
    return LoRAWeights(v.T.contiguous(), (u * s).contiguous(), alpha or float(len(values)))


VALUES = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize(
    ("method", "value", "expected"),
    [
        ("sv_ratio", 3.0, 3),  # 2 values above 8/3, plus kohya's one
        ("sv_ratio", 10.0, 5),  # 4 above 0.8, plus one
        ("sv_fro", 0.9, 3),  # first cumulative square fraction >= 0.81 is at index 1: (1 + 1) + 1
        ("sv_cumulative", 0.9, 5),  # first cumulative fraction >= 0.9 at index 3: (3 + 1) + 1
    ],
)
def test_dynamic_resize_follows_kohyas_rule(method, value, expected):
    lora = {"lora_unet_x": spectrum_lora(VALUES)}
    assert dynamic_rank(torch.tensor(VALUES), method, value) == expected
    resized, report = resize(lora, rank=8, dynamic=method, dynamic_value=value)
    module = resized["lora_unet_x"]
    assert module.rank == expected and module.scale == pytest.approx(1.0)
    kept = (sum(v * v for v in VALUES[:expected]) / sum(v * v for v in VALUES)) ** 0.5
    assert report[0].fro_retained == pytest.approx(kept, rel=1e-5)
    assert resize(lora, rank=2, dynamic=method, dynamic_value=value)[0]["lora_unet_x"].rank == 2  # the maximum


def test_bad_ranks_are_refused():
    with pytest.raises(CopierError, match="positive"):
        merge_svd([(random_lora(0, SHAPES), 1.0)], rank=0)
    with pytest.raises(CopierError, match="needs both a method and its parameter"):
        resize(random_lora(0, SHAPES), rank=4, dynamic="sv_fro")


def test_apply_to_state_dict_touches_only_its_rows():
    q = Target("lora_te_text_model_encoder_layers_0_self_attn_k_proj", "te.attn", "in_proj_weight", 1, (8, 8))
    state = {"te.attn.in_proj_weight": torch.randn(24, 8, dtype=torch.float16)}
    original = state["te.attn.in_proj_weight"].clone()
    lora = random_lora(2, {q.key: (8, 8)}, rank=2, alpha=1.0)
    apply_to_state_dict(state, [(lora, 0.5)], {q.key: q})
    changed = state["te.attn.in_proj_weight"]
    assert changed.dtype == torch.float16
    assert torch.equal(changed[:8], original[:8]) and torch.equal(changed[16:], original[16:])
    expected = (original[8:16].float() + 0.5 * lora[q.key].delta()).half()
    assert torch.equal(changed[8:16], expected)
    with pytest.raises(CopierError, match="matches no layer"):
        apply_to_state_dict(state, [(random_lora(0, {"lora_unet_zzz": (8, 8)}), 1.0)], {q.key: q})


def test_extract_recovers_a_low_rank_difference_and_drops_unchanged_text():
    targets = [
        Target("lora_unet_a", "unet.a", "weight", None, (32, 24)),
        Target("lora_te_b", "te.b", "weight", None, (24, 24)),
    ]
    gen = torch.Generator().manual_seed(0)
    original = {"unet.a.weight": torch.randn(32, 24, generator=gen), "te.b.weight": torch.randn(24, 24, generator=gen)}
    delta = random_lora(4, {"lora_unet_a": (32, 24)}, rank=3, alpha=3.0)["lora_unet_a"].delta()
    tuned = {"unet.a.weight": original["unet.a.weight"] + delta, "te.b.weight": original["te.b.weight"] + 0.001}
    modules, text, _ = extract(original.__getitem__, tuned.__getitem__, targets, rank=4)
    assert not text and set(modules) == {"lora_unet_a"}
    assert relative(modules["lora_unet_a"].delta(), delta) < 1e-4
    tuned["te.b.weight"] = original["te.b.weight"] + 0.1
    modules, text, _ = extract(original.__getitem__, tuned.__getitem__, targets, rank=4)
    assert text and set(modules) == {"lora_unet_a", "lora_te_b"}


@pytest.mark.parametrize("which", ["original", "tuned"])
def test_extracting_from_a_checkpoint_holding_nan_names_it_in_one_sentence(which):
    """An SVD of a NaN difference failed with torch's own LinAlgError."""
    targets = [Target("lora_unet_a", "unet.a", "weight", None, (8, 6))]
    weights = {"original": {"unet.a.weight": torch.zeros(8, 6)}, "tuned": {"unet.a.weight": torch.ones(8, 6)}}
    weights[which]["unet.a.weight"][3, 2] = float("nan")
    with pytest.raises(CopierError, match=f"the {which} checkpoint's unet.a.weight holds NaN or infinite values"):
        extract(weights["original"].__getitem__, weights["tuned"].__getitem__, targets, rank=2)


def test_randomized_extraction_of_a_large_module_comes_within_a_hair_of_the_optimum():
    # A fine-tune's difference: a few strong directions over a slowly falling tail, at SD's largest linear shape.
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(1280, 64, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(5120, 64, generator=gen))[0]
    spectrum = torch.cat([torch.tensor([8.0, 6.0, 5.0, 4.0]), 1.0 / torch.arange(1, 61).float() ** 0.5])
    delta = (u * spectrum) @ v.T
    target = Target("lora_unet_ff", "unet.ff", "weight", None, (1280, 5120))
    original = {"unet.ff.weight": torch.zeros(1280, 5120)}
    tuned = {"unet.ff.weight": delta}
    optimum = float(spectrum[8:].norm() / spectrum.norm())
    for randomized in (True, False):
        modules, _, kept = extract(original.get, tuned.get, [target], 8, clamp_quantile=1.0, randomized=randomized)
        error = relative(modules["lora_unet_ff"].delta(), delta)
        assert error < optimum * 1.01, randomized
        assert abs(kept["lora_unet_ff"] ** 2 + error**2 - 1) < 1e-3  # kept is what the error leaves


def test_a_merge_that_cancels_is_told_from_one_that_changes_something():
    a, b = random_lora(0, SHAPES), random_lora(1, SHAPES)
    for module in a.values():
        assert module.norm() == pytest.approx(float(module.delta().double().norm()), rel=1e-6)
    assert cancels([(a, 0.5), (a, -0.5)]) and cancels([(a, 0.0)])
    assert not cancels([(a, 1.0), (a, -1.0), (b, 1.0)])
    assert not cancels([(a, 1.0), (a, -1.0 + 1e-4)])  # a ten-thousandth of a is still a change
