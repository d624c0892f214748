"""The real Forge host adapter (lib_copier/webui/forge_host.py) over the Forge-shaped stand-in, with Forge's
`modules.shared` and `backend.memory_management` stood in: which host is picked, and what is refused before any
weight is touched."""

import sys
import threading
import types

import pytest
import torch

from lib_copier.errors import CopierError, Interrupted
from lib_copier.models.configs import TINY
from lib_copier.models.sd_model import build_model
from lib_copier.webui.forge_host import ForgeHost
from lib_copier.webui.host import A1111Host, current_host
from lib_copier.webui.ldm_patched_host import ClassicHost, ReForgeHost
from tests.conftest import randomize_
from tests.forge_like import ForgeModel


def _process(monkeypatch, design: str):
    """A Forge (Forge Classic, reForge) process as far as the adapter can tell: its shared model and memory
    manager."""
    sd_model = ForgeModel(randomize_(build_model(TINY)), design)
    shared = types.SimpleNamespace(sd_model=sd_model, cmd_opts=types.SimpleNamespace())
    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessing = type("P", (), {"cached_c": [1, 2, 3], "cached_uc": [1, 2, 3]})
    processing.StableDiffusionProcessingTxt2Img = type("T", (processing.StableDiffusionProcessing,), {})
    sd_models = types.ModuleType("modules.sd_models")
    modules = types.ModuleType("modules")
    modules.shared, modules.processing, modules.sd_models = shared, processing, sd_models
    memory = types.ModuleType("memory_management")
    memory.vram_state = types.SimpleNamespace(name="NORMAL_VRAM")
    memory.ALWAYS_VRAM_OFFLOAD = False
    faked = {"modules": modules, "modules.shared": shared, "modules.processing": processing,
             "modules.sd_models": sd_models}  # fmt: skip
    memory.calls = []
    if design == "reforge":  # ComfyUI's newer memory manager: loads asked to be whole, no unload_model_clones
        memory.load_model_gpu = lambda patcher: pytest.fail("reForge loads are asked to be whole")

        def load_models_gpu(patchers, memory_required=0, force_patch_weights=False, force_full_load=False):
            memory.calls.append(force_full_load)
            for patcher in patchers:
                patcher.load()

        memory.load_models_gpu = load_models_gpu
    if design == "classic":
        memory.current_loaded_models = sd_model.memory.current_loaded_models
        memory.load_model_gpu = sd_model.memory.load_model_gpu
        memory.unload_model_clones = sd_model.memory.unload_model_clones
    if design in ("classic", "reforge"):
        attention = types.ModuleType("ldm_patched.ldm.modules.attention")
        attention.attention_pytorch = lambda q, k, v, heads, mask=None: None
        attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        ldm_patched = types.ModuleType("ldm_patched")
        ldm_patched.modules = types.ModuleType("ldm_patched.modules")
        ldm_patched.modules.model_management = memory
        ldm_patched.ldm = types.ModuleType("ldm_patched.ldm")
        ldm_patched.ldm.modules = types.ModuleType("ldm_patched.ldm.modules")
        ldm_patched.ldm.modules.attention = attention
        faked |= {"ldm_patched": ldm_patched, "ldm_patched.modules": ldm_patched.modules,
                  "ldm_patched.modules.model_management": memory, "ldm_patched.ldm": ldm_patched.ldm,
                  "ldm_patched.ldm.modules": ldm_patched.ldm.modules,
                  "ldm_patched.ldm.modules.attention": attention}  # fmt: skip
    else:
        sd_models.forge_model_reload = lambda: (shared.sd_model, False)  # the picked checkpoint is the loaded one
        memory.load_model_gpu = lambda patcher: patcher.load()
        memory.load_models_gpu = lambda patchers, memory_required=0: None
        backend = types.ModuleType("backend")
        backend.memory_management = memory
        faked |= {"backend": backend, "backend.memory_management": memory}
    for name, module in faked.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(
        shared=shared, memory=memory, model=sd_model, processing=processing, sd_models=sd_models
    )


@pytest.fixture
def forge(monkeypatch):
    return _process(monkeypatch, "forge")


@pytest.fixture
def classic(monkeypatch):
    return _process(monkeypatch, "classic")


def test_forge_is_told_by_what_it_exposes(forge, monkeypatch):
    assert type(current_host()) is ForgeHost
    forge.shared.sd_model = object()  # Forge with no checkpoint loaded: still Forge, and one sentence
    with pytest.raises(CopierError, match="pick a checkpoint"):
        current_host()
    monkeypatch.delitem(sys.modules, "backend.memory_management")
    forge.shared.sd_model = types.SimpleNamespace()  # an A1111 model
    assert type(current_host()) is A1111Host


