"""The tiny world: what its images are and what its "human" prefers.

Images are 32x32 RGB pictures of one coloured shape on a light-grey background; captions
are "a {colour} {shape}" (5 colours x 3 shapes = 15 captions).

The judge is the world's human rater. It is a deterministic pixel-space rule:
  1. read the picture: foreground = pixels far from the (border-median) background;
     colour = nearest palette colour of the foreground mean; shape from the fill ratio of
     the foreground in its bounding box (circle pi/4, square 1, triangle 1/2) and from how
     much wider the bottom of the blob is than its top (triangles point up);
  2. three per-image scores, on the scales of the real scorers MPCF uses, so the paper's
     thresholds mean roughly the same thing here:
       aesthetic (~LAION aesthetic, 1..10): size near 55% of the frame, centred, crisp
                  (a saturated, solid fill rather than a blurry smear);
       clip      (~CLIP cosine, 0.15..0.35): soft agreement of colour and shape with caption;
       vqa       (~P("Yes"), 0..1): p(colour right) * p(shape right);
  3. the human score = 2 * vqa + 0.5 * (aesthetic - 5): text alignment first, looks second.
Pick-a-Pic style labels (`human_labels`) compare two images' human scores, call a tie
when they differ by less than 0.05, and then flip 10% of the decisive labels at random:
like real raters, some labels disagree with every single scorer, which is what MPCF
filters out.
"""
import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (214, 48, 44), "green": (46, 160, 67), "blue": (44, 86, 214),
          "yellow": (232, 196, 28), "purple": (142, 62, 184)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (232, 232, 232)
RES = 32
CAPTIONS = [f"a {c} {s}" for c in COLORS for s in SHAPES]
WORDS = ["a", *COLORS, *SHAPES]

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (5, 3)
_FILL = np.array([np.pi / 4, 0.96, 0.52])   # circle, square, triangle fill of bbox
_TAPER = np.array([1.0, 1.0, 0.35])         # width of top third / width of bottom third


def parse_caption(caption):
    """'a red circle' -> (color index, shape index); None where a word is unknown."""
    words = caption.lower().split()
    c = next((i for i, name in enumerate(COLORS) if name in words), None)
    s = next((i for i, name in enumerate(SHAPES) if name in words), None)
    return c, s


def draw(color, shape, size, cx, cy, res=RES, supersample=4):
    """One shape of side/diameter `size` px centred at (cx, cy), anti-aliased."""
    k = supersample
    img = Image.new("RGB", (res * k, res * k), BACKGROUND)
    d = ImageDraw.Draw(img)
    x0, y0 = (cx - size / 2) * k, (cy - size / 2) * k
    x1, y1 = (cx + size / 2) * k, (cy + size / 2) * k
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((res, res), Image.LANCZOS)


def random_drawing(rng, caption=None, res=RES):
    """A random picture (of `caption` if given). Returns (image, caption)."""
    caption = caption or CAPTIONS[rng.integers(len(CAPTIONS))]
    c, s = parse_caption(caption)
    size = rng.uniform(9, 22)
    cx, cy = rng.uniform(size / 2 + 1, res - size / 2 - 1, size=2)
    return draw(list(COLORS)[c], SHAPES[s], size, cx, cy, res), caption


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def analyse(img):
    """Read one image (PIL or uint8 HxWx3). Returns colour probs (5,), shape probs (3,), and
    the aesthetic sub-terms; an empty picture gets uniform probabilities."""
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float64)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg, axis=-1)                                   # (H, W)
    mask = dist > 60
    out = dict(found=False, p_color=np.full(5, 0.2), p_shape=np.full(3, 1 / 3), size=0.0,
               offset=1.0, crisp=0.0)
    if mask.sum() < 6:
        return out
    out["found"] = True
    fg = a[mask]
    d2 = ((fg.mean(0)[None] - _PALETTE) ** 2).sum(-1)
    out["p_color"] = _softmax(-d2 / (2 * 35.0 ** 2))
    rows, cols = np.where(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    fill = mask.sum() / ((r1 - r0) * (c1 - c0))
    widths = mask[r0:r1].sum(1).astype(np.float64)
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1.0)
    out["p_shape"] = _softmax(-((fill - _FILL) / 0.09) ** 2 - ((taper - _TAPER) / 0.25) ** 2)
    side = np.sqrt((r1 - r0) * (c1 - c0)) / max(h, w)
    out["size"] = float(np.exp(-((side - 0.55) / 0.22) ** 2))
    centre = np.array([(r0 + r1) / 2 / h, (c0 + c1) / 2 / w])
    out["offset"] = float(np.linalg.norm(centre - 0.5))
    # crisp: share of the blob that is solid colour (a blurry smear has a wide soft rim)
    out["crisp"] = float((dist[mask] > 0.75 * np.percentile(dist[mask], 90)).mean())
    return out


def judge_scores(images, captions):
    """Per-image scores of the world, each a float array (N,): aesthetic, clip, vqa,
    match (1.0 where colour and shape both read as the caption's), human (the rater's
    clean preference score, higher is better)."""
    keys = ("aesthetic", "clip", "vqa", "match", "human")
    out = {k: np.zeros(len(images)) for k in keys}
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        f = analyse(img)
        c, s = parse_caption(cap)
        pc = f["p_color"][c] if c is not None else 0.0
        ps = f["p_shape"][s] if s is not None else 0.0
        aes = 3.0 + 2.0 * f["size"] + 2.0 * np.exp(-(f["offset"] / 0.2) ** 2) + 2.0 * f["crisp"]
        out["aesthetic"][i] = aes
        out["clip"][i] = 0.15 + 0.1 * (pc + ps)
        out["vqa"][i] = pc * ps
        out["match"][i] = float(f["found"] and c is not None and s is not None
                                and f["p_color"].argmax() == c and f["p_shape"].argmax() == s)
        out["human"][i] = 2.0 * pc * ps + 0.5 * (aes - 5.0)
    return out


