"""Score a tuned model against its base: mean score of each model and win-rate of tuned over base.

Base and tuned images are paired (same prompt, seed, sampler, steps and CFG: sample.py makes
them); every image is scored by every scorer, then per scorer: the mean of each model, and the
win-rate of tuned over base (win 1, tie 0.5, averaged over all pairs) with a bootstrap 95%
confidence interval resampling prompts, as the paper's evaluation (arXiv 2502.01051v3: DDIM 20
steps, CFG 5.0, Pick-a-Pic v1 validation_unique prompts). Writes OUT/eval.json, eval.md (the
table), scores.jsonl and eval_grid.png, and prints the table; docs/reference.md describes them,
the scorers and the checks.

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
it scores those folders (OUT defaults to eval/ beside them). Scorers (--scorers; each must load,
or the run stops naming the path it tried): pickscore, clip (MPCF's G_C), aesthetic (MPCF's G_A),
lrm (the Latent Reward Model on each PNG's clean latent at the sampler grid's last level), judge
(the tiny world's rater). HPSv2.1 and ImageReward are not built in (their packages are not
dependencies, pin older libraries and cannot be tested here): OUT/base and OUT/tuned are image
folders with metadata.jsonl that their own scripts read.
"""
import json
import os
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

import sample
from lpo import PRESETS as LPO_PRESETS
from lrm import encode_images
from models import family, load_lrm, lrm_folder, resolve_model
from mpcf import clip_scorer, load_aesthetic_head
from data import error_line
from distributed import close_distributed, gather_objects, setup_distributed
from runs import fail, inform, log_jsonl, prepare_run_folder, write_text
from sample import (check_sampling_inputs, make_grid, parse_stage, read_json, read_metadata,
                    sample_models, sampler_line, sampler_of, save_png, torch_dtype)


# ----------------------------------------------------------------------------- config
@dataclass
class Config(sample.Config):  # sample.py's options, then the scorers'
    out: str = ""  # run folder; "" = sample.py's (runs/samples/{name}), or eval/ beside the dirs
    base_dir: str = ""  # score these folders (sample.py layout) instead of sampling
    tuned_dir: str = ""  # ... the tuned model's folder
    scorers: str = "pickscore,clip,aesthetic,lrm"  # comma-separated: the table's rows
    pickscore: str = "yuvalkirstain/PickScore_v1"  # PickScore model
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # as PickScore's authors
    clip: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # CLIP score model and processor
    aesthetic_clip: str = "openai/clip-vit-large-patch14"  # aesthetic: CLIP ViT-L/14
    aesthetic_mlp: str = "trl-lib/ddpo-aesthetic-predictor"  # aesthetic: LAION head (as mpcf.py)
    lrm: str = ""  # LRM folder (lrm.py's output)
    n_boot: int = 10_000  # bootstrap resamples for the win-rate interval, in [1, inf)
    eval_batch_size: int = 32  # images per scorer call per rank, in [1, inf)


# sample.py's presets, each with lpo.py's LRM; the tiny worlds are scored by their judge and LRM
TINY = dict(scorers="judge,lrm")
PRESETS = {name: dict(preset, lrm=LPO_PRESETS[name]["lrm"], **(TINY if "tiny" in name else {}))
           for name, preset in sample.PRESETS.items()}
KNOWN = ("pickscore", "clip", "aesthetic", "lrm", "judge")


def get_config(argv=None):
    """sample.py's options and checks, and the scorers'."""
    cfg = parse_stage(__file__, Config, PRESETS, __doc__, argv)
    if bool(cfg.base_dir) != bool(cfg.tuned_dir) or not (cfg.base_dir or cfg.lora or cfg.unet):
        fail("nothing to compare: give --lora or --unet (sampled here), or both --base_dir and "
             "--tuned_dir")
    unknown = sorted(set(names(cfg.scorers)).difference(KNOWN))
    if unknown or not names(cfg.scorers):
        fail(f"--scorers: unknown {unknown or 'none given'}; known: {', '.join(KNOWN)}")
    return cfg


def names(option):
    """The names in a comma-separated option."""
    return [name for name in option.split(",") if name]