def test_a_checkpoint_picked_in_forge_during_a_run_is_a_model_change_before_forge_loads_it(forge):
    """Forge only notes a pick (checkpoint, VAE, text encoder) and loads it at its next generation: the run's own
    grids would have been drawn with it."""
    parameters = {"checkpoint_info": "random-sd15", "additional_modules": []}
    forge.sd_models.model_data = types.SimpleNamespace(forge_loading_parameters=parameters, forge_hash=str(parameters))
    host = current_host()
    assert not host.model_changed()
    forge.sd_models.model_data.forge_loading_parameters = {**parameters, "checkpoint_info": "other"}
    assert host.model_changed()


@pytest.mark.parametrize("design", ["a1111", "classic", "reforge", "forge"])
def test_a_checkpoint_picked_during_a_run_is_a_model_change_before_the_webui_loads_it(monkeypatch, design):
    """The dropdown sets the checkpoint setting at once; A1111 (and the ldm_patched Forges) load it at the next
    txt2img, the run's own grid, into the same model object where the architecture is the same."""
    process = _process(monkeypatch, "forge" if design == "a1111" else design)
    if design == "a1111":
        monkeypatch.delitem(sys.modules, "backend.memory_management")
        process.shared.sd_model = types.SimpleNamespace()
    process.shared.opts = types.SimpleNamespace(sd_model_checkpoint="random-sd15.safetensors [abc]")
    host = current_host()
    assert not host.model_changed()
    process.shared.opts.sd_model_checkpoint = "other.safetensors [def]"
    assert host.model_changed()


def test_forge_classic_is_told_by_its_memory_manager(classic, monkeypatch):
    assert type(current_host()) is ClassicHost
    classic.shared.sd_model = None
    with pytest.raises(CopierError, match="no model loaded; pick a checkpoint"):
        current_host()


def test_reforge_is_told_by_its_newer_memory_manager_and_loads_whole_models(monkeypatch):
    process = _process(monkeypatch, "reforge")
    host = current_host()
    assert type(host) is ReForgeHost
    process.memory.ALWAYS_VRAM_OFFLOAD = True  # reForge only prints that it is set
    with host.prepared():
        host.backend().encode_images(torch.zeros(1, 3, 64, 64))
    assert process.memory.calls == [True]
    process.memory.vram_state = types.SimpleNamespace(name="NO_VRAM")
    with pytest.raises(CopierError, match="--always-no-vram"), host.prepared():
        pytest.fail("the job must not start")


def test_forge_classic_trains_through_pytorch_attention_where_it_chose_sageattention(classic):
    """SageAttention has no backward pass: with it, gradients would stop at every attention of the UNet."""
    attention = sys.modules["ldm_patched.ldm.modules.attention"]

    def attention_sage(q, k, v, heads, mask=None):
        return None

    attention.optimized_attention = attention.optimized_attention_masked = attention_sage
    backend = current_host().backend()
    with backend.training_mode(text_encoders=False, gradient_checkpointing=False):
        assert attention.optimized_attention is attention.optimized_attention_masked is attention.attention_pytorch
    assert attention.optimized_attention is attention.optimized_attention_masked is attention_sage


def test_the_checkpoint_picked_in_forge_is_loaded_before_the_job(forge):
    """Forge loads the dropdown's checkpoint only at the next generation: just after startup its model is a
    placeholder, and after a pick it is still the one picked before."""
    placeholder, picked = object(), forge.model
    forge.shared.sd_model = placeholder

    def reload():
        forge.shared.sd_model = picked
        return picked, True

    forge.sd_models.forge_model_reload = reload
    assert ForgeHost().sd_model is picked

    def nothing_to_load():
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")

    forge.sd_models.forge_model_reload = nothing_to_load
    with pytest.raises(CopierError, match=r"Forge could not load a checkpoint \(You do not have any model!"):
        ForgeHost()


def test_the_estimate_and_the_api_load_forges_pick_only_while_nothing_else_runs(forge, monkeypatch):
    """The tab's estimate and POST /train read the model's kind. Forge loads a pick when its host is made, which
    unloads the model: that must not happen under a training or txt2img holding the WebUI's queue lock."""
    from lib_copier.webui.extension import model_kind

    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()  # A1111's and Forge's FIFOLock take acquire(blocking=False) too
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    for name, module in (("call_queue", call_queue), ("devices", devices)):
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
        setattr(sys.modules["modules"], name, module)
    placeholder, picked = object(), forge.model
    forge.shared.sd_model = placeholder  # just after startup: Forge loads the pick at its first generation
    reloads = []

    def reload():
        reloads.append(call_queue.queue_lock.locked())
        forge.shared.sd_model = picked
        return picked, True

    forge.sd_models.forge_model_reload = reload
    running = threading.Event()
    done = threading.Event()

    def a_run():  # holds the queue as a job or txt2img does
        with call_queue.queue_lock:
            running.set()
            done.wait(10)

    thread = threading.Thread(target=a_run)
    thread.start()
    running.wait(10)
    try:
        assert model_kind() is None  # no model yet, and none loaded under the run
        assert reloads == []
        forge.shared.sd_model = picked
        assert model_kind() == ("cpu", False, 512)  # the model loaded, read as it is
        assert reloads == []
    finally:
        done.set()
        thread.join()
    forge.shared.sd_model = placeholder
    assert model_kind() == ("cpu", False, 512)  # nothing runs: the pick is loaded, under the lock
    assert reloads == [True] and not call_queue.queue_lock.locked()


