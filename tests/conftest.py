import torch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter small random values, zero-initialised output layers included.

    A freshly initialised LDM UNet predicts exactly zero (its output convolutions start at zero), so a test
    model built that way would ignore prompts and LoRAs; see DESIGN.md.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
