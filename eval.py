"""Score a tuned model against its base: mean score of each model and win-rate of tuned over base.

Base and tuned images are paired (same prompt, seed, sampler, steps and CFG: sample.py makes
them); every image is scored by every scorer, then per scorer: the mean of each model, and the
win-rate of tuned over base (win 1, tie 0.5, averaged over all pairs) with a bootstrap 95%
confidence interval, as the paper's evaluation (arXiv 2502.01051v3: DDIM 20 steps, CFG 5.0,
Pick-a-Pic v1 validation_unique prompts; SD3: its own flow-matching Euler sampler, see
sample.py). Writes OUT/eval.json, eval.md (the table), scores.jsonl (every image's scores) and
eval_grid.png (base | tuned with the first scorer's values), prints the table.

    python eval.py --model tiny --lora runs/lpo-tiny    # CPU, ~1 min: the tiny world's judge + LRM
    python eval.py --model sd15 --lora runs/lpo-sd15    # Pick-a-Pic v1 validation_unique (500)
    torchrun --nproc_per_node=8 eval.py --model sdxl --unet casiatao/LPO/lpo_sdxl_merge/unet
    python eval.py --model tiny-sd3 --lora runs/lpo-tiny-sd3   # CPU: the flow-matching tiny world
    python eval.py --model sd3 --unet runs/lpo-sd3/transformer --lrm runs/lrm-sd3
    python eval.py --model sd15 --base_dir runs/samples/x/base --tuned_dir runs/samples/x/tuned
    python eval.py --model sd15 --lora runs/lpo-sd15 --prompts parti.tsv --split train \\
        --out runs/eval/parti

With --lora or --unet, eval.py samples both models into OUT/base and OUT/tuned first (sample.py's
sampling, the same options; --resume reuses the images on disk); with --base_dir and --tuned_dir
it scores those folders (OUT defaults to eval/ beside them). A rerun into a folder that holds a
run is refused without --resume.
Scorers (--scorers, comma-separated; each must load, or the run stops naming the path it tried):
  pickscore  exp(logit_scale) * cos of PickScore_v1 (CLIP-H, with the CLIP-H processor), ~18-23
  clip       cosine of CLIP-H/14 laion2B image and text embeddings (~0.2-0.4), as MPCF's G_C
  aesthetic  LAION aesthetic predictor on the CLIP-L/14 image embedding, as MPCF's G_A
  lrm        the Latent Reward Model at the final latent (see below)
  judge      the tiny world's rater (tiny/world.py): human (its preference), match, aesthetic, ...
--extra_scorers (hpsv2 = HPSv2.1 x 100, imagereward) are used where their packages and weights
are present and otherwise skipped with a one-line notice.

Choices:
- The LRM scores the *clean* latent of the saved image at the last (least noisy) level of the
  sampler's grid, in the denoiser's unit, with no noise added: DDIM's t = 1; SD3's flow grid:
  its smallest sigma x 1000 (8.93 at shift 3, for any step count), not sigma 0, which the LRM
  never saw in training (its grid is the sampler's). The PNG is VAE-encoded (posterior mean,
  fp32, the base's own VAE, one image at a time) into the pipeline's latents: z x scaling_factor
  (SD3: (z - shift_factor) x scaling_factor). Encoding the PNG rather than keeping the sampler's
  latent lets any image folder be scored.
- Win-rate CI: percentile bootstrap resampling *prompts* (all seeds of a prompt together), so
  several seeds per prompt (tiny world) do not pretend to be independent prompts. With one seed
  per prompt this is the ordinary per-image bootstrap.
- Ties are exact equality of the two scores (identical images, or a discrete score like `match`).
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from mpcf import aesthetic_score, clip_score, load_aesthetic_head
from sample import check_sampling_inputs, family_of, make_grid, sample_models, sampler_of
from runs import (barrier, build_parser, command_line, fail, gather_objects, log_jsonl,
                  prepare_run_folder, setup_distributed, write_text)

PROG = os.path.basename(__file__)  # the name in this stage's messages

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "sd15"  # preset: sd15 | sdxl | sd3 | tiny | tiny-xl | tiny-sd3, or a pipeline
    base: str = ""  # base pipeline, folder or hub id ("" = the preset's); its VAE feeds the LRM
    lora: str = ""  # tuned = base + this LoRA (lpo.py's output folder): sampled here
    unet: str = ""  # ... or a merged U-Net (SD3: transformer): folder, or hub "owner/repo/sub/dir"
    vae: str = ""  # sampling VAE for both models instead of the base's (SDXL: the fp16-fix VAE)
    base_dir: str = ""  # score these folders (sample.py layout) instead of sampling
    tuned_dir: str = ""  # ... the tuned model's folder
    prompts: str = ""  # dataset (hub id / folder) or a .txt / .json / .tsv / .csv / .parquet file
    split: str = "validation_unique"  # split of a --prompts dataset
    prompt: str = ""  # one prompt instead of a prompt set
    num_prompts: int = 0  # first N unique prompts; 0 = all
    seeds_per_prompt: int = 1  # images per prompt (the tiny world's 15 captions need several)
    seed: int = 0  # image i uses seed + i; also the bootstrap's seed
    num_inference_steps: int = 20  # sampler steps (paper, DDIM: 20; SD3's pipeline: 28)
    guidance_scale: float = 5.0  # classifier-free guidance, the same for both models (paper: 5.0)
    eta: float = 0.0  # DDIM eta; 0 = deterministic (a flow model's Euler sampler has none)
    resolution: int = 0  # image side in pixels; 0 = the pipeline's (denoiser size x VAE factor)
    batch_size: int = 8  # images per sampling forward pass per rank
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    scorers: str = "pickscore,clip,aesthetic,lrm"  # comma-separated: the table's rows
    extra_scorers: str = "hpsv2,imagereward"  # optional: skipped with a notice where missing
    pickscore: str = "yuvalkirstain/PickScore_v1"  # PickScore model
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # as PickScore's authors
    clip: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # CLIP score model and processor
    aesthetic_clip: str = "openai/clip-vit-large-patch14"  # aesthetic: CLIP ViT-L/14
    aesthetic_mlp: str = "trl-lib/ddpo-aesthetic-predictor"  # aesthetic: LAION head (as mpcf.py)
    lrm: str = ""  # LRM folder (lrm.py's output)
    n_boot: int = 10_000  # bootstrap resamples for the win-rate interval
    eval_batch_size: int = 32  # images per scorer call per rank
    out: str = ""  # run folder; "" = sample.py's (runs/samples/{name}), or eval/ beside the dirs
    grid_rows: int = 8  # pairs in eval_grid.png (the first seed of the first prompts)
    grid_cell: int = 256  # pixels per image in eval_grid.png
    resume: bool = False  # continue: keep the images on disk, sample only the missing ones
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    dist_timeout: int = 180  # minutes a rank may wait at a barrier (torchrun)


PICKAPIC = "yuvalkirstain/pickapic_v1"
# held-out seeds (LPO trains on low ones); one thread: the tiny networks are too small to split
TINY = dict(prompts=os.path.join(ROOT, "tiny/pickapic"), batch_size=50, seeds_per_prompt=10,
            seed=1_000_000, grid_rows=15, grid_cell=128, threads=1, scorers="judge,lrm",
            extra_scorers="")
PRESETS = {
    "sd15": dict(base="stable-diffusion-v1-5/stable-diffusion-v1-5", prompts=PICKAPIC,
                 lrm="runs/lrm-sd15"),
    # the SDXL VAE overflows in fp16: the fp16-fix VAE
    "sdxl": dict(base="stabilityai/stable-diffusion-xl-base-1.0", prompts=PICKAPIC, batch_size=4,
                 vae="madebyollin/sdxl-vae-fp16-fix", lrm="runs/lrm-sdxl"),
    "tiny": dict(TINY, base=os.path.join(ROOT, "tiny/sd15"), lrm=os.path.join(ROOT, "tiny/lrm")),
    "tiny-xl": dict(TINY, base=os.path.join(ROOT, "tiny/sdxl"),
                    lrm=os.path.join(ROOT, "tiny/lrm-xl")),
    # SD3's pipeline defaults (28 steps, CFG 7.0), as sample.py
    "sd3": dict(base="stabilityai/stable-diffusion-3-medium-diffusers", prompts=PICKAPIC,
                batch_size=4, num_inference_steps=28, guidance_scale=7.0, lrm="runs/lrm-sd3"),
    "tiny-sd3": dict(TINY, base=os.path.join(ROOT, "tiny/sd3"),
                     lrm=os.path.join(ROOT, "tiny/lrm-sd3")),
}
KNOWN = ("pickscore", "clip", "aesthetic", "lrm", "judge", "hpsv2", "imagereward")


def get_config(argv=None):
    argv = command_line(__file__, argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model", default=Config.model)
    model = peek.parse_known_args(argv)[0].model
    preset = PRESETS.get(model)
    if preset is None:  # a pipeline folder or hub id: the preset of its family
        preset = dict(PRESETS[family_of(model)], base=model)
    defaults = {**asdict(Config()), **preset, "model": model}
    parser = build_parser(Config, defaults, __doc__)
    cfg = Config(**vars(parser.parse_args(argv)))
    if bool(cfg.base_dir) != bool(cfg.tuned_dir):
        fail("give both --base_dir and --tuned_dir, or neither")
    if not cfg.base_dir and not (cfg.lora or cfg.unet):
        fail("nothing to compare: give --lora or --unet (sampled here), or --base_dir and "
             "--tuned_dir")
    if cfg.lora and cfg.unet:
        fail("give --lora or --unet, not both")
    names = [name for name in f"{cfg.scorers},{cfg.extra_scorers}".split(",") if name]
    unknown = sorted(set(names) - set(KNOWN))
    if unknown or not names:
        fail(f"--scorers: unknown {unknown or 'none given'}; known: {', '.join(KNOWN)}")
    for name in ("num_inference_steps", "seeds_per_prompt", "batch_size", "n_boot",
                 "eval_batch_size", "dist_timeout"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_prompts", "threads", "resolution", "eta"):
        if getattr(cfg, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.dtype not in DTYPES:
        fail(f"--dtype {cfg.dtype}: expected auto, fp16, bf16 or fp32")
    return cfg


# ----------------------------------------------------------------------------- math
def win_rate(scores_tuned, scores_base, n_boot=10_000, seed=0, groups=None):
    """Win-rate of tuned over base: mean over pairs of 1 (tuned higher), 0.5 (tie), 0 (lower),
    with a percentile-bootstrap 95% interval; `groups` (e.g. prompt ids) resamples whole groups
    (one group only: the pairs themselves). (N,), (N,) -> (rate, low, high)"""
    tuned = np.asarray(scores_tuned, np.float64)
    base = np.asarray(scores_base, np.float64)
    same_shape = tuned.shape == base.shape and tuned.ndim == 1 and len(tuned) > 0
    if not same_shape or not np.isfinite(tuned + base).all():
        raise ValueError(f"win_rate: need two equal-length non-empty 1-D finite arrays, got "
                         f"{tuned.shape} and {base.shape}")
    wins = (tuned > base) + 0.5 * (tuned == base)  # (N,) in {0, 0.5, 1}
    if groups is None or len(set(groups)) < 2:
        groups = np.arange(len(wins))
    group_of = np.unique(np.asarray(groups), return_inverse=True)[1]  # (N,) in 0..G-1
    sums = np.bincount(group_of, weights=wins)  # (G,) per-group totals
    counts = np.bincount(group_of)  # (G,)
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(sums), size=(n_boot, len(sums)))  # (n_boot, G)
    rates = sums[picks].sum(1) / counts[picks].sum(1)  # (n_boot,) resampled win-rates
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(wins.mean()), float(low), float(high)


# ----------------------------------------------------------------------------- scorers
DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def to_numpy(tensor):
    return tensor.detach().float().cpu().numpy()


def load_or_fail(name, path, load, *args):
    """load(*args), or one line naming the scorer and the path it tried."""
    try:
        return load(*args)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
        message = (str(error).strip().splitlines() or [""])[0][:200]
        fail(f"scorer {name}: cannot load weights from {path!r} ({type(error).__name__}: "
             f"{message})")


def load_clip(path, processor_path, device, dtype):
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, CLIPProcessor.from_pretrained(processor_path)


def clip_embed(model, processor, images, prompts=None):
    """Projected CLIP image (and text) embeddings. (B, D) each; text None without prompts."""
    device = model.device
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    vision = model.vision_model(pixel_values=pixels.to(device, model.dtype))
    image_embeds = model.visual_projection(vision.pooler_output)  # (B, D)
    if prompts is None:
        return image_embeds, None
    tokens = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
    tokens = tokens.to(device)
    text = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return image_embeds, model.text_projection(text.pooler_output)  # (B, D) each


def clip_scorer(name, cfg, device, dtype):
    """pickscore (exp(logit_scale) * cos) or clip (cos): fn(images, prompts) -> {name: (B,)}"""
    path = cfg.pickscore if name == "pickscore" else cfg.clip
    processor_path = cfg.pickscore_processor if name == "pickscore" else cfg.clip
    model, processor = load_or_fail(name, path, load_clip, path, processor_path, device, dtype)
    logit_scale = model.logit_scale if name == "pickscore" else None

    def score(images, prompts):
        image_embeds, text_embeds = clip_embed(model, processor, images, prompts)
        return {name: to_numpy(clip_score(image_embeds, text_embeds, logit_scale))}
    return score


def aesthetic_scorer(cfg, device, dtype):
    path = cfg.aesthetic_clip
    model, processor = load_or_fail("aesthetic", path, load_clip, path, path, device, dtype)
    head = load_or_fail("aesthetic", cfg.aesthetic_mlp, load_aesthetic_head, cfg.aesthetic_mlp)
    head = head.to(device)

    def score(images, prompts):
        image_embeds = clip_embed(model, processor, images)[0]
        return {"aesthetic": to_numpy(aesthetic_score(image_embeds, head))}
    return score


def final_timestep(base, num_inference_steps):
    """The LRM's timestep for a finished image, in the denoiser's unit: the last (least noisy)
    level of sample.py's grid (DDIM: t = 1; SD3's flow-matching Euler: its least sigma x 1000)."""
    import diffusers
    scheduler_class = getattr(diffusers, sampler_of(base))
    scheduler = scheduler_class.from_pretrained(base, subfolder="scheduler")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[-1].item()


def pipeline_latents(vae, pixels):
    """The latents the pipeline samples: z x scaling_factor, SD3 (z - shift_factor) x
    scaling_factor; z the posterior mean.  (B, 3, H, W) in [-1, 1] -> (B, C, h, w)"""
    z = vae.encode(pixels).latent_dist.mean  # (B, C, h, w)
    shift = vae.config.get("shift_factor") or 0.0  # SD1.5 / SDXL: None
    return (z - shift) * vae.config.scaling_factor


def lrm_scorer(cfg, device, dtype):
    """The LRM on the clean latent of each PNG at final_timestep."""
    from diffusers import AutoencoderKL
    from lrm_model import LatentRewardModel, resolve_model
    lrm = load_or_fail("lrm", cfg.lrm, LatentRewardModel.from_pretrained, cfg.lrm, cfg.base)
    lrm = lrm.for_scoring().to(device, dtype)
    base = resolve_model(cfg.base)
    # fp32: SDXL's VAE overflows in fp16; one image at a time: an fp32 1024 px encode is GBs
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    vae = vae.to(device).eval()
    vae.enable_slicing()
    size = (lrm.resolution, lrm.resolution)
    timestep = final_timestep(base, cfg.num_inference_steps)

    def score(images, prompts):
        arrays = [np.array(image.convert("RGB").resize(size)) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        pixels = pixels.float().to(device) / 127.5 - 1.0  # in [-1, 1]
        latents = pipeline_latents(vae, pixels)  # (B, C, h, w)
        return {"lrm": to_numpy(lrm.score(latents, timestep, prompts=prompts))}
    return score


def judge_scorer(images, prompts):
    """The tiny world's rater: "human" first (the world's preference), then its sub-scores."""
    from tiny.world import judge_scores
    scores = judge_scores(images, prompts)
    return {f"judge:{key}": scores[key] for key in ("human", "match", "aesthetic", "clip", "vqa")}


def hpsv2_scorer():
    """HPSv2.1, x 100 as the paper reports it (27.86)."""
    import hpsv2

    def score(images, prompts):
        values = [hpsv2.score([image], prompt, hps_version="v2.1") for image, prompt in
                  zip(images, prompts)]
        return {"hpsv2.1": 100 * np.array([float(np.ravel(v)[0]) for v in values])}
    score([Image.new("RGB", (64, 64))], ["probe"])  # the package fetches its weights on first use
    return score


def imagereward_scorer(device):
    import ImageReward
    model = ImageReward.load("ImageReward-v1.0", device=str(device))

    def score(images, prompts):
        values = [model.score(prompt, [image]) for image, prompt in zip(images, prompts)]
        return {"imagereward": np.array([float(np.ravel(v)[0]) for v in values])}
    return score


def load_scorer(name, cfg, device, dtype):
    """name -> fn(images: list of PIL, prompts: list of str) -> {metric: np.ndarray (B,)}"""
    if name in ("pickscore", "clip"):
        return clip_scorer(name, cfg, device, dtype)
    if name == "aesthetic":
        return aesthetic_scorer(cfg, device, dtype)
    if name == "lrm":
        return lrm_scorer(cfg, device, dtype)
    if name == "judge":
        return judge_scorer
    if name == "hpsv2":
        return hpsv2_scorer()
    if name == "imagereward":
        return imagereward_scorer(device)
    fail(f"unknown scorer {name!r}: expected one of {', '.join(KNOWN)}")


def load_scorers(cfg, device, dtype, rank):
    names = [name for name in cfg.scorers.split(",") if name]
    scorers = {name: load_scorer(name, cfg, device, dtype) for name in names}
    for name in [name for name in cfg.extra_scorers.split(",") if name]:
        try:
            scorers[name] = load_scorer(name, cfg, device, dtype)
        except Exception as error:  # optional: a missing package or download only costs its row
            message = (str(error).strip().splitlines() or [""])[0][:150]
            if rank == 0:
                print(f"{PROG}: skipping {name}: {type(error).__name__}: {message}", flush=True)
    if dist.is_initialized():
        # an optional scorer that loaded on some ranks only is dropped on all: equal rows
        loaded = [None] * dist.get_world_size()
        dist.all_gather_object(loaded, sorted(scorers))
        common = set.intersection(*(set(names) for names in loaded))
        scorers = {name: scorer for name, scorer in scorers.items() if name in common}
    return scorers


# ----------------------------------------------------------------------------- input checks
def lrm_error(cfg):
    """Why --lrm cannot score --base's images (read from configs only), or None."""
    from diffusers import DiffusionPipeline
    from lrm_model import resolve_model
    if not os.path.isdir(cfg.lrm):
        return (f"--lrm {cfg.lrm}: no such folder: train one with lrm.py, or leave lrm out of "
                "--scorers")
    config_path = os.path.join(cfg.lrm, "lrm_config.json")
    if not os.path.exists(config_path):
        return None  # the official layout: LatentRewardModel.from_pretrained checks it
    with open(config_path) as file:
        lrm_config = json.load(file)
    try:
        index = DiffusionPipeline.load_config(resolve_model(cfg.base))
    except (OSError, ValueError) as error:
        return f"--base {cfg.base}: cannot read its model_index.json ({type(error).__name__})"
    encoders = {}
    # SD1.5: CLIP-L; SDXL: + bigG; SD3: two projected CLIPs (+ T5 where its LRM names it)
    for name in {"text_encoder", "text_encoder_2", *lrm_config["text_encoders"]}:
        if (index.get(name) or [None])[0]:
            encoders[name] = index[name][1]
    if encoders != lrm_config["text_encoders"]:
        return (f"--lrm {cfg.lrm} belongs to {lrm_config['base']} (text encoders "
                f"{sorted(lrm_config['text_encoders'].values())}) but --base {cfg.base} has "
                f"{sorted(encoders.values())}: an LRM scores its own model family only")
    return None