SWAPS = [("LOW_VRAM", False), ("NO_VRAM", False), ("NORMAL_VRAM", True)]  # reForge ignores the offload flag


@pytest.mark.parametrize(
    "design, state, offload",
    [(d, *swap) for d in ("forge", "classic", "reforge") for swap in SWAPS[: 2 + (d != "reforge")]],
)
def test_swap_modes_are_refused_before_any_weight_is_touched(monkeypatch, design, state, offload):
    process = _process(monkeypatch, design)
    process.memory.vram_state = types.SimpleNamespace(name=state)
    process.memory.ALWAYS_VRAM_OFFLOAD = offload
    params = dict(process.model.forge_objects_original.unet.model.named_parameters())
    host = current_host()
    with pytest.raises(CopierError, match="--always-low-vram"), host.prepared():
        pytest.fail("the job must not start")
    after = dict(process.model.forge_objects_original.unet.model.named_parameters())
    assert all(after[n] is p and p.is_inference() == (design == "forge") for n, p in params.items())


@pytest.mark.parametrize(
    "state, flags, said",
    [("LOW_VRAM", {"lowvram": True, "novram": False}, "(--lowvram); restart Forge without it"),  # Forge Neo's name
     ("NO_VRAM", {"always_no_vram": True, "always_low_vram": False}, "(--always-no-vram); restart Forge without it"),
     ("NORMAL_VRAM", {"always_offload_from_vram": True}, "(--always-offload-from-vram); restart Forge without it"),
     ("LOW_VRAM", {}, "(--always-low-vram / --always-no-vram / --always-offload-from-vram); restart Forge without "
                      "them")],  # no flag set: the memory manager chose it itself
)  # fmt: skip
def test_the_refusal_names_the_flag_to_take_away(monkeypatch, state, flags, said):
    process = _process(monkeypatch, "forge")
    process.memory.vram_state = types.SimpleNamespace(name=state)
    process.memory.ALWAYS_VRAM_OFFLOAD = flags.get("always_offload_from_vram", False)
    process.memory.args = types.SimpleNamespace(**flags)
    with pytest.raises(CopierError) as refused, ForgeHost().prepared():
        pytest.fail("the job must not start")
    assert str(refused.value).endswith(f"CPU memory {said}")


def test_a_full_load_is_asked_for_where_the_memory_manager_offers_it(forge):
    calls = []
    forge.memory.load_models_gpu = lambda patchers, memory_required=0, force_full_load=False: calls.append(
        force_full_load
    )
    host = ForgeHost()
    with host.prepared():
        host.backend().encode_images(torch.zeros(1, 3, 64, 64))
    assert calls == [True]
    assert forge.processing.StableDiffusionProcessing.cached_c == [None, None, None]  # Forge's three-entry cache


def test_forge_classic_trains_on_the_weights_without_the_loras_its_last_generation_left_in(classic):
    """Forge Classic bakes a prompt's LoRAs into the weights through a clone of the UNet's patcher, and they stay
    there until its memory manager loads another clone of the same model."""
    unet = classic.model.forge_objects_original.unet
    before = {n: p.detach().clone() for n, p in unet.model.named_parameters()}
    name = next(n for n in before if n.endswith("proj_in.weight"))
    with_lora = unet.clone()
    with_lora.lora_patches[("lora.safetensors", 1.0)] = {name: torch.ones_like(before[name])}
    classic.memory.load_model_gpu(with_lora)  # a generation with <lora:lora:1>
    assert not torch.equal(unet.model.get_parameter(name), before[name])
    host = current_host()
    with host.prepared():
        assert torch.equal(unet.model.get_parameter(name), before[name])
        host.backend().encode_images(torch.zeros(1, 3, 64, 64))
    after = dict(unet.model.named_parameters())
    assert [n for n, p in before.items() if not torch.equal(after[n], p)] == []
    assert classic.processing.StableDiffusionProcessing.cached_c == [None, None, None]


