"""How well the toy image checker reads shapes it knows the truth of: the checker's outline rule (the pixels nearer the
shape's colour than the background's) side by side with the rule before 2026-12-05 (the pixels farther than
``FOREGROUND_DISTANCE`` from the background), per true shape.

Run from the repository root::

    .venv/bin/python bench/checker.py [--quick] [--n 600] [--vae DIR] [--out checker.json]

Images: the ``--n`` held-out edit sources of ``bench/editing.py`` (32 px, random layout) as drawn; the same blurred
by a Gaussian of sigma 0.6 / 0.9 / 1.2 px (a soft edge, as a decoder draws one); and the same encoded and decoded by
the toy VAE (``--vae``, default ``polymodal/assets/toy/decoders/image/vae``; every toy image the decoder makes
passes through it, so no edit nor generation can read better than this). Colour is read the same way by both rules;
only the shape is compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.toyworld import checkers  # noqa: E402
from training.toyworld.editing import _vae_latents, edit_requests  # noqa: E402

SHAPES = ("square", "circle", "triangle")
BLURS_PX = (0.6, 0.9, 1.2)


def far_pixels_shape(image) -> str | None:
    """The shape as the checker read it before 2026-12-05: fill and top share of the far pixels themselves."""
    img = checkers._rgb(image)
    far = np.linalg.norm(img - checkers._border_colour(img), axis=-1) > checkers.FOREGROUND_DISTANCE
    if far.sum() < 4:
        return None
    ys, xs = np.nonzero(checkers._largest_component(far))
    fill = len(ys) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    mid = (ys.min() + ys.max()) / 2.0
    top_share = float((ys < mid).sum() + 0.5 * (ys == mid).sum()) / len(ys)
    return "triangle" if top_share < 0.38 else ("square" if fill > 0.89 else "circle")


def score(images, truth) -> dict:
    """Per rule, per true shape: the share read as that shape (and the n of each shape)."""
    rules = {"outline (now)": lambda im: checkers.check_image(im).shape, "far pixels (before)": far_pixels_shape}
    out = {}
    for name, read in rules.items():
        got = [read(im) for im in images]
        out[name] = {s: round(float(np.mean([g == t for g, t in zip(got, truth) if t == s])), 3) for s in SHAPES}
    out["n"] = {s: int(sum(t == s for t in truth)) for s in SHAPES}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 sources (a smoke run)")
    ap.add_argument("--n", type=int, default=600, help="held-out sources (default 600; a third of each shape)")
    ap.add_argument("--vae", default="polymodal/assets/toy/decoders/image/vae", help="a diffusers AutoencoderKL folder")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 60
    if args.n < 3:
        ap.error("--n must be >= 3")
    if not Path(args.vae, "config.json").is_file():
        ap.error(f"--vae {args.vae}: no diffusers AutoencoderKL folder (config.json) there")

    import torch
    from diffusers import AutoencoderKL
    from scipy import ndimage

    reqs = edit_requests(args.n, 32)
    sources = [q["image"] for q in reqs]
    truth = [q["attrs"]["shape"] for q in reqs]
    sets = {"as drawn": sources}
    for sigma in BLURS_PX:
        sets[f"blur {sigma} px"] = [np.clip(ndimage.gaussian_filter(s.astype(np.float64), (sigma, sigma, 0)).round(),
                                            0, 255).astype(np.uint8) for s in sources]
    vae = AutoencoderKL.from_pretrained(args.vae)
    with torch.no_grad():
        y = vae.decode(_vae_latents(vae, sources)).sample
    sets["VAE round trip"] = list(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    figures = {name: score(images, truth) for name, images in sets.items()}
    print(f"{'images':<16} {'rule':<20} " + " ".join(f"{s:>9}" for s in SHAPES))
    for name, f in figures.items():
        for rule in ("outline (now)", "far pixels (before)"):
            print(f"{name:<16} {rule:<20} " + " ".join(f"{f[rule][s]:>9.3f}" for s in SHAPES))
    print("n per shape:", figures["as drawn"]["n"])
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "vae": args.vae, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