def read_folder(folder):
    """metadata.jsonl rows and sampling.json of a sample.py folder."""
    with open(os.path.join(folder, "metadata.jsonl")) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    settings_path = os.path.join(folder, "sampling.json")
    if not os.path.exists(settings_path):
        return rows, {}
    with open(settings_path) as file:
        return rows, json.load(file)


PAIRED_SETTINGS = ("scheduler", "num_inference_steps", "guidance_scale", "eta", "resolution", "vae")
# sample.py's sampling.json before the CLI rename called two of them steps and guidance
LEGACY_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


def sampling_setting(settings, key):
    """A sampling.json value, under its current or its former name."""
    return settings.get(key, settings.get(LEGACY_NAMES.get(key, key)))


def check_paired(base_dir, tuned_dir):
    """The two folders' (index, prompt, seed) lists and sampler settings must agree: refuse,
    never truncate. -> (rows, the tuned folder's settings)"""
    for folder in (base_dir, tuned_dir):
        if not os.path.exists(os.path.join(folder, "metadata.jsonl")):
            fail(f"{folder}: no metadata.jsonl (expected a sample.py folder)")
    rows_base, settings_base = read_folder(base_dir)
    rows_tuned, settings_tuned = read_folder(tuned_dir)
    if len(rows_base) != len(rows_tuned):
        fail(f"mismatched image sets: {base_dir} has {len(rows_base)} images, {tuned_dir} has "
             f"{len(rows_tuned)}")
    for row_base, row_tuned in zip(rows_base, rows_tuned):
        key_base = (row_base["index"], row_base["prompt"], row_base["seed"])
        key_tuned = (row_tuned["index"], row_tuned["prompt"], row_tuned["seed"])
        if key_base != key_tuned:
            fail(f"mismatched image sets: {base_dir} has {key_base} where {tuned_dir} has "
                 f"{key_tuned}")
    for key in PAIRED_SETTINGS:
        value_base = sampling_setting(settings_base, key)
        value_tuned = sampling_setting(settings_tuned, key)
        if value_base != value_tuned:
            fail(f"base and tuned were sampled differently: {key} = {value_base} vs {value_tuned}")
    if sampling_setting(settings_tuned, "guidance_scale") is None:
        print(f"{PROG}: note: {tuned_dir} records no sampler settings (sampling.json): that base "
              "and tuned share steps and CFG is not checked", flush=True)
    for folder in (base_dir, tuned_dir):
        missing = [r["file_name"] for r in rows_base
                   if not os.path.exists(os.path.join(folder, r["file_name"]))]
        if missing:
            fail(f"{folder}: {len(missing)} images listed in metadata.jsonl are missing, e.g. "
                 f"{missing[0]}")
    return rows_base, settings_tuned


