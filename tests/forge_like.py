"""A Forge-shaped stand-in over our own models, for testing the Forge backend without Forge.

It reproduces what broke training inside a real Forge (see lib_copier/backends/forge.py): parameters that are
inference tensors, a `Linear` that is not an `nn.Linear`, transformer blocks that add residuals in place, a
`KModel` whose `apply_model` works in sigma space, a VAE whose `encode` samples, conditioning made under inference
mode, and a LoRA loader that bakes LoRAs into new Parameter objects until its next refresh. Text encoders sit in a
`JointTextEncoder` as `clip_l` / `clip_g` in the Hugging Face layout (SDXL's bigG converted from our OpenCLIP one).
`design` gives Forge Neo's, Forge Classic's or reForge's variant of each point (see `ForgeModel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lib_copier.backends.forge import ForgeBackend, borrowed, forge_conditioning
from lib_copier.backends.forge_classic import ClassicBackend, ReForgeBackend
from lib_copier.lora.files import read_lora
from lib_copier.lora.naming import by_key, forge_to_ldm, lora_targets
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.clip_text import CLIPTextConfig, CLIPTextModel
from lib_copier.models.generate import generate
from lib_copier.models.sd_model import StableDiffusion
from lib_copier.models.text_encoders import PromptEmbedder, _pick
from lib_copier.models.tokenizer import OPENCLIP_PAD_ID, PromptTokenizer
from lib_copier.models.unet import BasicTransformerBlock
from tests.a1111_like import StandInUI

LORA_TAG = re.compile(r"<lora:([^:>]+):([-0-9.]+)>")


class HFOpenCLIP(PromptEmbedder):
    """An OpenCLIP text tower (SD2's ViT-H, SDXL's bigG) as Forge holds it: Hugging Face layout (separate q/k/v)
    plus the projection."""

    def __init__(self, openclip_embedder: nn.Module):
        super().__init__()
        source = openclip_embedder.model
        c = source.config
        config = CLIPTextConfig(c.vocab_size, c.width, c.layers, c.heads, c.max_positions, c.mlp_ratio, c.activation)
        self.transformer = CLIPTextModel(config)
        self.text_projection = nn.Parameter(source.text_projection.detach().clone())
        self.layer, self.final_norm = openclip_embedder.layer, openclip_embedder.final_norm
        self.tokenizer = PromptTokenizer(OPENCLIP_PAD_ID)
        text = self.transformer.text_model
        with torch.no_grad():
            text.embeddings.token_embedding.weight.copy_(source.token_embedding.weight)
            text.embeddings.position_embedding.weight.copy_(source.positional_embedding)
            text.final_layer_norm.load_state_dict(source.ln_final.state_dict())
            for ours, theirs in zip(text.encoder.layers, source.transformer.resblocks, strict=True):
                for i, proj in enumerate((ours.self_attn.q_proj, ours.self_attn.k_proj, ours.self_attn.v_proj)):
                    rows = slice(i * c.width, (i + 1) * c.width)
                    proj.weight.copy_(theirs.attn.in_proj_weight[rows])
                    proj.bias.copy_(theirs.attn.in_proj_bias[rows])
                ours.self_attn.out_proj.load_state_dict(theirs.attn.out_proj.state_dict())
                ours.layer_norm1.load_state_dict(theirs.ln_1.state_dict())
                ours.layer_norm2.load_state_dict(theirs.ln_2.state_dict())
                ours.mlp.fc1.load_state_dict(theirs.mlp.c_fc.state_dict())
                ours.mlp.fc2.load_state_dict(theirs.mlp.c_proj.state_dict())

    def encode_ids(self, ids):
        output = self.transformer(ids)
        context = _pick(output, self.layer, self.final_norm, self.transformer.text_model.final_layer_norm)
        return context, output.pooled @ self.text_projection


def hf_layout(model: StableDiffusion) -> StableDiffusion:
    """OpenCLIP towers moved to the Hugging Face layout, in place: the model Forge would load from the same file."""
    if hasattr(model, "conditioner"):
        model.conditioner.embedders[1] = HFOpenCLIP(model.conditioner.embedders[1]).requires_grad_(False)
    elif model.config.family == "sd2":
        model.cond_stage_model = HFOpenCLIP(model.cond_stage_model).requires_grad_(False)
    return model


class Linear(nn.Module):
    """Forge's `operations.Linear`: a Module with weight and bias, not an `nn.Linear`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class InPlaceBlock(BasicTransformerBlock):
    """Forge's `BasicTransformerBlock._forward`: residuals added in place into what the norms read."""

    def forward(self, x, context):
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x), context)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


