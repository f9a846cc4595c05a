"""Score a tuned model against its base: mean score of each model and win-rate of tuned over base.

SPEC.md section 4. Base and tuned images are paired (same prompt, seed, DDIM steps and CFG: see
sample.py); every image is scored by every scorer, then per scorer: the mean of each model, and
the win-rate of tuned over base (win 1, tie 0.5, averaged over all pairs) with a bootstrap 95%
confidence interval. Writes {out}/eval.json, eval.md (the table), scores.jsonl (every image's
scores) and eval_grid.png (base | tuned with the first scorer's values), and prints the table.

    python eval.py --model tiny --lora runs/lpo-tiny          # CPU, ~1 min: the tiny world's judge + LRM
    python eval.py --model sd15 --lora runs/lpo-sd15          # Pick-a-Pic v1 validation_unique, 500 prompts
    torchrun --nproc_per_node=8 eval.py --model sdxl --unet casiatao/LPO/lpo_sdxl_merge/unet   # paper's LPO-XL
    python eval.py --model sd15 --base-dir runs/samples/x/base --tuned-dir runs/samples/x/tuned   # score folders
    python eval.py --model sd15 --lora runs/lpo-sd15 --prompts parti.tsv --split train --out runs/eval/parti

Sampling options are sample.py's (they are passed to it); --resume reuses the images on disk.
Scorers (--scorers, comma-separated; each must load, or the run stops naming the path it tried):
  pickscore  exp(logit_scale) * cos of PickScore_v1 (CLIP-H, with the CLIP-H processor), ~18-23
  clip       cosine of CLIP-H/14 laion2B image and text embeddings (~0.2-0.4)
  aesthetic  LAION improved aesthetic predictor: MLP on the L2-normalised CLIP-L/14 image embedding
  lrm        the Latent Reward Model at the final latent (see below)
  judge      the tiny world's rater (tiny/world.py): human (its preference), match, aesthetic, ...
--extra-scorers (hpsv2 = HPSv2.1 x 100, imagereward) are used where their packages and weights are
present and otherwise skipped with a one-line notice.

Choices:
- The LRM scores the *clean* latent of the saved image at t = 1 (the last grid step; no noise is
  added): the PNG is VAE-encoded (posterior mean, fp32, the base's own VAE) times scaling_factor.
  Encoding the PNG rather than keeping the sampler's latent lets any image folder be scored.
- Win-rate CI: percentile bootstrap resampling *prompts* (all seeds of a prompt together), so
  several seeds per prompt (tiny world) do not pretend to be independent prompts. With one seed
  per prompt this is the ordinary per-image bootstrap.
- Ties are exact equality of the two scores (identical images, or a discrete score like `match`).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sample import (PRESETS as SAMPLE_PRESETS, ROOT, Config, barrier, check_config, default_out, folder_grid,
                    gather_objects, get_config, log_jsonl, read_folder, sample_pair, save_png, setup_distributed,
                    torch_dtype, write_jsonl)


# ----------------------------------------------------------------------------- config
@dataclass
class EvalConfig(Config):
    base_dir: str = ""           # score these folders (sample.py layout) instead of sampling
    tuned_dir: str = ""
    scorers: str = "pickscore,clip,aesthetic,lrm"
    extra_scorers: str = "hpsv2,imagereward"     # optional: skipped with a notice where missing
    pickscore: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"   # as PickScore's authors
    clip: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"                 # model and processor
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    # from github.com/christophschuhmann/improved-aesthetic-predictor (a file, or hub "owner/repo/file")
    aesthetic_mlp: str = "weights/sac+logos+ava1-l14-linearMSE.pth"
    lrm: str = ""                # LRM folder (lrm.py output); default runs/lrm-{model}
    n_boot: int = 10_000         # bootstrap resamples for the win-rate interval
    eval_batch_size: int = 32


TINY = dict(scorers="judge,lrm", extra_scorers="")
PRESETS = {"sd15": dict(SAMPLE_PRESETS["sd15"], lrm="runs/lrm-sd15"),
           "sdxl": dict(SAMPLE_PRESETS["sdxl"], lrm="runs/lrm-sdxl"),
           "tiny": dict(SAMPLE_PRESETS["tiny"], **TINY, lrm=os.path.join(ROOT, "tiny/lrm")),
           "tiny-xl": dict(SAMPLE_PRESETS["tiny-xl"], **TINY, lrm=os.path.join(ROOT, "tiny/lrm-xl"))}
KNOWN = ("pickscore", "clip", "aesthetic", "lrm", "judge", "hpsv2", "imagereward")


def die(msg):
    raise SystemExit(f"eval.py: {msg}")


# ----------------------------------------------------------------------------- math
def win_rate(scores_tuned, scores_base, n_boot=10_000, seed=0, groups=None):
    """Win-rate of tuned over base: mean over pairs of 1 (tuned higher), 0.5 (tie), 0 (lower),
    with a percentile-bootstrap 95% interval; `groups` (e.g. prompt ids) resamples whole groups
    (one group only: the pairs themselves). (N,), (N,) -> (rate, low, high)"""
    t, b = np.asarray(scores_tuned, np.float64), np.asarray(scores_base, np.float64)
    if t.shape != b.shape or t.ndim != 1 or len(t) == 0 or not np.isfinite(t + b).all():
        raise ValueError(f"win_rate: need two equal-length non-empty 1-D finite arrays, got {t.shape} and {b.shape}")
    w = (t > b) + 0.5 * (t == b)                                            # (N,) in {0, 0.5, 1}
    one = groups is None or len(set(groups)) < 2
    _, g = np.unique(np.arange(len(w)) if one else np.asarray(groups), return_inverse=True)
    sums, counts = np.bincount(g, weights=w), np.bincount(g)                # (G,) per-group totals
    pick = np.random.default_rng(seed).integers(len(sums), size=(n_boot, len(sums)))   # (n_boot, G)
    boot = sums[pick].sum(1) / counts[pick].sum(1)                          # (n_boot,) resampled rates
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(w.mean()), float(low), float(high)


def clip_score(img_emb, txt_emb, logit_scale=None):
    """cos(image, text) per row; PickScore multiplies by exp(logit_scale) (Kirstain et al. 2023).
    (B, D), (B, D) -> (B,)"""
    cos = F.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
    return cos if logit_scale is None else logit_scale.float().exp() * cos


def aesthetic_score(img_emb, mlp):
    """LAION aesthetic predictor: linear MLP (no activations) on the L2-normalised CLIP-L/14 image
    embedding. (B, 768) -> (B,)"""
    return mlp(F.normalize(img_emb.float(), dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------- scorers
def load_or_die(name, path, load):
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        die(f"scorer {name}: cannot load weights from {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def load_clip(path, processor_path, device, dtype):
    from transformers import CLIPModel, CLIPProcessor
    return CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval(), CLIPProcessor.from_pretrained(processor_path)


def clip_embed(model, processor, images, prompts=None):
    """Projected CLIP image (and text) embeddings. (B, D) each; text None without prompts."""
    dev = model.device
    px = processor(images=images, return_tensors="pt")["pixel_values"].to(dev, model.dtype)
    img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)           # (B, D)
    if prompts is None:
        return img, None
    tok = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(dev)
    txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                 attention_mask=tok["attention_mask"]).pooler_output)  # (B, D)
    return img, txt


def load_aesthetic_mlp(path):
    """The .pth state dict of nn.Sequential Linear/Dropout layers (keys layers.0 ... layers.7)."""
    if not os.path.exists(path) and path.count("/") >= 2:   # hub "owner/repo/file"
        from huggingface_hub import hf_hub_download
        path = hf_hub_download("/".join(path.split("/")[:2]), "/".join(path.split("/")[2:]))
    sd = {k.removeprefix("layers."): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    lin = [torch.nn.Linear(*sd[f"{i}.weight"].T.shape) for i in (0, 2, 4, 6, 7)]   # 768-1024-128-64-16-1
    mlp = torch.nn.Sequential(lin[0], torch.nn.Dropout(0.2), lin[1], torch.nn.Dropout(0.2), lin[2],
                              torch.nn.Dropout(0.1), lin[3], lin[4])
    mlp.load_state_dict(sd)
    return mlp.eval()


def load_scorer(name, cfg, device, dtype):
    """name -> fn(images: list[PIL], prompts: list[str]) -> {metric: np.ndarray (B,)}"""
    np_ = lambda x: x.detach().float().cpu().numpy()
    if name in ("pickscore", "clip"):
        path, proc = (cfg.pickscore, cfg.pickscore_processor) if name == "pickscore" else (cfg.clip, cfg.clip)
        model, processor = load_or_die(name, path, lambda: load_clip(path, proc, device, dtype))
        scale = model.logit_scale if name == "pickscore" else None
        return lambda ims, ps: {name: np_(clip_score(*clip_embed(model, processor, ims, ps), scale))}
    if name == "aesthetic":
        model, processor = load_or_die(name, cfg.aesthetic_clip,
                                       lambda: load_clip(cfg.aesthetic_clip, cfg.aesthetic_clip, device, dtype))
        mlp = load_or_die(name, cfg.aesthetic_mlp, lambda: load_aesthetic_mlp(cfg.aesthetic_mlp)).to(device)
        return lambda ims, ps: {name: np_(aesthetic_score(clip_embed(model, processor, ims)[0], mlp))}
    if name == "lrm":
        from diffusers import AutoencoderKL
        from lrm_model import LatentRewardModel
        lrm = load_or_die(name, cfg.lrm, lambda: LatentRewardModel.from_pretrained(cfg.lrm, base=cfg.base))
        lrm = lrm.for_scoring().to(device, dtype)
        vae = AutoencoderKL.from_pretrained(cfg.base, subfolder="vae").to(device).eval()   # fp32: SDXL's overflows in fp16

        def score_lrm(ims, ps):
            px = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((lrm.resolution,) * 2)))
                              for im in ims]).permute(0, 3, 1, 2).float() / 127.5 - 1.0        # (B, 3, H, W) in [-1, 1]
            lat = torch.cat([vae.encode(c.to(device)).latent_dist.mean for c in px.split(4)])   # (B, C, h, w);
            lat = lat * vae.config.scaling_factor   # chunks of 4: an fp32 1024-px encoder pass is memory-hungry
            return {name: np_(lrm.score(lat, 1, prompts=ps))}   # t = 1: the last step of the DDIM grid
        return score_lrm
    if name == "judge":
        from tiny.world import judge_scores
        def judge(ims, ps):
            s = judge_scores(ims, ps)   # "human" first: the world's preference, then its sub-scores
            return {f"judge:{k}": s[k] for k in ("human", "match", "aesthetic", "clip", "vqa")}
        return judge
    if name == "hpsv2":   # HPSv2.1 is reported x 100 in the paper (27.86)
        import hpsv2
        hps = lambda ims, ps: {"hpsv2.1": 100 * np.array([float(np.ravel(hpsv2.score([im], p, hps_version="v2.1"))[0])
                                                          for im, p in zip(ims, ps)])}
        hps([Image.new("RGB", (64, 64))], ["probe"])   # the package fetches its weights on first use
        return hps
    if name == "imagereward":
        import ImageReward
        model = ImageReward.load("ImageReward-v1.0", device=str(device))
        return lambda ims, ps: {name: np.array([float(np.ravel(model.score(p, [im]))[0]) for im, p in zip(ims, ps)])}
    die(f"unknown scorer {name!r}: expected one of {', '.join(KNOWN)}")


def load_scorers(cfg, device, dtype, rank):
    scorers = {n: load_scorer(n, cfg, device, dtype) for n in cfg.scorers.split(",") if n}
    for n in (n for n in cfg.extra_scorers.split(",") if n):
        try:
            scorers[n] = load_scorer(n, cfg, device, dtype)
        except Exception as e:   # optional: a missing package or download only costs its row
            if rank == 0:
                print(f"eval.py: skipping {n}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    return scorers


# ----------------------------------------------------------------------------- pairing, scoring, report
def check_paired(base_dir, tuned_dir):
    """The two folders' (index, prompt, seed) lists and sampler settings must agree: refuse, never truncate."""
    (rows_b, info_b), (rows_t, info_t) = read_folder(base_dir), read_folder(tuned_dir)
    key = lambda r: (r["index"], r["prompt"], r["seed"])
    if len(rows_b) != len(rows_t):
        die(f"mismatched image sets: {base_dir} has {len(rows_b)} images, {tuned_dir} has {len(rows_t)}")
    for rb, rt in zip(rows_b, rows_t):
        if key(rb) != key(rt):
            die(f"mismatched image sets: {base_dir} has {key(rb)} where {tuned_dir} has {key(rt)}")
    for k in ("scheduler", "steps", "guidance", "eta", "resolution"):
        if info_b.get(k) != info_t.get(k):
            die(f"base and tuned were sampled differently: {k} = {info_b.get(k)} vs {info_t.get(k)}")
    for d, rows in ((base_dir, rows_b), (tuned_dir, rows_t)):
        missing = [r["file_name"] for r in rows if not os.path.exists(os.path.join(d, r["file_name"]))]
        if missing:
            die(f"{d}: {len(missing)} images listed in metadata.jsonl are missing, e.g. {missing[0]}")
    return rows_b, info_t


