"""The Markdown report and results.json of one evaluation, with its pictures under images/."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lib_copier.atomic import all_or_nothing, atomic_write
from lib_copier.evaluate.figures import effect_charts, originals_figure, strength_figure
from lib_copier.evaluate.measure import Measured
from lib_copier.evaluate.train import METHODS

QUANTITIES = {
    "transfer": ("effect transfer", "{:+.2f}"),
    "leak": ("content leakage (dB)", "{:+.2f}"),
    "leak_psnr": ("Δ PSNR to O (dB)", "{:+.2f}"),
    "leak_layout": ("Δ layout to O", "{:+.3f}"),
    "kept_layout": ("structure kept (layout)", "{:.3f}"),
    "kept_psnr": ("structure kept (PSNR dB)", "{:.1f}"),
    "closeness": ("closeness to effect(G0)", "{:+.2f}"),
}
SUMMARY_COLUMNS = ("transfer", "leak", "leak_psnr", "leak_layout", "kept_layout", "kept_psnr")
TABLE_ROWS = ("transfer", "closeness", "leak", "kept_layout")
# Transfer is in units of the effect's own change; a step may dip by this much and the curve still count as rising
# (at negative weights many effects have nothing to undo: a LoRA cannot take away outlines an image does not have).
MONOTONE_SLACK = 0.02
LEAK_MARGIN = 1.0  # dB: a leak difference the headline calls clear
KEPT_SHARE = 0.75  # an effect LoRA that keeps less of the layout than this share of the effect's own has broken it
VARIANT_TEXT = {"single": "LoRAs of one original (O1)", "merged": "LoRAs merged over all originals"}


@dataclass
class Layout:
    """Where one report's files go: `<out>/report.md`, `results.json`, `images/`; with a name,
    `<out>/<name>.md`, `<name>.json` and `images/<name>/` (to sit beside other documents, as in docs/)."""

    out: Path
    name: str | None = None

    @property
    def markdown(self) -> Path:
        return self.out / f"{self.name or 'report'}.md"

    @property
    def json(self) -> Path:
        return self.out / (f"{self.name}.json" if self.name else "results.json")

    @property
    def images(self) -> Path:
        return self.out / "images" / self.name if self.name else self.out / "images"

    def picture(self, stem: str) -> Path:
        return self.images / f"{stem}.png"

    def existing(self, labels: Sequence[str] = ()) -> list[Path]:
        """The report's files already there, the pictures of effects labelled `labels` included."""
        stems = ["originals", *(f"{label}-{kind}" for label in labels for kind in ("grid", "charts"))]
        return [p for p in (self.markdown, self.json, *map(self.picture, stems)) if p.exists()]