def _forge_modules(root: nn.Module, linear: bool) -> None:
    for module in list(root.modules()):
        if type(module) is BasicTransformerBlock:
            module.__class__ = InPlaceBlock
        for name, child in list(module.named_children()):
            if linear and type(child) is nn.Linear:
                setattr(module, name, Linear(child))


class Predictor(nn.Module):
    """k-diffusion's discrete schedule in sigma space, as Forge's `Prediction`."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())
        self.prediction_type = {"eps": "epsilon", "v": "v_prediction"}[prediction]

    def timestep(self, sigma):
        return (self.sigmas[None] - sigma[:, None]).abs().argmin(dim=1)

    def calculate_denoised(self, sigma, out, x):
        s = sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return x - out * s
        return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()


class KModel(nn.Module):
    def __init__(self, unet: nn.Module, predictor: Predictor):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = predictor
        self.storage_dtype = self.computation_dtype = next(unet.parameters()).dtype

    def apply_model(self, x, sigma, c_crossattn=None, y=None):
        xc = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        extra = {} if y is None else {"y": y}
        out = self.diffusion_model(xc, self.predictor.timestep(sigma), context=c_crossattn, **extra)
        return self.predictor.calculate_denoised(sigma, out, x)


class LoraLoader:
    """Forge's `LoraLoader`: bakes patches into new Parameter objects, keeps the old ones until the next refresh."""

    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches: dict) -> None:
        """`lora_patches`: {(file, weight): {parameter name: delta}}, what each LoRA adds."""
        if str(list(lora_patches)) == self.loaded:
            return
        for name, param in self.backup.items():
            _set(self.model, name, param)
        self.backup = {}
        for patches in lora_patches.values():
            for name, delta in patches.items():
                weight = self.model.get_parameter(name)
                self.backup.setdefault(name, weight)
                _set(self.model, name, nn.Parameter(weight + delta.to(weight.dtype), requires_grad=False))
        self.loaded = str(list(lora_patches))


def _set(root: nn.Module, name: str, param: nn.Parameter) -> None:
    path, _, leaf = name.rpartition(".")
    root.get_submodule(path)._parameters[leaf] = param


@dataclasses.dataclass
class BasePatcher:
    model: nn.Module
    loader: LoraLoader  # shared by a patcher and its clones, like the model
    lora_patches: dict = dataclasses.field(default_factory=dict)
    load_device: torch.device = torch.device("cpu")

    def load(self):
        """What the memory manager does to a patcher it puts on its device: the weights get its LoRAs."""
        self.loader.refresh(self.lora_patches)

    def clone(self):
        return dataclasses.replace(self, lora_patches=dict(self.lora_patches))


class Patcher(BasePatcher):
    """Forge's `ModelPatcher`: `refresh_loras` bakes the LoRAs this patcher carries, and takes out any others."""

    def refresh_loras(self):
        self.load()


class NeoPatcher(BasePatcher):
    """Forge Neo's ComfyUI-style `ModelPatcher`: no `refresh_loras`; `unpatch_model` restores the shared backups."""

    def unpatch_model(self):
        self.loader.refresh({})