@torch.no_grad()
def score_pairs(rows, folders, scorers, cfg, rank, world):
    """Every image of both folders under every scorer; each rank scores every world-th pair.
    -> one dict per pair, sorted by index: {index, prompt, seed, "{metric}/{base|tuned}": score}"""
    mine, local = rows[rank::world], []
    for b in tqdm(range(0, len(mine), cfg.eval_batch_size), disable=rank != 0, desc="score"):
        batch = mine[b:b + cfg.eval_batch_size]
        prompts = [r["prompt"] for r in batch]
        recs = [dict(index=r["index"], prompt=r["prompt"], seed=r["seed"]) for r in batch]
        for side, d in folders.items():
            images = [Image.open(os.path.join(d, r["file_name"])).convert("RGB") for r in batch]
            for fn in scorers.values():
                for metric, vals in fn(images, prompts).items():
                    for rec, v in zip(recs, vals):
                        rec[f"{metric}/{side}"] = float(v)
        local += recs
    return sorted((r for part in gather_objects(local) for r in part), key=lambda r: r["index"])


def summarise(rows, cfg):
    """Per metric: mean of each model, tuned - base, win-rate [95% CI], n."""
    metrics = [k[:-len("/base")] for k in rows[0] if k.endswith("/base")]
    groups = [r["prompt"] for r in rows]
    out = {}
    for m in metrics:
        b, t = np.array([r[m + "/base"] for r in rows], float), np.array([r[m + "/tuned"] for r in rows], float)
        ok = np.isfinite(b) & np.isfinite(t)   # a NaN score (e.g. an fp16 overflow) is left out and counted
        if not ok.any():
            continue
        b, t, gr = b[ok], t[ok], [g for g, o in zip(groups, ok) if o]
        rate, low, high = win_rate(t, b, n_boot=cfg.n_boot, seed=cfg.seed, groups=gr)
        out[m] = dict(base=float(b.mean()), tuned=float(t.mean()), diff=float((t - b).mean()), win_rate=rate,
                      ci_low=low, ci_high=high, ties=float((t == b).mean()), n=int(ok.sum()), nonfinite=int((~ok).sum()))
    return out