def human_labels(human_0, human_1, rng, tie=0.05, flip=0.1):
    """Pick-a-Pic labels (label_0, label_1) from two arrays of human scores: 0.5/0.5 on ties,
    then a random 10% of the decisive labels flipped (rater noise)."""
    diff = np.asarray(human_0) - np.asarray(human_1)
    label_0 = (diff > 0).astype(np.float64)
    flips = rng.random(len(diff)) < flip
    label_0 = np.where(flips, 1.0 - label_0, label_0)
    label_0 = np.where(np.abs(diff) < tie, 0.5, label_0)
    return label_0, 1.0 - label_0


def to_jpeg(img, quality=95):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def from_jpeg(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def bootstrap_win_rate(scores_tuned, scores_base, n_boot=10_000, seed=0):
    """Win-rate of tuned over base (1 a win, 0.5 a tie, 0 a loss, averaged over pairs) with a
    percentile-bootstrap 95% interval over the pairs. (N,), (N,) -> (rate, low, high)"""
    tuned = np.asarray(scores_tuned, np.float64)
    base = np.asarray(scores_base, np.float64)
    wins = (tuned > base) + 0.5 * (tuned == base)  # (N,) in {0, 0.5, 1}
    picks = np.random.default_rng(seed).integers(len(wins), size=(n_boot, len(wins)))
    low, high = np.percentile(wins[picks].mean(1), [2.5, 97.5])
    return float(wins.mean()), float(low), float(high)


def judge_win_rate(images_tuned, images_base, captions):
    """The quickstart's evaluation: the judge's human score of each tuned image against the base
    image of the same caption and seed; also the share of images that show their caption."""
    tuned = judge_scores(images_tuned, captions)
    base = judge_scores(images_base, captions)
    rate, low, high = bootstrap_win_rate(tuned["human"], base["human"])
    return dict(win_rate=rate, win_low=low, win_high=high, n=len(captions),
                match_base=float(base["match"].mean()), match_tuned=float(tuned["match"].mean()))


# ----------------------------------------------------------------------------- lpo.py's evaluation
HELD_OUT_SEED = 10**6  # caption i of an evaluation is sampled on seed HELD_OUT_SEED + i
EVAL_CHUNK = 100  # captions a pipeline call


def held_out_images(pipe, captions, sampling):
    """Images of the captions, caption i on the held-out seed HELD_OUT_SEED + i, EVAL_CHUNK a
    pipeline call; sampling: the call's other options."""
    import torch
    images = []
    for start in range(0, len(captions), EVAL_CHUNK):
        chunk = captions[start:start + EVAL_CHUNK]
        seeds = range(HELD_OUT_SEED + start, HELD_OUT_SEED + start + len(chunk))
        generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
        images += pipe(chunk, generator=generators, **sampling).images
    return images


def judge_lora(pipe, cfg):
    """lpo.py's evaluation in the tiny world: the judge's win-rate of tuned (the denoiser's LoRA
    adapters on) over base (off), on cfg.eval_samples held-out captions of cfg.prompts (its
    validation_unique split, repeated to that many), the same seeds, sampler, steps, guidance and
    size for both (the official script mixed guidance scales), every image judged. pipe: lpo.py's,
    without its VAE (read again from cfg.base). The sampler: DDIM with cfg.eta for SD1.5 / SDXL
    (the sampler LPO trains); SD3's pipeline samples with its own Euler ODE, it has no eta."""
    import torch
    from diffusers import DiffusionPipeline

    from data import load_prompts
    from models import denoiser_name, t5_length
    denoiser = getattr(pipe, denoiser_name(pipe))
    parts = {name: part for name, part in pipe.components.items() if name != "vae"}
    pipe = DiffusionPipeline.from_pretrained(cfg.base, **parts)  # the same modules, plus the VAE
    pipe.to(denoiser.device)
    pipe.set_progress_bar_config(disable=True)
    sampling = dict(num_inference_steps=cfg.num_inference_steps, eta=cfg.eta,
                    guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution)
    if denoiser_name(pipe) == "transformer":  # and the T5 length of every SD3 encoding here
        del sampling["eta"]
        sampling["max_sequence_length"] = t5_length(pipe.tokenizer_3)
    captions = load_prompts(cfg.prompts, "validation_unique", cfg.eval_samples, unique=False,
                            strip=True)
    captions = [captions[i % len(captions)] for i in range(cfg.eval_samples)]
    with torch.no_grad():
        denoiser.disable_adapters()
        images_base = held_out_images(pipe, captions, sampling)
        denoiser.enable_adapters()
        images_tuned = held_out_images(pipe, captions, sampling)
    return judge_win_rate(images_tuned, images_base, captions)


def win_rate_line(figures):
    """judge_lora's figures in one line."""
    return ("judge win-rate tuned vs base: {win_rate:.3f} [95% CI {win_low:.3f}, {win_high:.3f}] "
            "over {n} held-out samples; caption match {match_base:.3f} -> {match_tuned:.3f}"
            ).format(**figures)