# ----------------------------------------------------------------------------- scoring, report
@torch.no_grad()
def score_pairs(rows, folders, scorers, cfg, rank, world):
    """Every image of both folders under every scorer; each rank scores every world-th pair.
    -> one dict per pair, sorted by index: {index, prompt, seed, "{metric}/{base|tuned}": score}"""
    mine = rows[rank::world]
    scored = []
    batches = range(0, len(mine), cfg.eval_batch_size)
    for first in tqdm(batches, disable=rank != 0, desc="score"):
        batch = mine[first:first + cfg.eval_batch_size]
        prompts = [row["prompt"] for row in batch]
        records = [dict(index=r["index"], prompt=r["prompt"], seed=r["seed"]) for r in batch]
        for side, folder in folders.items():
            paths = [os.path.join(folder, row["file_name"]) for row in batch]
            images = [Image.open(path).convert("RGB") for path in paths]
            for scorer in scorers.values():
                for metric, values in scorer(images, prompts).items():
                    for record, value in zip(records, values):
                        record[f"{metric}/{side}"] = float(value)
        scored += records
    everyone = [record for part in gather_objects(scored) for record in part]
    return sorted(everyone, key=lambda record: record["index"])


def summarise(rows, cfg):
    """Per metric: mean of each model, tuned - base, win-rate [95% CI], ties, n."""
    metrics = [key[:-len("/base")] for key in rows[0] if key.endswith("/base")]
    summary = {}
    for metric in metrics:
        base = np.array([row[metric + "/base"] for row in rows], float)  # (N,)
        tuned = np.array([row[metric + "/tuned"] for row in rows], float)  # (N,)
        # a NaN score (e.g. an fp16 overflow) is left out and counted
        finite = np.isfinite(base) & np.isfinite(tuned)
        if not finite.any():
            continue
        base = base[finite]
        tuned = tuned[finite]
        groups = [row["prompt"] for row, ok in zip(rows, finite) if ok]
        rate, low, high = win_rate(tuned, base, n_boot=cfg.n_boot, seed=cfg.seed, groups=groups)
        summary[metric] = dict(base=float(base.mean()), tuned=float(tuned.mean()),
                               diff=float((tuned - base).mean()), win_rate=rate, ci_low=low,
                               ci_high=high, ties=float((tuned == base).mean()),
                               n=int(finite.sum()), nonfinite=int((~finite).sum()))
    return summary