# ----------------------------------------------------------------------------- win-rate
def win_rate(scores_tuned, scores_base, n_boot=10_000, seed=0, groups=None):
    """Win-rate of tuned over base: mean over pairs of 1 (tuned higher), 0.5 (tie), 0 (lower),
    with a percentile-bootstrap 95% interval; `groups` (e.g. prompt ids) resamples whole groups
    (one group only: the pairs themselves). (N,), (N,) -> (rate, low, high)"""
    pairs = np.array([scores_tuned, scores_base], np.float64)  # (2, N)
    if pairs.ndim != 2 or not pairs.size or not np.isfinite(pairs).all():
        raise ValueError(f"win_rate: need two equal-length non-empty 1-D finite arrays, got "
                         f"{pairs.shape}")
    tuned, base = pairs
    wins = (tuned > base) + 0.5 * (tuned == base)  # (N,) in {0, 0.5, 1}
    if groups is None or len(set(groups)) < 2:
        groups = np.arange(len(wins))
    group_of = np.unique(groups, return_inverse=True)[1]  # (N,) in 0..G-1
    sums = np.bincount(group_of, weights=wins)  # (G,) per-group totals
    picks = np.random.default_rng(seed).integers(len(sums), size=(n_boot, len(sums)))  # (n_boot, G)
    rates = sums[picks].sum(1) / np.bincount(group_of)[picks].sum(1)  # (n_boot,) resampled rates
    return tuple(map(float, (wins.mean(), *np.percentile(rates, [2.5, 97.5]))))


# ----------------------------------------------------------------------------- scorers
def load_clip_scorer(name, cfg, device, dtype):
    """pickscore: exp(logit_scale) * cos of PickScore_v1 (CLIP-H, with the CLIP-H processor),
    ~18-23; clip: the cosine of CLIP-H/14 laion2B (~0.2-0.4), MPCF's G_C; aesthetic: the LAION
    aesthetic predictor on the CLIP-L/14 image embedding, MPCF's G_A (mpcf.clip_scorer, all
    three). -> fn(images, prompts) -> {name: (B,) values}; what fails to load: one line"""
    from transformers import CLIPModel, CLIPProcessor
    path = cfg.aesthetic_clip if name == "aesthetic" else getattr(cfg, name)
    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype).to(device)
        processor = CLIPProcessor.from_pretrained(
            cfg.pickscore_processor if name == "pickscore" else path)
        head = load_aesthetic_head(cfg.aesthetic_mlp).to(device) if name == "aesthetic" else None
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
        fail(f"scorer {name}: cannot load its weights ({error_line(error)})")
    score = clip_scorer(model, processor, head, model.logit_scale if name == "pickscore" else None)
    return lambda images, prompts: {name: score(images, prompts).tolist()}


def final_timestep(base, num_inference_steps):
    """The LRM's timestep for a finished image, in the denoiser's unit: the last (least noisy)
    level of sample.py's grid (DDIM: t = 1; SD3's flow-matching Euler: its least sigma x 1000,
    8.93 at shift 3 for any step count, not sigma 0, which the LRM never saw in training)."""
    scheduler = sampler_of(base).from_pretrained(base, subfolder="scheduler")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[-1].item()


def lrm_scorer(cfg, device, dtype):
    """The LRM on the clean latent of each PNG at final_timestep, no noise added: the PNG VAE-
    encoded by lrm.encode_images (its posterior mean: zero noise; fp32, the base's own VAE, one
    image at a time: an fp32 1024 px encode needs GBs, SDXL's VAE overflows in fp16) into the
    pipeline's latents, so that any image folder can be scored."""
    from diffusers import AutoencoderKL
    lrm = load_lrm(cfg.lrm, cfg.base, device, dtype, f"python lrm.py --model {cfg.model}")
    base = resolve_model(cfg.base)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(device)  # in eval mode
    timestep = final_timestep(base, cfg.num_inference_steps)

    def score(images, prompts):  # RGB images
        size = (lrm.resolution, lrm.resolution)
        pixels = torch.from_numpy(np.stack([image.resize(size) for image in images]))  # uint8
        latents = encode_images(vae, pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0,
                                torch.zeros(len(images), 1, 1, 1), vae_batch_size=1)
        return {"lrm": lrm.score(latents, timestep, prompts=prompts).tolist()}
    return score


