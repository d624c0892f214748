"""Train the built-in model from scratch: `python -m lib_copier.models.builtin.train`.

Two stages on procedural scenes (scenes.py): the VAE on pixels, then the UNet and the text encoder together on
the VAE's latents. Everything follows from `--seed`: the data, the initial weights, the batch order and the noise
of every step (seeded by step number), so an interrupted run resumes from its last saved state and ends with the
same weights as an uninterrupted one. The GPU is used when there is one; the CPU path is the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib_copier.atomic import atomic_write
from lib_copier.models.builtin.config import BUILTIN, WEIGHTS
from lib_copier.models.builtin.scenes import dataset
from lib_copier.models.checkpoint import save_checkpoint
from lib_copier.models.sd_model import StableDiffusion, build_model


@dataclasses.dataclass
class Plan:
    seed: int = 0
    train_images: int = 10000
    eval_images: int = 200
    vae_steps: int = 3500
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional: crops teach it the same at a quarter of the cost
    vae_lr: float = 2e-4  # higher rates stall this small VAE at the mean colour of its crops
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    min_snr_gamma: float = 5.0  # Min-SNR weighting: high-SNR steps stop dominating, training converges faster
    # A 16x16 latent's mean is as loud as its signal at the noisiest steps, so without an offset the starting
    # noise, not the prompt, picks the background colour.
    noise_offset: float = 0.1
    caption_dropout: float = 0.1  # empty captions teach the unconditional branch that guidance needs
    ema: float = 0.999
    save_every: int = 250


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # uint8 BCHW: 4x smaller than float


def as_float(batch: torch.Tensor, device) -> torch.Tensor:
    return batch.to(device).float() / 127.5 - 1


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], over the whole batch."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


class Run:
    """The state that a resume must restore, saved as one file."""

    def __init__(self, plan: Plan, work: Path, device: torch.device):
        self.plan, self.work, self.device = plan, work, device
        self.model = build_model(BUILTIN, seed=plan.seed).to(device).requires_grad_(False)
        with torch.no_grad():
            # Start the posterior's log-variance low: sampled latents are then nearly the mean from step one,
            # instead of the decoder spending its first thousand steps learning to see through unit noise.
            self.model.vae.quant_conv.bias[BUILTIN.vae.embed_dim :].fill_(-6.0)
        self.stage, self.step = "vae", 0
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
        self.ema: dict[str, torch.Tensor] = {}
        self.unet_opt = None
        self.scale_factor: float | None = None

    def denoiser_params(self):
        return [*self.model.unet.parameters(), *self.model.cond_stage_model.parameters()]

    def start_unet_stage(self):
        self.unet_opt = torch.optim.AdamW(self.denoiser_params(), lr=self.plan.unet_lr, weight_decay=0.01)
        self.ema = {k: v.detach().clone() for k, v in self._denoiser_state().items()}

    def _denoiser_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("first_stage_model.")}

    def save(self):
        state = {
            "stage": self.stage,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema,
            "vae_opt": self.vae_opt.state_dict(),
            "scale_factor": self.scale_factor,
            "unet_opt": self.unet_opt.state_dict() if self.unet_opt else None,
            "plan": dataclasses.asdict(self.plan),
            "config": BUILTIN.to_json(),
        }
        atomic_write(self.work / "state.pt", lambda tmp: torch.save(state, tmp), overwrite=True)

    def load(self) -> bool:
        path = self.work / "state.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["plan"] != dataclasses.asdict(self.plan) or state.get("config") != BUILTIN.to_json():
            raise SystemExit(f"{path} was saved by a run with other settings or another architecture; remove it")
        self.model.load_state_dict(state["model"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.stage, self.step, self.scale_factor = state["stage"], state["step"], state["scale_factor"]
        if state["unet_opt"] is not None:
            self.start_unet_stage()
            self.unet_opt.load_state_dict(state["unet_opt"])
            self.ema = state["ema"]
        return True


def generator(seed: int, step: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def train_vae(run: Run, images: torch.Tensor, log) -> None:
    plan, vae = run.plan, run.model.vae
    vae.train().requires_grad_(True)
    while run.step < plan.vae_steps:
        g = generator(plan.seed, run.step, "cpu")
        idx = torch.randint(len(images), (plan.vae_batch,), generator=g)
        # Crops start on the latent grid, as whole images do, so textures keep their phase within a latent cell.
        cells = (images.shape[-1] - plan.vae_crop) // run.model.downscale + 1
        top, left = (torch.randint(cells, (2,), generator=g) * run.model.downscale).tolist()
        x = as_float(images[idx, :, top : top + plan.vae_crop, left : left + plan.vae_crop], run.device)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator(plan.seed, run.step, run.device)))
        kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        for group in run.vae_opt.param_groups:
            group["lr"] = cosine_lr(run.step, plan.vae_steps, plan.vae_lr)
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        run.vae_opt.step()
        run.step += 1
        log("vae", run.step, plan.vae_steps, loss.item())
        if run.step % plan.save_every == 0:
            run.save()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(model: StableDiffusion, images: torch.Tensor, device, batch: int = 64) -> torch.Tensor:
    return torch.cat(
        [model.vae.encode(as_float(images[i : i + batch], device)).mode() for i in range(0, len(images), batch)]
    )


def train_unet(run: Run, latents: torch.Tensor, captions: list[str], log) -> None:
    plan, model = run.plan, run.model
    model.unet.train()
    model.cond_stage_model.train()
    for p in run.denoiser_params():
        p.requires_grad_(True)
    alphas_cumprod = model.schedule.alphas_cumprod.to(run.device)
    ema_targets = run._denoiser_state()
    while run.step < plan.unet_steps:
        g = generator(plan.seed, plan.vae_steps + run.step, "cpu")
        idx = torch.randint(len(latents), (plan.unet_batch,), generator=g)
        drop = torch.rand(plan.unet_batch, generator=g) < plan.caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
        x0 = latents[idx].to(run.device) * run.scale_factor
        t = torch.randint(0, len(alphas_cumprod), (plan.unet_batch,), generator=g).to(run.device)
        noise = torch.randn(x0.shape, generator=g)
        noise = (noise + plan.noise_offset * torch.randn(*x0.shape[:2], 1, 1, generator=g)).to(run.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = model.encode_prompts(prompts)
        snr = a / (1 - a)
        weight = snr.clamp(max=plan.min_snr_gamma) / snr  # eps-prediction form of Min-SNR-gamma
        loss = (weight * (model.predict(xt, t, cond) - noise).pow(2)).mean()
        for group in run.unet_opt.param_groups:
            group["lr"] = cosine_lr(run.step, plan.unet_steps, plan.unet_lr)
        run.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.denoiser_params(), 1.0)
        run.unet_opt.step()
        with torch.no_grad():
            for k, v in ema_targets.items():
                if v.is_floating_point():
                    run.ema[k].lerp_(v, 1 - plan.ema)
        run.step += 1
        log("unet", run.step, plan.unet_steps, loss.item())
        if run.step % plan.save_every == 0:
            run.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_copier.models.builtin.train", description=__doc__)
    parser.add_argument("--work", default="build/builtin", help="folder for the resumable state and data cache")
    parser.add_argument("--out", default=str(WEIGHTS), help="where the finished fp16 weights go")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    for f in dataclasses.fields(Plan):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    plan = Plan(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Plan)})
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)

    start = time.time()

    def log(stage, step, total, loss):
        if step % 50 == 0 or step == total:
            print(f"[{time.time() - start:7.0f}s] {stage} {step}/{total} loss {loss:.4f}", flush=True)

    workers = max(1, args.threads or torch.get_num_threads())
    pairs = dataset(plan.train_images, plan.seed, size=BUILTIN.resolution, workers=workers)
    images, captions = to_tensor(im for im, _ in pairs), [c for _, c in pairs]
    held = dataset(plan.eval_images, plan.seed + 1, held_out=True, size=BUILTIN.resolution)
    held_images = to_tensor(im for im, _ in held)
    print(f"[{time.time() - start:7.0f}s] {len(images)} training scenes, {len(held_images)} held out", flush=True)

    run = Run(plan, work, device)
    if run.load():
        print(f"resumed at stage {run.stage}, step {run.step}", flush=True)
    if run.stage == "vae":
        train_vae(run, images, log)
        with torch.no_grad():
            recon = run.model.vae.decode(run.model.vae.encode(as_float(held_images[:64], device)).mode())
        print(f"VAE PSNR on held-out scenes: {psnr(recon, as_float(held_images[:64], device)):.2f} dB", flush=True)
        run.stage, run.step = "unet", 0
        run.scale_factor = None
    latents = encode_all(run.model, images, device)
    if run.scale_factor is None:
        # SD's recipe for the latent scale: make the latents unit-variance for the diffusion schedule.
        run.scale_factor = float(1 / latents.std())
        run.start_unet_stage()
        run.save()
    train_unet(run, latents, captions, log)
    run.save()

    final = build_model(dataclasses.replace(BUILTIN, scale_factor=round(run.scale_factor, 5)), seed=plan.seed)
    final.load_state_dict({**run.model.state_dict(), **run.ema})
    save_checkpoint(final, args.out, dtype=torch.float16, overwrite=True)
    print(f"[{time.time() - start:7.0f}s] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