class ClassicPatcher(BasePatcher):
    """Forge Classic's ComfyUI `ModelPatcher`: `patch_model` bakes its LoRAs into new Parameter objects (under
    inference mode, as generation runs) and backs up the old ones in the clone itself; only that clone's
    `unpatch_model` restores them, and the memory manager calls it when it unloads the clone."""

    def __init__(self, model, memory, lora_patches=None):
        super().__init__(model, None, dict(lora_patches or {}))
        self.memory, self.backup = memory, {}

    def load(self):
        self.memory.load_model_gpu(self)

    def clone(self):
        return ClassicPatcher(self.model, self.memory, self.lora_patches)

    def is_clone(self, other):
        return other.model is self.model

    @torch.inference_mode()
    def patch_model(self):
        for patches in self.lora_patches.values():
            for name, delta in patches.items():
                weight = self.backup.setdefault(name, self.model.get_parameter(name))
                _set(self.model, name, nn.Parameter(weight + delta.to(weight.dtype), requires_grad=False))

    def unpatch_model(self):
        for name, param in self.backup.items():
            _set(self.model, name, param)
        self.backup = {}


class LoadedModel:
    def __init__(self, patcher):
        self.model, self.model_accelerated = patcher, False


class MemoryManager:
    """`ldm_patched.modules.model_management` as far as patchers go: a loaded clone keeps its LoRAs baked in until
    another clone of the same model is loaded."""

    def __init__(self):
        self.current_loaded_models: list[LoadedModel] = []

    def load_model_gpu(self, patcher):
        if any(m.model is patcher for m in self.current_loaded_models):
            return
        self.unload_model_clones(patcher)
        patcher.patch_model()
        self.current_loaded_models.insert(0, LoadedModel(patcher))

    def unload_model_clones(self, patcher):
        for loaded in [m for m in self.current_loaded_models if patcher.is_clone(m.model)]:
            self.current_loaded_models.remove(loaded)
            loaded.model.unpatch_model()


class ModelSamplingDiscrete(nn.Module):
    """ComfyUI's discrete schedule: sigmas, no alphas_cumprod."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())


class EPS:
    pass


class V_PREDICTION(EPS):  # noqa: N801 (ComfyUI's name, which the reForge backend reads)
    pass


def model_sampling(alphas_cumprod: torch.Tensor, prediction: str) -> ModelSamplingDiscrete:
    """`model_base.model_sampling`: a class made of the schedule and the parameterisation."""
    kind = type("ModelSampling", (ModelSamplingDiscrete, V_PREDICTION if prediction == "v" else EPS), {})
    return kind(alphas_cumprod)


class LatentFormat:
    def __init__(self, scale_factor: float):
        self.scale_factor = scale_factor

    def process_in(self, latent):
        return latent * self.scale_factor


class SD15(LatentFormat):
    pass


class SDXL(LatentFormat):
    pass


class BaseModel(nn.Module):
    """Forge Classic's (and reForge's) `model_base.BaseModel`: the UNet, its sampling, its latent format and compute
    dtype."""

    def __init__(self, unet: nn.Module, sampling: ModelSamplingDiscrete, latent_format: LatentFormat):
        super().__init__()
        self.diffusion_model, self.model_sampling = unet, sampling
        self.latent_format, self.manual_cast_dtype = latent_format, None

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype


class ReForgePatcher(NeoPatcher):
    """reForge's ComfyUI `ModelPatcher`: clones share the backups (as Neo's), and it tells how much of its model is
    on the device."""

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def loaded_size(self):
        return self.model_size()


@dataclasses.dataclass
class Clip:
    cond_stage_model: nn.Module
    patcher: Patcher


@dataclasses.dataclass
class VAE:
    first_stage_model: nn.Module
    patcher: Patcher


@dataclasses.dataclass
class ForgeObjects:
    unet: Patcher
    clip: Clip
    vae: VAE

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


class JointTextEncoder(nn.Module):
    """Forge's own `ModuleDict`: a plain Module with the encoders as children, no mapping interface."""

    def __init__(self, encoders: dict[str, nn.Module]):
        super().__init__()
        for name, module in encoders.items():
            self.add_module(name, module)


