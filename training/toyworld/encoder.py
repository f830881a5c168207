"""The toy world's image encoder (input side), trained from scratch: a tiny transformers ``CLIPModel``.

Contrastive image-caption training (Radford et al. 2021) at toy scale, with ``CLIPModel``'s own symmetric
InfoNCE loss (``return_loss=True``, learnable logit scale):

- vision tower: ViT on 32 px images, 4 px patches (8x8 = 64 patches + CLS), hidden 64, 4 layers, 4 heads;
- text tower: causal transformer over the toy WordLevel vocabulary (:func:`training.toyworld.data.toy_tokenizer`),
  hidden 64, 2 layers, 16 positions;
- both projected to ``projection_dim`` (64): the encoder's D_enc.

Data: the image items of a catalog written by ``polymodal toyworld data`` (the default ``random`` layout: any
grey background, random size and position; 32 or 64 px), preprocessed once by the saved
``CLIPImageProcessorPil`` (shorter side to 32 px, bicubic, centre crop 32, mean/std 0.5: pixels in [-1, 1]),
horizontally flipped with probability 1/2 (a flip keeps every shape and colour).

Tokenizer: the toy vocabulary and ids, but every text becomes ``words <|endoftext|>`` (no begin token).
``CLIPTextModel`` pools the hidden state at the *first* ``eos_token_id``; the decoders' toy tokenizer begins
every text with that same token (its BOS is its EOS), so a CLIP text tower over it would pool position 0 and give
every caption the same embedding.

Saved folder (``OUT/image/``): ``config.json`` + ``model.safetensors`` (the whole two-tower ``CLIPModel``, fp32),
``preprocessor_config.json``, ``tokenizer.json``. The product loads the image tower unchanged with
``polymodal.encoders.build_encoder(Modality.IMAGE, encoder_config(OUT))`` (kind ``clip``; the text tower's weights
are ignored there); ``CLIPModel.from_pretrained`` + ``AutoTokenizer`` give both towers (caption retrieval).

Caching: ``OUT/toyworld-encoders.json`` records the config hash (recipe + catalog contents); a matching hash
with its folder present is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.modality import Modality

MANIFEST = "toyworld-encoders.json"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ImageEncoderRecipe:
    """Everything that decides what the toy image encoder becomes (hashed for caching)."""

    size_px: int = 32
    patch_px: int = 4
    vision_hidden: int = 64
    vision_layers: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_tokens: int = 16
    projection_dim: int = 64
    heads: int = 4
    steps: int = 1000
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_fraction: float = 0.05
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    hflip: bool = True
    seed: int = 0

    def scaled(self, factor: float) -> "ImageEncoderRecipe":
        """The same recipe with ``factor`` times the training steps (at least 1): tests and quick runs."""
        return dataclasses.replace(self, steps=max(1, int(self.steps * factor)))


# ------------------------------------------------------------------------------------------------- parts


def clip_tokenizer(model_max_length: int = 16):
    """The toy vocabulary (same ids as :func:`~training.toyworld.data.toy_tokenizer`) with CLIP's pooling
    convention: ``words <|endoftext|>``, padded with ``<|pad|>`` to ``model_max_length``."""
    from training.toyworld.data import toy_tokenizer

    return toy_tokenizer(model_max_length, begin=False)


def image_processor(recipe: ImageEncoderRecipe):
    """The saved preprocessing: shorter side to ``size_px`` (bicubic), centre crop, ``image_mean``/``image_std``."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": recipe.size_px}, crop_size={"height": recipe.size_px, "width": recipe.size_px},
        image_mean=list(recipe.image_mean), image_std=list(recipe.image_std),
    )


