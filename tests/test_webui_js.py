"""The tab's JavaScript, run in Node with the few WebUI helpers it calls stood in."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "javascript" / "copier_lora.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")


def run_js(program: str) -> str:
    """`program` run after the tab's script, with the WebUI's helpers it calls stood in; what it printed."""
    stubs = """
        const clicked = [];
        const element = id => ({id, style: {}, click: () => clicked.push(id), dispatchEvent: () => {}});
        globalThis.gradioApp = () => ({getElementById: element, querySelector: () => box, querySelectorAll: () => []});
        globalThis.updateInput = () => {};
        globalThis.switch_to_txt2img = () => {};
        globalThis.randomId = () => "task(1)";
        let progressDone = null;
        globalThis.requestProgress = (id, gallery, preview, done) => { progressDone = done; };
    """
    script = SCRIPT.read_text(encoding="utf-8")
    done = subprocess.run(["node", "-e", f"{stubs}\n{script}\n{program}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_interrupt_sends_the_pages_run_and_never_presses_txt2imgs_interrupt():
    """txt2img's Interrupt, pressed for a run that goes, left txt2img's Generate covered by its "Interrupting..."
    button, and Forge said the training would "stop after finishing this image"."""
    said = run_js("""
        const box = {value: ""};
        const before = copierLoraInterrupt();
        copierLoraStart("", "an image");
        const during = copierLoraInterrupt();
        progressDone();
        const after = copierLoraInterrupt();
        process.stdout.write(JSON.stringify([before, during, after, clicked]));
    """)
    assert json.loads(said) == [[""], ["task(1)"], [""], []]


def sent(txt2img_prompt: str, text: str) -> str:
    """txt2img's prompt after "Send to txt2img" sent `text` (what `txt2img_prompt` made) to a page where it held
    `txt2img_prompt`."""
    return run_js(f"""
        const box = {{value: {json.dumps(txt2img_prompt)}}};
        copierLoraSend({json.dumps(text)});
        process.stdout.write(box.value);
    """)


def test_send_with_a_prompt_replaces_txt2imgs_prompt_and_the_tag_alone_joins_it():
    """Sent without a prompt, the tag replaced whatever prompt txt2img held: a Lora card's click adds to it."""
    assert sent("a dog, night", "a cat <lora:ink:1>") == "a cat <lora:ink:1>"
    assert sent("a dog, night ", "<lora:ink:1>") == "a dog, night <lora:ink:1>"
    assert sent("", "<lora:ink:1>") == "<lora:ink:1>"
    # the same LoRA at another weight: its tag in place, another LoRA's (or one whose name it begins) kept
    assert sent("a dog <lora:ink:0.4>, <lora:inky:1>", "<lora:ink:1>") == "a dog <lora:ink:1>, <lora:inky:1>"
    assert sent("a dog <lora:ink:1>", "<lora:ink:1>") == "a dog <lora:ink:1>"