def markdown(summary, header):
    lines = [header, "",
             "| scorer | base | tuned | tuned - base | win-rate tuned > base [95% CI] | ties | n |",
             "|---|---|---|---|---|---|---|"]
    for metric, s in summary.items():
        interval = f"{s['win_rate']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
        lines.append(f"| {metric} | {s['base']:.4f} | {s['tuned']:.4f} | {s['diff']:+.4f} | "
                     f"{interval} | {s['ties']:.2f} | {s['n']} |")
    return "\n".join(lines) + "\n"


def score_grid(scored, folders, cfg, metric):
    """eval_grid.png: the first seed of the first prompts, each image with its `metric` score."""
    first_of_prompt = {}
    for row in scored:
        first_of_prompt.setdefault(row["prompt"], row)
    picks = list(first_of_prompt.values())[:cfg.grid_rows]
    file_names = {row["index"]: row["file_name"] for row in read_folder(folders["base"])[0]}
    picked_files = [file_names[row["index"]] for row in picks]
    columns = {}
    notes = {}
    for side, folder in folders.items():
        label = f"{side}: {metric}"
        columns[label] = [Image.open(os.path.join(folder, name)) for name in picked_files]
        notes[label] = ["%.2f" % row[f"{metric}/{side}"] for row in picks]
    return make_grid(columns, [row["prompt"] for row in picks], cfg.grid_cell, notes)