def test_forge_classic_streaming_part_of_the_model_is_refused_in_one_sentence(classic):
    load = classic.memory.load_model_gpu

    def short_of_memory(patcher):  # what its memory manager does when the whole model does not fit
        load(patcher)
        classic.memory.current_loaded_models[0].model_accelerated = True

    classic.memory.load_model_gpu = short_of_memory
    host = current_host()
    with pytest.raises(CopierError, match="too little free memory to hold the whole model"), host.prepared():
        host.backend().encode_images(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("design", ["forge", "classic", "reforge"])
def test_the_interrupt_button_stops_a_run_whether_it_asks_to_stop_now_or_after_the_current_image(monkeypatch, design):
    """The WebUIs' Interrupt button, pressed while a run counts its training steps as jobs (more than one), only
    asks to stop "after the current image" by default: seen live in Forge, the training went on to its end."""
    process = _process(monkeypatch, design)
    process.shared.state = types.SimpleNamespace(interrupted=False, stopping_generation=False, job_count=40)
    host = current_host()
    assert not host.interrupted()

    def interrupt_button(opts_interrupt_after_current=True):  # what the WebUIs' interrupt_function does
        state = process.shared.state
        if not state.stopping_generation and state.job_count > 1 and opts_interrupt_after_current:
            state.stopping_generation = True
        else:
            state.interrupted = True

    interrupt_button()
    assert host.interrupted()
    process.shared.state = types.SimpleNamespace(interrupted=False, stopping_generation=False, job_count=40)
    interrupt_button(opts_interrupt_after_current=False)
    assert host.interrupted()
    del process.shared.state.stopping_generation  # a WebUI from before the flag
    assert host.interrupted()


@pytest.mark.parametrize("design", ["forge", "classic", "reforge"])
def test_the_grids_are_drawn_with_the_webuis_automatic_schedule_and_no_autocorrection(monkeypatch, design):
    """The WebUIs log 'Sampler Scheduler autocorrection' for every image whose processing leaves the schedule
    unset: twenty console warnings per strength grid."""
    from PIL import Image

    from lib_copier.models.generate import Txt2Img

    process = _process(monkeypatch, design)
    process.shared.state = types.SimpleNamespace(job_count=0, job_no=0, textinfo="", interrupted=False)
    drawn = []

    class Txt2ImgProcessing(process.processing.StableDiffusionProcessing):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs, scheduler=None)  # the WebUIs' dataclass default

        def close(self):
            pass

    def process_images(p):
        drawn.append((p.sampler_name, p.scheduler))
        return types.SimpleNamespace(images=[Image.new("RGB", (64, 64))])

    process.processing.StableDiffusionProcessingTxt2Img = Txt2ImgProcessing
    process.processing.process_images = process_images
    scripts = types.ModuleType("modules.scripts")
    scripts.ScriptRunner = lambda: types.SimpleNamespace(alwayson_scripts=[])
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    sys.modules["modules"].scripts = scripts
    current_host().txt2img(Txt2Img("a cat", seed=1, width=64, height=64))
    assert drawn == [("Euler", "Automatic")]
    # A request without a side asks for the model's native one (an API original on SDXL), not 512.
    sizes = []
    process.processing.process_images = lambda p: sizes.append((p.width, p.height)) or process_images(p)
    host = current_host()
    host.backend = lambda: types.SimpleNamespace(resolution=1024)
    host.txt2img(Txt2Img("a cat", seed=1))
    host.txt2img(Txt2Img("a cat", seed=1, width=768))
    assert sizes == [(1024, 1024), (768, 1024)]
    # Interrupted at a step, the WebUI's sampler returns its latent as it is: a half-drawn image is not the image.
    process.shared.state.interrupted = True
    with pytest.raises(Interrupted, match="^interrupted while the image was drawn$"):
        current_host().txt2img(Txt2Img("a cat", seed=1, width=64, height=64))
    process.shared.state.interrupted = False
    # No image: the WebUI's Interrupt came before the sampler's first step (a job ended "failed" on it), or not.
    process.processing.process_images = lambda p: types.SimpleNamespace(images=[])
    process.shared.state.interrupted = True
    with pytest.raises(Interrupted, match="^interrupted before the image was drawn$"):
        current_host().txt2img(Txt2Img("a cat", seed=1, width=64, height=64))
    process.shared.state.interrupted = False
    with pytest.raises(CopierError, match="^the WebUI's txt2img returned no image$"):
        current_host().txt2img(Txt2Img("a cat", seed=1, width=64, height=64))


@pytest.mark.parametrize("design", ["forge", "classic", "reforge"])
def test_the_host_reads_the_noise_schedule_setting_every_webui_has(monkeypatch, design):
    process = _process(monkeypatch, design)
    process.shared.opts = types.SimpleNamespace(sd_noise_schedule="Default")
    assert not current_host().zero_terminal_snr()
    process.shared.opts.sd_noise_schedule = "Zero Terminal SNR"
    assert current_host().zero_terminal_snr()
    del process.shared.opts.sd_noise_schedule  # a WebUI from before the setting
    assert not current_host().zero_terminal_snr()