class SampledVAE(nn.Module):
    """The VAE Forge holds: LDM encoder/quant_conv, `process_in` (shift, then scale; Forge also shows the factors,
    Neo does not; Classic and reForge have neither), and an `encode` that samples."""

    def __init__(self, vae: nn.Module, scale: float, design: str):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        if design == "forge":
            self.scaling_factor, self.shift_factor = scale, 0.0
        if design in ("forge", "neo"):
            self.process_in = lambda latent: latent * scale
        self.ours = [vae]

    def encode(self, x):
        return self.ours[0].encode(x).sample(torch.Generator().manual_seed(0))


class ForgeModel:
    """`backend.diffusion_engine.sd15.StableDiffusion` / `sdxl.StableDiffusionXL`, over our model's modules.
    `design="neo"` gives Forge Neo's: ComfyUI-style patchers, a real `nn.Linear`, no VAE factors, no SD2 flag.
    `design="classic"` gives Forge Classic's: A1111's model object (its `parameterization` and `alphas_cumprod`,
    prompt encoding that autograd goes through) over Forge's objects, a `BaseModel` whose sampling has sigmas only,
    ComfyUI patchers whose clones keep LoRAs baked in while the memory manager (`memory`) holds them, and weights
    loaded under `no_grad` (ordinary tensors, not inference ones). `design="reforge"` gives reForge's: Classic's,
    with Neo's patchers (clones share the backups) that tell how much of their model is loaded."""

    def __init__(self, model: StableDiffusion, design: str = "forge"):
        self.ours, self.design = model, design
        self.first_stage_model = self.cond_stage_model = None  # as Forge has them
        _forge_modules(model, linear=design != "neo")
        embedders = model.text_embedders
        family = model.config.family
        single = "clip_l" if family == "sd1" else "clip_h"
        names = ["clip_l", "clip_g"] if len(embedders) == 2 else [single]
        clip = JointTextEncoder(dict(zip(names, embedders, strict=True)))
        alphas_cumprod, prediction, scale = (
            model.schedule.alphas_cumprod,
            model.config.prediction,
            model.config.scale_factor,
        )
        older = design in ("classic", "reforge")  # Forge's first design: A1111's model object over Forge's
        if older:
            self.parameterization, self.alphas_cumprod = prediction, alphas_cumprod.clone()
            if prediction == "v":
                self.alphas_cumprod_original = self.alphas_cumprod
            latents = (SDXL if family == "sdxl" else SD15)(scale)
            kmodel = BaseModel(model.unet, model_sampling(alphas_cumprod, prediction), latents)
        else:
            kmodel = KModel(model.unet, Predictor(alphas_cumprod, prediction))
        vae = SampledVAE(model.first_stage_model, scale, design)
        self.memory = MemoryManager()
        if design == "classic":
            patchers = [ClassicPatcher(module, self.memory) for module in (kmodel, clip, vae)]
        else:
            kind = {"forge": Patcher, "neo": NeoPatcher, "reforge": ReForgePatcher}[design]
            patchers = [kind(module, LoraLoader(module)) for module in (kmodel, clip, vae)]
        self.forge_objects = ForgeObjects(patchers[0], Clip(clip, patchers[1]), VAE(vae, patchers[2]))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1, self.is_sdxl = family == "sd1", family == "sdxl"
        if design != "neo":
            self.is_sd2 = family == "sd2"
        if older:  # its test for SD2 looks where A1111's prompt wrapper hides OpenCLIP: never true
            self.is_sd1, self.is_sd2 = family != "sdxl", False
            self.get_learned_conditioning = self._conditioning  # A1111's, not under inference mode
            return
        with torch.inference_mode():  # Forge loads its models under inference mode
            for module in (kmodel, clip, vae):
                for layer in module.modules():
                    for name, param in list(layer._parameters.items()):
                        if param is not None:
                            layer._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        return self._conditioning(prompts)

    def _conditioning(self, prompts):
        cond = self.ours.encode_prompts(list(prompts), prompts.height, prompts.width)
        return cond.context if cond.vector is None else {"crossattn": cond.context, "vector": cond.vector}