def write_report(cfg, scored, settings, folders):
    """eval.json, eval.md, scores.jsonl, eval_grid.png and the log row; prints the table."""
    summary = summarise(scored, cfg)
    num_prompts = len({row["prompt"] for row in scored})
    tuned_name = settings.get("tuned") or folders["tuned"]
    base_name = settings.get("base") or folders["base"]
    header = (f"**{tuned_name}** vs base **{base_name}**: {len(scored)} image pairs "
              f"({num_prompts} prompts), {settings.get('scheduler')} "
              f"{settings.get('num_inference_steps')} steps, CFG {settings.get('guidance_scale')}, "
              f"eta {settings.get('eta')}, {settings.get('resolution')} px")
    table = markdown(summary, header)
    report = dict(settings=settings, base_dir=folders["base"], tuned_dir=folders["tuned"],
                  n=len(scored), n_prompts=num_prompts, scores=summary)
    write_text(os.path.join(cfg.out, "eval.json"), json.dumps(report, indent=2))
    write_text(os.path.join(cfg.out, "eval.md"), table)
    lines = "".join(json.dumps(row) + "\n" for row in scored)
    write_text(os.path.join(cfg.out, "scores.jsonl"), lines)
    grid = score_grid(scored, folders, cfg, next(iter(summary)))
    grid.save(os.path.join(cfg.out, "eval_grid.png.tmp"), format="PNG")
    os.replace(os.path.join(cfg.out, "eval_grid.png.tmp"), os.path.join(cfg.out, "eval_grid.png"))
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(event="eval", n=len(scored), scores=summary))
    print("\n" + table, flush=True)


