"""In headless Chromium against the live WebUI: txt2img, then the gallery's Copier LoRA button, which opens the
tab, shows the progress bar, and ends with the strength grids. Screenshots go to COPIER_SCREENSHOTS (or a temp dir).

Needs playwright (`pip install -e ".[integration]"`) and a Chromium: COPIER_CHROMIUM, else /usr/bin/chromium.
"""

import os
import re
from pathlib import Path

import pytest

from tests.integration.conftest import SD15, URL, call

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("COPIER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]  # fmt: skip


@pytest.fixture
def page(webui, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    # txt2img draws with the saved checkpoint setting, which an earlier test may have left on another model.
    call("/sdapi/v1/options", {"sd_model_checkpoint": SD15})
    if webui.kind in ("forge", "neo"):  # Forge's "UI defaults" for the "sd" preset replace the ui-config's txt2img size
        call("/sdapi/v1/options", {"forge_preset": "sd", "sd_t2i_width": 64, "sd_t2i_height": 64})
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(URL)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
        yield page
        browser.close()


def test_gallery_button_trains_and_shows_the_grids(page, tmp_path):
    shots = Path(os.environ.get("COPIER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.fill("#txt2img_prompt textarea", "a red apple")
    page.click("#txt2img_generate")
    # Done when the infotext is shown (the gallery already shows live previews while it runs).
    page.wait_for_function(
        "() => (document.querySelector('#html_info_txt2img') || {}).innerText?.includes('Steps:')", timeout=300_000
    )
    page.wait_for_selector("#tab_txt2img .progressDiv", state="detached", timeout=60_000)
    page.screenshot(path=shots / "1-txt2img.png")
    assert "Size: 64x64" in page.inner_text("#html_info_txt2img")

    page.click("#copier_lora_from_txt2img")
    page.wait_for_selector("#tab_copier_lora .progressDiv", timeout=120_000)
    page.screenshot(path=shots / "2-training.png")
    assert page.input_value("#copier_lora_size input") == "64"  # the small settings from ui-config are in place
    # The progress bar is drawn where the user looks: in the status's place, under Train, not at the top of the tab.
    where = ("#tab_copier_lora .progressDiv", "#copier_lora_interrupt")
    bar, buttons = (page.locator(selector).first.bounding_box() for selector in where)
    assert buttons["y"] < bar["y"] < buttons["y"] + 200, (bar, buttons)
    assert not page.is_visible("#copier_lora_train")  # hidden while its run goes, as txt2img's Generate is
    assert not page.is_visible("#copier_lora_status")  # and so is the last run's sentence

    page.wait_for_selector("#copier_lora_results img", timeout=900_000)
    page.wait_for_selector("#copier_lora_train", state="visible", timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=shots / "3-results.png", full_page=True)
    status = page.inner_text("#copier_lora_status")
    assert "safetensors" in status and "-addift" in status  # the default method

    assert "training steps in all" in page.inner_text("#copier_lora_estimate")  # said before Train was pressed
    # Effects by their labels, each described; only the ticked effects' parameters are shown.
    effects = page.inner_text("#copier_lora_effects")
    assert "Grayscale" in effects and "Sharpen / detail" in effects and "jpeg_noise" not in effects
    thickness = page.get_by_label("Outline: thickness").first
    assert not thickness.is_visible()
    page.locator("#copier_lora_effects label", has_text="Outline").click()
    thickness.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=shots / "3b-effects.png")
    page.locator("#copier_lora_effects label", has_text="Outline").click()
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < 3000, f"the tab is {height} px tall"

    # The copier method with the Fast preset: Advanced shows four timesteps a step, and the estimate counts them.
    for radio, choice in (("method", "copier"), ("preset", "fast")):
        page.locator(f"#copier_lora_{radio} label").filter(has_text=re.compile(rf"^\s*{choice}\s*$")).click()
    page.wait_for_function("() => document.querySelector('#copier_lora_batch_size input').value === '4'")
    page.wait_for_function(
        "() => document.querySelector('#copier_lora_estimate').innerText.includes('250 training steps in all')"
    )
    page.screenshot(path=shots / "3c-fast-preset.png", full_page=True)
    assert page.input_value("#copier_lora_steps input") == "125" and "roughly" in page.inner_text(
        "#copier_lora_estimate"
    )

    # Send to txt2img: the prompt with the new LoRA, on the txt2img tab.
    page.click("#copier_lora_send_txt2img")
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value.includes('<lora:')", timeout=60_000
    )
    page.screenshot(path=shots / "4-sent-to-txt2img.png", full_page=True)
    sent = re.search(r"<lora:([^:>]+):1>", page.input_value("#txt2img_prompt textarea"))
    assert sent and sent[1].startswith("a-red-apple-grayscale") and f"{sent[1]}.safetensors" in status
    assert "grayscale-grayscale" not in status  # the default name does not repeat the effect