def judge_scorer(images, prompts):
    """The tiny world's rater: "human" first (the world's preference), then its sub-scores."""
    from tiny.world import judge_scores
    scores = judge_scores(images, prompts)
    return {f"judge:{key}": scores[key] for key in ("human", "match", "aesthetic", "clip", "vqa")}


def load_scorer(name, cfg, device, dtype):
    """name (one of KNOWN) -> fn(images: list of PIL, prompts: list of str) -> {metric: (B,)}"""
    if name == "judge":
        return judge_scorer
    if name == "lrm":
        return lrm_scorer(cfg, device, dtype)
    return load_clip_scorer(name, cfg, device, dtype)


# ----------------------------------------------------------------------------- input checks
def check_lrm(cfg):
    """--lrm must be a folder (or hub owner/repo/sub/folder: models.lrm_folder), of --base's model
    family (models.family, from the configs alone: SD1.5, SDXL or SD3; the official layout,
    without lrm_config.json, is its base's); its latent space is lrm_model's to refuse as it
    loads, before sampling."""
    folder = lrm_folder(cfg.lrm, f"python lrm.py --model {cfg.model}")
    trained_on = read_json(os.path.join(folder, "lrm_config.json")).get("base")
    if trained_on and family(trained_on) != family(cfg.base):
        fail(f"--lrm {cfg.lrm} belongs to {trained_on}, of another model family than --base "
             f"{cfg.base}: an LRM scores its own family's images only")


PAIRED_SETTINGS = ("scheduler", "num_inference_steps", "guidance_scale", "eta", "resolution", "vae")


def check_paired(base_dir, tuned_dir):
    """The two folders' (index, prompt, seed) lists and sampler settings must agree: refuse,
    never truncate. -> (rows, the tuned folder's settings)"""
    rows, rows_tuned = read_metadata(base_dir), read_metadata(tuned_dir)
    key = itemgetter("index", "prompt", "seed")
    if list(map(key, rows)) != list(map(key, rows_tuned)):
        fail(f"mismatched image sets: {base_dir} ({len(rows)} images) and {tuned_dir} "
             f"({len(rows_tuned)}) list other (index, prompt, seed) rows")
    settings_base = read_json(os.path.join(base_dir, "sampling.json"))
    settings = read_json(os.path.join(tuned_dir, "sampling.json"))
    for key in PAIRED_SETTINGS:
        if settings_base.get(key) != settings.get(key):
            fail(f"base and tuned were sampled differently: {key} = {settings_base.get(key)} vs "
                 f"{settings.get(key)}")
    if settings.get("guidance_scale") is None:
        inform(f"note: {tuned_dir} records no sampler settings (sampling.json): that base and "
               "tuned share steps and CFG is not checked")
    for folder in (base_dir, tuned_dir):
        missing = {row["file_name"] for row in rows} - set(os.listdir(folder))
        if missing:
            fail(f"{folder}: {len(missing)} images listed in metadata.jsonl are missing, e.g. "
                 f"{min(missing)}")
    return rows, settings


# ----------------------------------------------------------------------------- scoring, report
@torch.no_grad()
def score_pairs(rows, folders, scorers, cfg, rank, world):
    """Every image of both folders under every scorer; each rank scores every world-th pair.
    -> one dict per pair, sorted by index: {index, prompt, seed, "{metric}/{base|tuned}": score}"""
    scored = []
    for batch in tqdm(DataLoader(rows[rank::world], cfg.eval_batch_size, collate_fn=list),
                      disable=rank > 0, desc="score"):
        prompts = [row["prompt"] for row in batch]
        records = [{key: row[key] for key in ("index", "prompt", "seed")} for row in batch]
        for side, folder in folders.items():
            images = [Image.open(os.path.join(folder, r["file_name"])).convert("RGB")
                      for r in batch]
            for scorer in scorers.values():
                for metric, values in scorer(images, prompts).items():
                    for record, value in zip(records, values):
                        record[f"{metric}/{side}"] = float(value)
        scored += records
    return sorted(sum(gather_objects(scored), []), key=itemgetter("index"))


