"""A diffusers pipeline folder (``model_index.json``) read as an LD3M prior description, without importing the
prior classes (the prior registry reads folders through this, so it never imports an implementation to list one)."""

from __future__ import annotations

from pathlib import Path

from distillset.core.errors import DistillError


def meta_from_diffusers_folder(folder: Path) -> dict:
    """Describe a diffusers pipeline folder (``model_index.json``) as an LD3M prior, or fail in one line."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{folder}/model_index.json is not valid JSON ({e}).") from None
    vae_dir = "vqvae" if "vqvae" in index else "vae" if "vae" in index else None
    if vae_dir is None or "unet" not in index:
        raise DistillError(f"{folder} is a diffusers pipeline ({index.get('_class_name')}) without a vae/vqvae and a "
                           "unet; LD3M needs a latent-diffusion pipeline with a class-conditional UNet2DModel.")
    ucfg = json.loads((folder / "unet" / "config.json").read_text())
    vcfg = json.loads((folder / vae_dir / "config.json").read_text())
    if ucfg.get("_class_name") != "UNet2DModel" or not ucfg.get("num_class_embeds"):
        raise DistillError(f"{folder}/unet is a {ucfg.get('_class_name')} without num_class_embeds; LD3M needs a "
                           "class-conditional UNet2DModel.")
    n_down = len(vcfg.get("block_out_channels", [0])) - 1
    size = int(vcfg.get("sample_size", 256))
    lat = int(ucfg["sample_size"] if isinstance(ucfg["sample_size"], int) else ucfg["sample_size"][0])
    if lat * 2 ** n_down != size:
        size = lat * 2 ** n_down  # the vae's sample_size is only a default; the latent grid decides
    n = int(ucfg["num_class_embeds"])
    time_dim = int(ucfg["block_out_channels"][0]) * 4
    return {"kind": "ld3m", "num_classes": n, "image_shape": [int(vcfg.get("in_channels", 3)), size, size],
            "latent_shapes": {"z_T": [int(vcfg["latent_channels"]), lat, lat], "cond": [time_dim]},
            "steps": 10, "vae_subfolder": vae_dir, "class_names": [str(i) for i in range(n)]}