def write_report(
    layout: Layout,
    results: dict,
    measured: Measured,
    originals: list[Image.Image],
    processed: dict[str, list[Image.Image]],
    notes: str = "",
    overwrite: bool = False,
) -> list[Path]:
    weights = results["weights"]
    side = results["settings"]["thumbnail"]
    pictures = {"originals": originals_figure(originals, processed, max(48, side // 2))}
    for label, effect in results["effects"].items():
        targets, variants = measured.targets[label], list(effect["variants"])
        pictures[f"{label}-grid"] = strength_figure(measured.grids, variants, label, targets, weights, side)
        pictures[f"{label}-charts"] = effect_charts(effect, weights)
    link = layout.images.relative_to(layout.out).as_posix()
    text = markdown(results, link, layout.json.name, notes)
    writes = [(layout.picture(stem), lambda p, i=picture: _png(i, p)) for stem, picture in pictures.items()]
    writes += [
        (layout.json, lambda p: p.write_text(json.dumps(results), "utf-8")),
        (layout.markdown, lambda p: p.write_text(text, "utf-8")),
    ]
    with all_or_nothing() as written:  # no half a report
        for path, write in writes:
            written.append(atomic_write(path, write, overwrite))
    return written


def _png(image: Image.Image, path: Path) -> None:
    # A 64-colour palette keeps the pictures small enough to commit; these flat scenes look the same in it.
    image.quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, "PNG", optimize=True)


def markdown(results: dict, images: str, json_name: str, notes: str = "") -> str:
    s, t = results["settings"], results["timing"]
    lines = [
        "# The methods, measured: naive, copier, extraction, slider and ADDifT-style",
        "",
        f"Produced by `{s['command']}` on the {s['model']} model in {t['total_s'] / 60:.1f} minutes "
        f"({t['machine']}). Raw numbers: [`{json_name}`]({json_name}).",
        "",
        *_settings(results),
        "",
        "## Result",
        "",
        *headline(results),
        "",
        *winners(results),
    ]
    if notes.strip():
        lines += ["", notes.strip()]
    lines += ["", *_definitions(results), "", *_fidelity(results), "", *_summary_tables(results)]
    lines += ["", "## Originals and their processed images", "", f"![originals]({images}/originals.png)"]
    for label, effect in results["effects"].items():
        lines += ["", f"## {label}", ""]
        kept = np.array(effect["reference"]["kept_layout"], dtype=float).mean(axis=0)
        metric = f"Metric: **{effect['metric']}** ({effect['metric_description']}). " if effect["metric"] else ""
        lines += [f"{metric}The effect itself, applied to G₀, keeps a layout correlation of {_pm(kept)}.", ""]
        variants = "; ".join(f"{v}: {VARIANT_TEXT[v]}" for v in effect["variants"])
        lines += [f"Strength grids ({variants}; held-out prompts, seed {results['seeds'][0]}):", ""]
        lines += [f"![{label} strength grids]({images}/{label}-grid.png)", ""]
        lines += [f"![{label} charts]({images}/{label}-charts.png)", ""]
        for variant, methods in effect["variants"].items():
            lines += [f"{VARIANT_TEXT[variant]}, mean ± sd over seeds:", "", *_weight_table(methods, results), ""]
    return "\n".join(lines).rstrip() + "\n"


def _settings(results: dict) -> list[str]:
    s, t = results["settings"], results["timing"]
    return [
        f"- Originals: {len(results['originals'])} generated images ({'; '.join(results['originals'])}), seed 1.",
        f"- Effects: {', '.join(results['effects'])}.",
        f"- Training, per LoRA of the copier methods (naive, copier, extraction): {s['steps']} steps at lr "
        f"{s['lr']:g}, rank {s['rank']}, {s['prompt_pool']} pool prompts + the empty caption; extraction SVD rank "
        f"{s['extraction_rank']}.",
        *[f"- {m}: {_pair_settings(c)}, the same prompts." for m, c in s.get("pair_train_configs", {}).items()],
        f"- {t['trainings']} training runs in {t['train_s'] / 60:.1f} min. Training time per LoRA, mean over "
        f"originals and effects (what a user waits for one effect; A is counted in full for copier and "
        f"extraction): {', '.join(f'{m} {v:.1f} s' for m, v in t.get('train_s_by_method', {}).items())}.",
        f"- Measured on {len(results['prompts'])} held-out prompts × {len(results['seeds'])} seeds, "
        f"weights {', '.join(f'{w:+g}' for w in results['weights'])}, {s['sample_steps']} Euler steps: "
        f"{t['images']} images in {t['measure_s'] / 60:.1f} min.",
    ]


def _pair_settings(config: dict) -> str:
    band = f"timesteps {config['timestep_min']}–{config['timestep_max']}"
    snr = f", Min-SNR γ {config['min_snr_gamma']:g}" if config["min_snr_gamma"] else ""
    return (
        f"{config['steps']} steps at lr {config['lr']:g}, rank {config['rank']}, alpha {config['alpha']:g}, "
        f"{band}{snr}, trained at weight ±{config['pair_weight']:g}"
    )


def winners(results: dict) -> list[str]:
    """Per variant and effect, the method that carries the most of the effect at +1 among those that neither leak
    (under LEAK_MARGIN dB) nor break the image (structure kept at least KEPT_SHARE of what the effect itself
    keeps), and why: its transfer (or closeness), leakage, structure kept and training time."""
    at = _weight_index(results["weights"], 1.0)
    seconds = results["timing"].get("train_s_by_method", {})
    lines = [
        f"**Winner per effect**: the most of the effect at +1 among the methods that leak under {LEAK_MARGIN:g} dB "
        f"and keep at least {KEPT_SHARE:g} of the structure the effect itself keeps:",
        "",
    ]
    for variant in _variants(results):
        cells = []
        for label, effect in results["effects"].items():
            methods = effect["variants"][variant]
            floor = KEPT_SHARE * float(np.mean(effect["reference"]["kept_layout"]))
            fair = [
                m
                for m in METHODS
                if _mean(methods[m], "leak", at) < LEAK_MARGIN and _mean(methods[m], "kept_layout", at) >= floor
            ]
            if not fair:
                cells.append(f"{label}: none (every method leaks or breaks the image)")
                continue
            best, *others = sorted(fair, key=lambda m: -_key(methods[m])[at])
            name = _key_name(methods[best])
            why = (
                f"{name} {_key(methods[best])[at]:+.2f}"
                + (f" (next: {others[0]} {_key(methods[others[0]])[at]:+.2f})" if others else "")
                + f", leakage {_mean(methods[best], 'leak', at):+.2f} dB, kept "
                f"{_mean(methods[best], 'kept_layout', at):.2f}"
                + (f", {seconds[best]:.0f} s" if best in seconds else "")
            )
            left_out = [m for m in METHODS if m not in fair]
            cells.append(f"{label}: **{best}** — {why}" + (f"; left out: {', '.join(left_out)}" if left_out else ""))
        lines.append(f"- {VARIANT_TEXT[variant]}: " + "; ".join(cells) + ".")
    return lines


def headline(results: dict) -> list[str]:
    """The result in sentences, computed from the numbers (whichever way they come out)."""
    weights = results["weights"]
    at, top = _weight_index(weights, 1.0), len(weights) - 1
    fid = results["fidelity"]["summary"]
    lines = [
        f"- **Copier fidelity**: base + A draws its original at {fid['copier']['mean']:.1f} ± "
        f"{fid['copier']['sd']:.1f} dB PSNR under held-out prompts (the base model alone: "
        f"{fid['base']['mean']:.1f} ± {fid['base']['sd']:.1f} dB)."
    ]
    for variant in _variants(results):
        per = {m: [e["variants"][variant][m] for e in results["effects"].values()] for m in METHODS}

        def mean_of(quantity: str, index: int, per=per) -> dict[str, float]:
            return {m: float(np.mean([_mean(x, quantity, index) for x in items])) for m, items in per.items()}

        def three(values: dict[str, float], fmt: str) -> str:
            return ", ".join(f"{m} {fmt.format(values[m])}" for m in METHODS)

        leak, leak_top = mean_of("leak", at), mean_of("leak", top)
        gaps = [_mean(n, "leak", at) - _mean(c, "leak", at) for c, n in zip(per["copier"], per["naive"], strict=True)]
        transfer = {m: float(np.mean([_key(x)[at] for x in items])) for m, items in per.items()}
        mono = {m: sum(_monotone(_key(x)) for x in items) for m, items in per.items()}
        n = len(per["naive"])
        lines += [
            f"- **{VARIANT_TEXT[variant]}**: content leakage (dB of PSNR gained toward the originals beyond unrelated "
            f"control images), mean over effects, at +1: {three(leak, '{:+.2f}')}; "
            f"at +{weights[top]:g}: {three(leak_top, '{:+.2f}')}. "
            f"Copier leaks less than naive at +1 for {sum(g > 0 for g in gaps)} of {n} effects, "
            f"at least {LEAK_MARGIN:g} dB less for {sum(g >= LEAK_MARGIN for g in gaps)}. "
            f"Effect transfer at +1 (1 = as much as the effect itself): {three(transfer, '{:+.2f}')}. "
            f"Monotone in weight: {three(mono, '{}')} of {n} effects. "
            f"Structure kept at +1: {three(mean_of('kept_layout', at), '{:.2f}')}."
        ]
    return lines


def _definitions(results: dict) -> list[str]:
    return [
        "## How it was measured",
        "",
        "- **naive**: B trained on the processed image P against the base model alone (this is P's copier A′); "
        "**copier**: B trained on P against the base model with the original's copier A fused in (the method); "
        "**extraction**: A′ − A, SVD-merged, positive weight toward P; **slider** (Concept Sliders' image sliders): "
        "one LoRA trained on the pair (O, P) with the same noise and timestep for both, at +m denoising P and at −m "
        "denoising O, so what the two share cancels; **addift** (after TrainTrain's ADDifT): one LoRA whose "
        "prediction at +m on noised P must equal the base model's own prediction on O noised alike, and at −m the "
        "reverse, one direction per step. Neither pair method trains a copier. Each LoRA is applied alone to the "
        "base model.",
        "- G₀ is the base model's image of a held-out prompt and seed, G_w the same with the LoRA at weight w, "
        "effect(G₀) the effect applied to G₀ (what a perfect effect LoRA would draw at +1).",
        "- **effect transfer**: (metric(G_w) − metric(G₀)) ÷ (metric(effect(G₀)) − metric(G₀)), with the effect's "
        "own metric: 0 = no change, 1 = as much as the effect itself, negative = the opposite way.",
        "- **closeness**: 1 − |G_w − effect(G₀)| ÷ |G₀ − effect(G₀)| (mean absolute pixel difference), for any effect; "
        "harsh on effects that change few pixels (outline), where any other change counts many times over.",
        "- **content leakage** (dB): how much closer G_w has come to the originals the LoRA was trained from than G₀ "
        "was (mean PSNR to them), minus the same toward control images drawn like the originals but never trained "
        "on, so that a LoRA which only greys, blurs or darkens everything does not count as leaking. The tables also "
        "give the plain Δ PSNR to O and the Δ layout correlation to O (4x4-block luminance correlation: the same "
        "shapes in the same places).",
        "- **structure kept**: layout correlation of G_w to G₀ (each effect's section says how much the effect "
        "itself keeps; outline's dark lines lower it by design).",
        f"- **monotone**: the mean transfer (closeness where an effect has no metric) never falls by more than "
        f"{MONOTONE_SLACK:g} from one weight to the next, and ends higher at the highest weight than at the lowest.",
        "- Ratios are of means over prompts, per seed; ± is the standard deviation over seeds.",
    ]


def _fidelity(results: dict) -> list[str]:
    fid = results["fidelity"]
    raw = {k: np.array(v, dtype=float) for k, v in fid["raw"].items()}  # (originals, prompts, seeds)
    lines = ["## Copier fidelity", "", "PSNR (dB) to each original O under the held-out prompts and seeds:", ""]
    lines += ["| original | base model | base + A |", "|---|---|---|"]
    for i, caption in enumerate(results["originals"]):
        base, copier = raw["base"][i].mean(axis=0), raw["copier"][i].mean(axis=0)
        lines.append(f"| O{i + 1}: {caption} | {_pm(base)} | {_pm(copier)} |")
    lines += [
        "",
        "Does the copier method's B, on top of the copier A it was trained against, turn O1 into its processed "
        "image P1? PSNR (dB), mean ± sd over seeds:",
    ]
    lines += ["", "| effect | base + A1 → P1 | base + A1 + B1 → P1 | base + A1 + B1 → O1 |", "|---|---|---|---|"]
    for label, effect in results["effects"].items():
        cells = [_cell_stat(effect["on_copier"][k]) for k in ("a_to_p", "a_b_to_p", "a_b_to_o")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _cell_stat(stat: dict) -> str:
    return f"{stat['mean']:.1f} ± {stat['sd']:.1f}"


def _summary_tables(results: dict) -> list[str]:
    at = _weight_index(results["weights"], 1.0)
    lines = ["## Summary at weight +1", ""]
    for variant in _variants(results):
        lines += [f"{VARIANT_TEXT[variant]}:", ""]
        lines += ["| effect | method | " + " | ".join(QUANTITIES[q][0] for q in SUMMARY_COLUMNS) + " | monotone |"]
        lines += ["|---" * (len(SUMMARY_COLUMNS) + 3) + "|"]
        for label, effect in results["effects"].items():
            for method in METHODS:
                summary = effect["variants"][variant][method]["summary"]
                cells = [_cell(summary, q, at) for q in SUMMARY_COLUMNS]
                mono = "yes" if _monotone(summary[_key_name(effect["variants"][variant][method])]["mean"]) else "no"
                lines.append(f"| {label} | {method} | " + " | ".join(cells) + f" | {mono} |")
        lines += [""]
    return lines


def _weight_table(methods: dict, results: dict) -> list[str]:
    weights = results["weights"]
    lines = ["| measure | method | " + " | ".join(f"{w:+g}" if w else "0" for w in weights) + " |"]
    lines += ["|---|---|" + "---|" * len(weights)]
    for q in TABLE_ROWS:
        if q not in methods[METHODS[0]]["summary"]:
            continue
        for method in METHODS:
            cells = [_cell(methods[method]["summary"], q, i) for i in range(len(weights))]
            lines.append(f"| {QUANTITIES[q][0]} | {method} | " + " | ".join(cells) + " |")
    return lines


def _cell(summary: dict, quantity: str, index: int) -> str:
    if quantity not in summary:
        return "–"
    mean, sd = summary[quantity]["mean"][index], summary[quantity]["sd"][index]
    if mean is None:
        return "–"
    fmt = QUANTITIES[quantity][1]
    return f"{fmt.format(mean)} ± {fmt.format(sd).lstrip('+')}"


def _pm(values: np.ndarray) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {sd:.1f}"


def _variants(results: dict) -> list[str]:
    first = next(iter(results["effects"].values()))
    return list(first["variants"])


def _key_name(method: dict) -> str:
    return "transfer" if "transfer" in method["summary"] else "closeness"


def _mean(method: dict, quantity: str, index: int) -> float:
    value = method["summary"][quantity]["mean"][index]
    return float("nan") if value is None else value


def _key(method: dict) -> list[float]:
    return [float("nan") if v is None else v for v in method["summary"][_key_name(method)]["mean"]]


def _monotone(means: list[float | None]) -> bool:
    """Moves the effect's way as the weight rises: no step back by more than MONOTONE_SLACK, and clearly more at
    the highest weight than at the lowest. No measurable change (None, NaN) is not monotone."""
    if any(m is None or m != m for m in means):
        return False
    steps = zip(means, means[1:], strict=False)
    return all(b >= a - MONOTONE_SLACK for a, b in steps) and means[-1] > means[0] + MONOTONE_SLACK


def _weight_index(weights: list[float], weight: float) -> int:
    return weights.index(weight) if weight in weights else len(weights) - 1