def summarise(rows, cfg):
    """Per metric: mean of each model, tuned - base, win-rate [95% CI], ties, n; a non-finite
    score (e.g. an fp16 overflow) is left out and counted. Means: numpy floats (JSON-writable)."""
    summary = {}
    prompts = np.array([row["prompt"] for row in rows])  # (N,)
    for metric in [key.removesuffix("/base") for key in rows[0] if key.endswith("/base")]:
        pairs = np.array([[row[f"{metric}/base"], row[f"{metric}/tuned"]] for row in rows])
        finite = np.isfinite(pairs).all(1)  # (N,)
        base, tuned = pairs[finite].T  # (n,) each
        if finite.any():
            rate, low, high = win_rate(tuned, base, cfg.n_boot, cfg.seed, prompts[finite])
            summary[metric] = dict(base=base.mean(), tuned=tuned.mean(), diff=(tuned - base).mean(),
                                   win_rate=rate, ci_low=low, ci_high=high,
                                   ties=(tuned == base).mean(), n=len(base),
                                   nonfinite=len(rows) - len(base))
    return summary


REPORT = """**{tuned}** vs base **{base}**: {n} image pairs ({n_prompts} prompts), {sampler}

| scorer | base | tuned | tuned - base | win-rate tuned > base [95% CI] | ties | n |
|---|---|---|---|---|---|---|
"""
ROW = ("| {metric} | {base:.4f} | {tuned:.4f} | {diff:+.4f} | {win_rate:.3f} [{ci_low:.3f}, "
       "{ci_high:.3f}] | {ties:.2f} | {n} |\n")


def write_report(cfg, rows, scored, settings, folders):
    """eval.json, eval.md, scores.jsonl, eval_grid.png (the first metric's scores on the images)
    and the log row; prints the table."""
    summary = summarise(scored, cfg)
    report = dict(settings=settings, base_dir=folders["base"], tuned_dir=folders["tuned"],
                  n=len(scored), n_prompts=len({row["prompt"] for row in scored}), scores=summary)
    table = REPORT.format(**report, tuned=settings.get("tuned") or folders["tuned"],
                          base=settings.get("base") or folders["base"],
                          sampler=sampler_line(settings))
    table += "".join(ROW.format(metric=name, **scores) for name, scores in summary.items())
    for name, text in {"eval.json": json.dumps(report, indent=2), "eval.md": table,
                       "scores.jsonl": "".join(json.dumps(row) + "\n" for row in scored)}.items():
        write_text(os.path.join(cfg.out, name), text)
    metric = next(iter(summary))
    notes = {f"{side}: {metric}": {row["index"]: "%.2f" % row[f"{metric}/{side}"] for row in scored}
             for side in folders}  # columns named "base: {metric}", ...
    save_png(make_grid(dict(zip(notes, folders.values())), rows, cfg.grid_rows, cfg.grid_cell,
                       notes), os.path.join(cfg.out, "eval_grid.png"))
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(event="eval", n=len(scored), scores=summary))
    print("\n" + table, flush=True)


# ----------------------------------------------------------------------------- main
def main(cfg):
    """Every input checked before anything heavy is loaded or sampled, and every scorer loaded
    before sampling; then sample (unless --base_dir), score, report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if "lrm" in names(cfg.scorers):
        check_lrm(cfg)
    if cfg.base_dir:
        rows, settings = check_paired(cfg.base_dir, cfg.tuned_dir)
        cfg.out = cfg.out or os.path.abspath(os.path.join(cfg.tuned_dir, "..", "eval"))
    else:
        prompts = check_sampling_inputs(cfg)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    prepare_run_folder(cfg.out, cfg.resume)
    dtype = torch_dtype(cfg.dtype, device)
    scorers = {name: load_scorer(name, cfg, device, dtype) for name in names(cfg.scorers)}
    if cfg.base_dir:
        folders = {"base": cfg.base_dir, "tuned": cfg.tuned_dir}
    else:
        folders = sample_models(cfg, prompts, rank, world, device)
        rows, settings = check_paired(folders["base"], folders["tuned"])
    scored = score_pairs(rows, folders, scorers, cfg, rank, world)
    if rank == 0:
        write_report(cfg, rows, scored, settings, folders)
    close_distributed()


if __name__ == "__main__":
    main(get_config())