def markdown(summary, header):
    lines = [header, "", "| scorer | base | tuned | tuned - base | win-rate tuned > base [95% CI] | ties | n |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['base']:.4f} | {s['tuned']:.4f} | {s['diff']:+.4f} | "
                     f"{s['win_rate']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | {s['ties']:.2f} | {s['n']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(cfg):
    scoring_only = ("base",) if "lrm" in cfg.scorers.split(",") else ()   # the LRM needs the base's VAE
    check_config(cfg, "eval.py", scoring_only if cfg.base_dir else ("base", "lora", "unet", "vae", "prompts"))
    if bool(cfg.base_dir) != bool(cfg.tuned_dir):
        die("give both --base-dir and --tuned-dir, or neither")
    for d in (cfg.base_dir, cfg.tuned_dir):
        if d and not os.path.exists(os.path.join(d, "metadata.jsonl")):
            die(f"{d}: no metadata.jsonl (expected a sample.py folder)")
    if not cfg.base_dir and not (cfg.lora or cfg.unet):
        die("nothing to compare: give --lora or --unet (sampled here), or --base-dir and --tuned-dir")
    names = [n for n in (cfg.scorers + "," + cfg.extra_scorers).split(",") if n]
    if not names or set(names) - set(KNOWN):
        die(f"--scorers: unknown {sorted(set(names) - set(KNOWN)) or 'none given'}; known: {', '.join(KNOWN)}")
    # default: beside the images (runs/samples/{name}/eval.json next to base/ and tuned/)
    cfg.out = cfg.out or (os.path.dirname(os.path.abspath(cfg.tuned_dir)) if cfg.tuned_dir else default_out(cfg))
    rank, world, device = setup_distributed()
    dtype = torch_dtype(cfg.dtype, device)
    scorers = load_scorers(cfg, device, dtype, rank)      # before sampling: a missing scorer fails fast
    base_dir, tuned_dir = (cfg.base_dir, cfg.tuned_dir) if cfg.base_dir else sample_pair(cfg, rank, world, device)
    rows, info = check_paired(base_dir, tuned_dir)

    scored = score_pairs(rows, {"base": base_dir, "tuned": tuned_dir}, scorers, cfg, rank, world)

    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        summary = summarise(scored, cfg)
        n_prompts = len({r["prompt"] for r in scored})
        header = (f"**{info.get('tuned') or tuned_dir}** vs base **{info.get('base') or base_dir}**: {len(scored)} "
                  f"image pairs ({n_prompts} prompts), {info.get('scheduler')} {info.get('steps')} steps, "
                  f"CFG {info.get('guidance')}, eta {info.get('eta')}, {info.get('resolution')} px")
        table = markdown(summary, header)
        with open(os.path.join(cfg.out, "eval.json.tmp"), "w") as f:
            json.dump(dict(settings=info, base_dir=base_dir, tuned_dir=tuned_dir, n=len(scored),
                           n_prompts=n_prompts, scores=summary), f, indent=2)
        os.replace(os.path.join(cfg.out, "eval.json.tmp"), os.path.join(cfg.out, "eval.json"))
        with open(os.path.join(cfg.out, "eval.md"), "w") as f:
            f.write(table)
        write_jsonl(os.path.join(cfg.out, "scores.jsonl"), scored)
        first = next(iter(summary))   # grid notes: the first scorer's value on every image
        sides = {"base": base_dir, "tuned": tuned_dir}
        cols = {f"{s}: {first}": d for s, d in sides.items()}
        notes = {f"{s}: {first}": {r["index"]: "%.2f" % r[f"{first}/{s}"] for r in scored} for s in sides}
        save_png(folder_grid(cols, cfg, notes), os.path.join(cfg.out, "eval_grid.png"))
        log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(event="eval", n=len(scored), scores=summary))
        print("\n" + table, flush=True)
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(get_config(EvalConfig, PRESETS, doc=__doc__))