# ----------------------------------------------------------------------------- main
def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # every input checked before anything heavy is loaded or sampled
    if "lrm" in cfg.scorers.split(","):
        error = lrm_error(cfg)
        if error:
            fail(error)
    if cfg.base_dir:
        rows, settings = check_paired(cfg.base_dir, cfg.tuned_dir)
        tuned_parent = os.path.dirname(os.path.abspath(cfg.tuned_dir))
        cfg.out = cfg.out or os.path.join(tuned_parent, "eval")
    else:
        try:
            prompts = check_sampling_inputs(cfg)
        except ValueError as error:
            fail(error)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    prepare_run_folder(cfg.out, cfg.resume)
    dtype = torch_dtype(cfg.dtype, device)
    # before sampling: a scorer that cannot load fails fast
    scorers = load_scorers(cfg, device, dtype, rank)
    folders = {"base": cfg.base_dir, "tuned": cfg.tuned_dir}
    if not cfg.base_dir:
        base_dir, tuned_dir = sample_models(cfg, prompts, rank, world, device)
        folders = {"base": base_dir, "tuned": tuned_dir}
        rows, settings = check_paired(base_dir, tuned_dir)
    scored = score_pairs(rows, folders, scorers, cfg, rank, world)
    if rank == 0:
        write_report(cfg, scored, settings, folders)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_config())