def build_clip_model(recipe: ImageEncoderRecipe, tokenizer):
    """A randomly initialised ``CLIPModel`` of the recipe's shape (seeded with ``recipe.seed``)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    if recipe.size_px % recipe.patch_px:
        raise ValueError(f"size_px {recipe.size_px} is not a multiple of patch_px {recipe.patch_px}")
    vision = dict(hidden_size=recipe.vision_hidden, intermediate_size=4 * recipe.vision_hidden,
                  num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.heads,
                  image_size=recipe.size_px, patch_size=recipe.patch_px, projection_dim=recipe.projection_dim)
    text = dict(hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
                num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.heads,
                vocab_size=len(tokenizer), max_position_embeddings=recipe.text_tokens,
                projection_dim=recipe.projection_dim, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=recipe.projection_dim))


def preprocess(processor, images: list[np.ndarray], batch_size: int = 256):
    """(N, 3, S, S) float32 pixels of uint8 (H, W, 3) images, through the saved image processor."""
    import torch

    return torch.cat([processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"]
                      for i in range(0, len(images), batch_size)])


def _read_images(rows: list[dict]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for r in rows:
        with Image.open(r["path"]) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


# ------------------------------------------------------------------------------------------------- training


def _class_key(row: dict):
    """(colour, shape) from the catalog attributes; the caption where a catalog has no such attributes."""
    attrs = row.get("attributes") or {}
    return (attrs["colour"], attrs["shape"]) if "colour" in attrs and "shape" in attrs else row["caption"]


def train_image_encoder(rows: list[dict], recipe: ImageEncoderRecipe, out: Path, *, progress: bool = True) -> dict:
    """Train the toy CLIP on catalog image ``rows`` (``path``, ``caption``) and save it to ``out``.

    Returns:
        Training figures: smoothed final contrastive loss, smoothed in-batch image -> caption accuracy (the best
        caption names the image's colour and shape), final logit scale, seconds, item and parameter counts.
    """
    import torch
    from tqdm import tqdm

    from training.toyworld.train import _smooth

    torch.set_num_threads(1)
    t_start = time.time()
    tokenizer = clip_tokenizer(recipe.text_tokens)
    processor = image_processor(recipe)
    model = build_clip_model(recipe, tokenizer)
    pixels = preprocess(processor, _read_images(rows))  # (N, 3, S, S)
    enc = tokenizer([r["caption"] for r in rows], padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask  # (N, T)
    keys = [_class_key(r) for r in rows]
    n = pixels.shape[0]
    bs = min(recipe.batch_size, n)
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    warmup = max(1, int(recipe.steps * recipe.warmup_fraction))

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    bar = tqdm(range(recipe.steps), desc="image encoder (CLIP)", disable=not progress)
    loss_s = acc_s = float("nan")
    for _ in bar:
        idx = torch.randperm(n, generator=gen)[:bs]
        x = pixels[idx]
        if recipe.hflip:
            flip = torch.rand(bs, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        outputs = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))  # CLIP's clip of the temperature
            # an image "hits" when its best caption in the batch describes its class (a batch holds several
            # captions of each class: they are the loss's false negatives, so the loss stays well above 0)
            best = outputs.logits_per_image.argmax(dim=1)
            same = [keys[int(idx[i])] == keys[int(idx[int(best[i])])] for i in range(bs)]
        loss_s = _smooth(loss_s, outputs.loss.item(), 0.98)
        acc_s = _smooth(acc_s, float(np.mean(same)), 0.98)
        bar.set_postfix(loss=f"{loss_s:.3f}", acc=f"{acc_s:.2f}")
    model.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"loss": round(loss_s, 4), "batch_class_accuracy": round(acc_s, 3),
            "logit_scale": round(float(model.logit_scale.exp()), 2), "train_s": round(time.time() - t_start, 1),
            "num_items": n, "parameters": sum(p.numel() for p in model.parameters())}


def train_encoders(data_dir: str | Path, out_dir: str | Path, *, step_scale: float = 1.0, force: bool = False,
                   progress: bool = True, recipe: ImageEncoderRecipe | None = None) -> dict:
    """Train (or reuse) the toy image encoder; returns the manifest written to ``OUT/`` :data:`MANIFEST`.

    Args:
        data_dir: a folder written by :func:`training.toyworld.data.write_dataset` (image items needed).
        out_dir: gets ``image/`` (a ``CLIPModel`` folder) and the manifest.
        step_scale: multiplies the training steps (tests: a few steps).
        force: retrain even when the config hash matches.
        recipe: default :class:`ImageEncoderRecipe` ().

    Raises:
        FileNotFoundError: no ``catalog.jsonl`` in ``data_dir``.
        ValueError: no image items in the catalog, ``step_scale`` <= 0.
    """
    from training.toyworld.train import _catalog_rows, _hash, _rows_digest

    if not step_scale > 0:
        raise ValueError(f"step_scale must be > 0, got {step_scale}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    recipe = recipe or ImageEncoderRecipe()
    if step_scale != 1.0:
        recipe = recipe.scaled(step_scale)
    rows = _catalog_rows(data_dir, Modality.IMAGE)
    config_hash = _hash({"version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "data": _rows_digest(rows)})
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"encoders": {}}
    folder = out_dir / Modality.IMAGE.value
    entry = manifest["encoders"].get(Modality.IMAGE.value)
    if (not force and entry and entry.get("config_hash") == config_hash
            and (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()):
        if progress:
            print(f"image encoder: up to date ({folder}, config hash {config_hash})")
        return manifest
    figures = train_image_encoder(rows, recipe, folder, progress=progress)
    manifest["encoders"][Modality.IMAGE.value] = {
        "kind": "clip", "path": Modality.IMAGE.value, "dim": recipe.projection_dim, "config_hash": config_hash,
        "recipe": dataclasses.asdict(recipe), "figures": figures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(manifest_path)
    return json.loads(text)  # as a later (cached) call reads it back: tuples become lists


def encoder_config(out_dir: str | Path, modality: Modality | str = Modality.IMAGE):
    """The :class:`polymodal.config.EncoderConfig` (kind ``clip``) that loads the trained toy encoder.

    Raises:
        FileNotFoundError: no manifest in ``out_dir``.
        ValueError: the manifest has no encoder of that modality.
    """
    from polymodal.config import EncoderConfig
    from polymodal.presets.toy import manifest_entry

    out_dir = Path(out_dir)
    entry = manifest_entry(out_dir, MANIFEST, "encoders", modality, "train-encoder")
    return EncoderConfig(kind=entry["kind"], path=str((out_dir / entry["path"]).resolve()), dim=entry["dim"])


# ------------------------------------------------------------------------------------------------- measures


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, steps: int = 300, weight_decay: float = 1e-3,
                          seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression (torch, L-BFGS, L2 ``weight_decay``) fitted on
    standardised ``train_x`` (N, D) with integer labels ``train_y`` (N,); ``test_x`` (M, D), ``test_y`` (M,)."""
    import torch

    train_x, test_x = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(test_x, dtype=torch.float32)
    train_y, test_y = torch.as_tensor(train_y, dtype=torch.long), torch.as_tensor(test_y, dtype=torch.long)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    k = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(a.shape[1], k)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(a), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(b).argmax(1) == test_y).float().mean())


def caption_retrieval_top1(folder: str | Path, images: list[np.ndarray], attributes: list[dict]) -> float:
    """Image -> caption-class retrieval: the share of ``images`` whose most similar class caption (cosine of the
    saved ``CLIPModel``'s image and text embeddings; each of the 12 colour x shape classes embedded as the mean
    of its normalised caption templates) names their own ``attributes`` (``colour``, ``shape``)."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from training.toyworld.data import COLOURS, IMAGE_TEMPLATES, SHAPES

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = image_processor_from(folder)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    with torch.no_grad():
        text = []
        for c, s in classes:
            tok = tokenizer([t.format(colour=c, shape=s) for t in IMAGE_TEMPLATES], padding="max_length",
                            truncation=True, return_tensors="pt")
            emb = torch.nn.functional.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
            text.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        text = torch.stack(text)  # (12, D)
        pixels = preprocess(processor, images)
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        best = (img @ text.T).argmax(1)
    hits = [classes[int(j)] == (a["colour"], a["shape"]) for j, a in zip(best, attributes)]
    return float(np.mean(hits))


def image_processor_from(folder: str | Path):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(folder))
