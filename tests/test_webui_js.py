"""The tab's JavaScript, run in Node with the few WebUI helpers it calls stood in."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "javascript" / "copier_lora.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")


def sent(txt2img_prompt: str, text: str) -> str:
    """txt2img's prompt after "Send to txt2img" sent `text` (what `txt2img_prompt` made) to a page where it held
    `txt2img_prompt`."""
    program = f"""
        const box = {{value: {json.dumps(txt2img_prompt)}}};
        globalThis.gradioApp = () => ({{querySelector: () => box}});
        globalThis.updateInput = () => {{}};
        globalThis.switch_to_txt2img = () => {{}};
        {SCRIPT.read_text(encoding="utf-8")}
        copierLoraSend({json.dumps(text)});
        process.stdout.write(box.value);
    """
    return subprocess.run(["node", "-e", program], capture_output=True, text=True, check=True).stdout


def test_send_with_a_prompt_replaces_txt2imgs_prompt_and_the_tag_alone_joins_it():
    """Sent without a prompt, the tag replaced whatever prompt txt2img held: a Lora card's click adds to it."""
    assert sent("a dog, night", "a cat <lora:ink:1>") == "a cat <lora:ink:1>"
    assert sent("a dog, night ", "<lora:ink:1>") == "a dog, night <lora:ink:1>"
    assert sent("", "<lora:ink:1>") == "<lora:ink:1>"
    # the same LoRA at another weight: its tag in place, another LoRA's (or one whose name it begins) kept
    assert sent("a dog <lora:ink:0.4>, <lora:inky:1>", "<lora:ink:1>") == "a dog <lora:ink:1>, <lora:inky:1>"
    assert sent("a dog <lora:ink:1>", "<lora:ink:1>") == "a dog <lora:ink:1>"