class Prompts(list):
    """A1111's `SdConditioning`: the prompts with the image size SDXL's conditioning reads."""

    def __init__(self, prompts, width, height):
        super().__init__(prompts)
        self.width, self.height = width, height


class ForgeHost(StandInUI):
    """The host side as Forge does it: its conditioning, and txt2img that loads `<lora:name:w>` from `lora_dir` the
    way its LoRA extension does (patcher clones, weights baked in at the next load)."""

    def __init__(self, model: StableDiffusion, lora_dir: Path | None = None, design: str = "forge"):
        super().__init__(model, lora_dir)
        self.sd_model = ForgeModel(model, design)
        self.checkpoint = "forge-stand-in.safetensors"
        self.loads: list[str] = []  # the patchers' models put on their device, in order

    def backend(self) -> ForgeBackend:
        def load(patcher):
            self.loads.append(type(patcher.model).__name__)
            patcher.load()

        backend = {"classic": ClassicBackend, "reforge": ReForgeBackend}.get(self.sd_model.design, ForgeBackend)
        return backend(self, load=load)

    def differentiable_attention(self):
        """Forge Classic's attention needs no change here: the stand-in's is PyTorch's."""
        return contextlib.nullcontext()

    def conditioning(self, prompts, height, width):
        if self.sd_model.design in ("classic", "reforge"):  # A1111's get_learned_conditioning
            return self.sd_model.get_learned_conditioning(Prompts(prompts, width, height))
        return forge_conditioning(self.sd_model, Prompts(prompts, width, height))

    def txt2img(self, request, progress=None):
        self.prompts.append(request.prompt)
        sd = self.sd_model
        loras = LORA_TAG.findall(request.prompt)
        if str(loras) != sd.current_lora_hash:
            sd.current_lora_hash = str(loras)
            sd.forge_objects = sd.forge_objects_original.shallow_copy()
            for name, weight in loras:
                self._add_patches(self.find_lora(name), float(weight))
            sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()
        objects = sd.forge_objects_after_applying_lora
        objects.unet.load()
        objects.clip.patcher.load()
        with torch.inference_mode():
            return generate(sd.ours, dataclasses.replace(request, prompt=LORA_TAG.sub("", request.prompt).strip()))

    def _add_patches(self, path: Path, weight: float) -> None:
        lora, identifier = read_lora(path), (str(path), weight)
        objects, family = self.sd_model.forge_objects, self.sd_model.ours.config.family
        unet, clip = objects.unet.clone(), objects.clip.patcher.clone()
        names = {}
        for patcher in (unet, clip):
            for name, param in patcher.model.named_parameters():
                names[forge_to_ldm(name, family)] = (patcher, name, tuple(param.shape))
        table = by_key(lora_targets({ldm: shape for ldm, (_, _, shape) in names.items() if ldm}, lora.family, True))
        network = LoRANetwork.from_weights(lora.modules)
        for key, module in network.modules_by_key.items():
            target = table[key]
            patcher, name, shape = names[target.param_name]
            patcher.lora_patches.setdefault(identifier, {})[name] = module.delta().detach().reshape(shape) * weight
        objects.unet, objects.clip = unet, Clip(objects.clip.cond_stage_model, clip)

    @contextmanager
    def prepared(self):
        self.prepared_jobs += 1
        classic = self.sd_model.design == "classic"
        try:
            with borrowed(self.sd_model, self.sd_model.memory.unload_model_clones if classic else None):
                yield
        finally:
            self.list_loras()
