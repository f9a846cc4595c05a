"""Multi-Preference Consistent Filtering (MPCF): LPO paper Sec. 4.3, SPEC section 2.

Pick-a-Pic winners are often worse than their losers on looks or on text alignment; such
preferences do not survive noise, and an LRM trained on them learns the noise. MPCF keeps a pair
only when the winner is consistently at least as good under three scorers (gap = winner - loser;
ties: image 0 - image 1, the tie rule reads |gap| only):
    G_A  LAION aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, MLP
         768-1024-128-64-16-1 without activations (sac+logos+ava1-l14-linearMSE weights)
    G_C  CLIP score: cosine of image and caption embeddings, CLIP ViT-H/14 laion2B
    G_V  VQAScore: P("Yes" | image, 'Does this figure show "{caption}"? Please answer yes or no.')
    win-lose pair kept iff  G_A > a  and  G_C > 0  and  G_V > 0      a = 0 / -0.5 / -1: strategy 1 / 2 / 3
    tie kept           iff  |G_A| < 0.2  and  |G_C| < 0.03  and  |G_V| < 0.07

`score` (expensive; batched, GPU if present, rows sharded over torchrun ranks) appends to
OUT/gaps.part{rank}.csv, flushed every batch, so a killed run continues where it stopped (--resume),
and merges them into OUT/gaps.csv, one row per dataset row. `filter` (cheap) reads it, or any CSV /
parquet with the three gap columns row-aligned with the split, writes OUT/keep.json (kept row
indices: `lrm.py --keep`) and optionally the kept rows (--save-dataset DIR), and prints the counts.

    python mpcf.py --model tiny                       # score + filter, tiny world (judge scores), CPU ~8 s
    python mpcf.py filter --model tiny --strategy 3   # re-filter only
    torchrun --nproc_per_node 8 mpcf.py score --model sd15 --resume  # Pick-a-Pic v1 train, real scorers
    python mpcf.py filter --model sd15 --save-dataset runs/mpcf-sd15/pickapic_v1_mpcf
    python mpcf.py filter --model sd15 --gaps precomputed.parquet --bounds=-0.5,0,0,0.2,0.03,0.07
Paper, Pick-a-Pic v1 train (511,840 win-lose + 71,907 ties): strategy 1 keeps 101,573, strategy 2
168,539 win-lose + 8,537 ties (~30%), strategy 3 201,885.

VQA: a BLIP-2-style transformers image-text-to-text model (processor(images, text), prompt
"Question: {q} Answer:"); P("Yes") = softmax over the vocabulary of the first generated token, at
the first token of "Yes" (VQAScore's answer likelihood). Tried: BLIP-2 and InstructBLIP classes
with T5 decoders, as tiny random models in the tests (no real checkpoint can be downloaded here).
  - deviation: VQA model Salesforce/instructblip-flan-t5-xl, the closest transformers relative of
    the official clip-flan-t5-xxl (not in transformers): gaps, hence counts, will differ a little.
  - deviation: rows with are_different False (identical images) are dropped and counted.
"""
import argparse, dataclasses, glob, io, json, os, shutil, time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import DatasetDict, load_dataset, load_from_disk
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "tiny"        # preset: tiny | tiny-xl | sd15 | sdxl (picks data and scorers)
    step: str = "all"          # score | filter | all (positional)
    data: str = ""             # hub id, load_dataset folder, save_to_disk folder or .parquet file
    split: str = "train"
    out: str = ""              # default runs/mpcf-{model}
    gaps: str = ""             # filter input; default OUT/gaps.csv
    scorers: str = ""          # tiny (the world's judge) | real (the three models below)
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    aesthetic_mlp: str = "trl-lib/ddpo-aesthetic-predictor"  # .pth file, or folder / hub id holding one
    clip_model: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    vqa_model: str = "Salesforce/instructblip-flan-t5-xl"
    vqa_question: str = 'Does this figure show "{caption}"? Please answer yes or no.'  # VQAScore template
    batch_size: int = 0        # pairs per batch and rank (preset)
    strategy: int = 2          # the paper's choice (its ablation: 21.69 PickScore vs 21.61 / 21.47)
    bounds: str = ""           # custom "a,c,v,ta,tc,tv", overrides --strategy
    save_dataset: str = ""     # also save the kept rows with save_to_disk here
    max_pairs: int = 0         # score only the first N rows (smoke runs); 0 = all
    resume: bool = False       # continue a score run from its part files


TINY, REAL = dict(data="tiny/pickapic", scorers="tiny", batch_size=64), \
    dict(data="yuvalkirstain/pickapic_v1", scorers="real", batch_size=32)
PRESETS = {"tiny": TINY, "tiny-xl": TINY, "sd15": REAL, "sdxl": REAL}  # MPCF is the same for both bases


def get_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default=None, choices=("score", "filter", "all"))
    for f in (f for f in dataclasses.fields(Config) if f.name != "step"):  # --batch-size and --batch_size
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type)
        p.add_argument(*sorted({"--" + f.name.replace("_", "-"), "--" + f.name}), dest=f.name, default=None, **kind)
    a = p.parse_args(argv)
    model = a.model or Config.model
    if model not in PRESETS:
        p.error(f"--model must be one of {', '.join(PRESETS)}, got {model!r}")
    cfg = Config(**{**PRESETS[model], **{k: v for k, v in vars(a).items() if v is not None}})
    cfg.out = cfg.out or f"runs/mpcf-{model}"
    cfg.gaps = cfg.gaps or os.path.join(cfg.out, "gaps.csv")
    try:
        cfg.bounds = tuple(float(x) for x in cfg.bounds.split(",")) if cfg.bounds else STRATEGIES[cfg.strategy]
        assert len(cfg.bounds) == 6
    except (ValueError, AssertionError, KeyError):
        p.error(f"need --strategy 1, 2 or 3, or --bounds=a,c,v,ta,tc,tv; got {cfg.strategy}, {cfg.bounds!r}")
    if cfg.scorers not in ("tiny", "real") or cfg.batch_size <= 0 or cfg.max_pairs < 0:
        p.error(f"need --scorers tiny|real, --batch-size > 0, --max-pairs >= 0; got {cfg.scorers!r}, "
                f"{cfg.batch_size}, {cfg.max_pairs}")
    if cfg.step == "filter" and not os.path.isfile(cfg.gaps):
        p.error(f"no gaps file at {cfg.gaps}: run `python mpcf.py score` first or pass --gaps FILE")
    return cfg


# ----------------------------------------------------------------------------- math
# (a, c, v, ta, tc, tv): win-lose lower bounds on G_A, G_C, G_V, then tie bounds on |G_A|, |G_C|, |G_V|
STRATEGIES = {s: (a, 0.0, 0.0, 0.2, 0.03, 0.07) for s, a in ((1, 0.0), (2, -0.5), (3, -1.0))}  # paper Sec. 4.3
GAP_COLS = ("aesthetic_gap", "clip_gap", "vqa_gap")


def pair_gaps(s0, s1, label_0, label_1):
    """Winner minus loser of one per-image score; ties (labels equal): image 0 minus image 1."""
    sign = torch.where(torch.as_tensor(label_1) > torch.as_tensor(label_0), -1.0, 1.0)  # (N,)
    return (torch.as_tensor(s0, dtype=torch.float64) - torch.as_tensor(s1, dtype=torch.float64)) * sign


def mpcf_keep(aes_gap, clip_gap, vqa_gap, is_tie, strategy=2, bounds=None):
    """MPCF rule (paper Sec. 4.3) -> bool (N,). Strict inequalities both ways: a win-lose pair
    exactly on a bound is dropped, and so is a tie exactly on one. NaN gaps (unscored) never pass."""
    a, c, v, ta, tc, tv = bounds if bounds is not None else STRATEGIES[strategy]
    ga, gc, gv = (torch.as_tensor(g, dtype=torch.float64) for g in (aes_gap, clip_gap, vqa_gap))
    win = (ga > a) & (gc > c) & (gv > v)                               # winner consistently not worse
    tie = (ga.abs() < ta) & (gc.abs() < tc) & (gv.abs() < tv)          # tie consistently a tie
    return torch.where(torch.as_tensor(is_tie, dtype=torch.bool), tie, win)


# ----------------------------------------------------------------------------- scorers and data
def load_aesthetic_mlp(src):
    """LAION aesthetic head from its .pth: Linears at `layers.{0,2,4,6,7}`, Dropouts between, no
    activations. Dropout is the identity at eval, so the Linears alone, in order, are the head."""
    if not os.path.isfile(src):
        from huggingface_hub import snapshot_download
        folder = src if os.path.isdir(src) else snapshot_download(src, allow_patterns=["*.pth"])
        found = sorted(glob.glob(os.path.join(folder, "*.pth")))
        if len(found) != 1:
            raise SystemExit(f"expected exactly one .pth aesthetic head in {src}, found {found}")
        src = found[0]
    sd = torch.load(src, map_location="cpu", weights_only=True)
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.endswith(".weight")})
    mlp = torch.nn.Sequential(*[torch.nn.Linear(*sd[f"layers.{i}.weight"].shape[::-1]) for i in idx])
    mlp.load_state_dict({f"{j}.{p}": sd[f"layers.{i}.{p}"] for j, i in enumerate(idx) for p in ("weight", "bias")})
    return mlp.eval()


def aesthetic_score(vision, processor, mlp, images):
    px = processor(images=images, return_tensors="pt").pixel_values.to(vision.device, vision.dtype)
    emb = vision(pixel_values=px).image_embeds.float()                # (N, 768) CLIP-L/14 image embedding
    emb = emb / emb.norm(dim=-1, keepdim=True)                         # the head was trained on unit vectors
    return mlp.to(emb.device)(emb).squeeze(-1)                         # (N,) ~1..10


def clip_score(clip, processor, images, captions):
    inp = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
    out = clip(**inp.to(device=clip.device, dtype=clip.dtype))        # BatchFeature: casts floats only
    img, txt = F.normalize(out.image_embeds.float(), dim=-1), F.normalize(out.text_embeds.float(), dim=-1)
    return (img * txt).sum(-1)                                         # (N,) cosine, no logit scale


def vqa_score(vlm, processor, question, images, captions):
    """VQAScore: P("Yes") of the first answer token, softmax over the whole vocabulary."""
    tok = processor.tokenizer
    prompts = ["Question: " + question.format(caption=c) + " Answer:" for c in captions]  # BLIP-2 VQA format
    # decoder-only LMs continue after the last position: pad left. T5-style encoders: pad right, as
    # left pads (which land after the image tokens) would shift the text's relative positions.
    tok.padding_side = "right" if getattr(vlm.config, "text_config", vlm.config).is_encoder_decoder else "left"
    inp = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inp = inp.to(device=vlm.device, dtype=vlm.dtype)                  # BatchFeature: casts floats only
    out = vlm.generate(**inp, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    yes = tok("Yes", add_special_tokens=False).input_ids[0]
    return out.logits[0].float().softmax(-1)[:, yes]                   # (N,) in [0, 1]


def load_scorers(cfg, device):
    """-> score(images: list of PIL, captions) -> {aesthetic, clip, vqa}: per-image arrays (N,)."""
    if cfg.scorers == "tiny":
        from tiny.world import judge_scores
        return lambda images, captions: {k: v for k, v in judge_scores(images, captions).items()
                                         if k in ("aesthetic", "clip", "vqa")}
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPModel, CLIPVisionModelWithProjection
    dt = torch.float16 if device.type == "cuda" else torch.float32
    aes_proc, clip_proc, vqa_proc = (AutoProcessor.from_pretrained(m) for m in (cfg.aesthetic_clip, cfg.clip_model,
                                                                                cfg.vqa_model))
    aes = CLIPVisionModelWithProjection.from_pretrained(cfg.aesthetic_clip, dtype=dt).to(device).eval()
    mlp = load_aesthetic_mlp(cfg.aesthetic_mlp).to(device)   # fp32: a tiny head on unit vectors
    clip = CLIPModel.from_pretrained(cfg.clip_model, dtype=dt).to(device).eval()
    vlm = AutoModelForImageTextToText.from_pretrained(cfg.vqa_model, dtype=dt).to(device).eval()

    @torch.no_grad()
    def score(images, captions):
        return {"aesthetic": aesthetic_score(aes, aes_proc, mlp, images).cpu().numpy(),
                "clip": clip_score(clip, clip_proc, images, captions).cpu().numpy(),
                "vqa": vqa_score(vlm, vqa_proc, cfg.vqa_question, images, captions).cpu().numpy()}
    return score


def load_pairs(path, split):
    """A Pick-a-Pic-schema split: hub id, load_dataset folder, save_to_disk folder or parquet file."""
    path = os.path.join(ROOT, path) if path.startswith("tiny/") else path
    try:
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):  # save_to_disk
            ds = load_from_disk(path)
            ds = ds[split] if isinstance(ds, DatasetDict) else ds
        elif os.path.isfile(path):  # one parquet file
            ds = load_dataset("parquet", data_files=path, split="train")
        else:  # a hub id or a load_dataset folder
            ds = load_dataset(path, split=split)
    except (FileNotFoundError, ValueError, KeyError) as e:  # incl. datasets' DatasetNotFoundError
        raise SystemExit(f"cannot load split {split!r} of {path}: {type(e).__name__}: {str(e)[:200]}")
    if missing := {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different"} - set(ds.features):
        raise SystemExit(f"{path} [{split}] lacks Pick-a-Pic columns {sorted(missing)}")
    return ds


def pair_labels(ds):
    """Per row, numpy (N,): labelled, usable (labelled, two different images), is_tie, label_0, label_1."""
    lab = ds.select_columns(["label_0", "label_1", "has_label", "are_different"]).with_format("numpy")[:]
    l0, l1 = lab["label_0"].astype(np.float64), lab["label_1"].astype(np.float64)
    labelled = lab["has_label"].astype(bool) & np.isfinite(l0 + l1) & (l0 + l1 > 0)
    return labelled, labelled & lab["are_different"].astype(bool), l0 == l1, l0, l1


def decode(x):
    try:
        return (x if isinstance(x, Image.Image) else Image.open(io.BytesIO(x["bytes"] if isinstance(x, dict) else x))).convert("RGB")
    except (OSError, ValueError, TypeError):  # a broken row must not stop a day-long run: count it
        return None


# ----------------------------------------------------------------------------- distributed + logging
def setup_dist():
    """(rank, world, device): plain torch.distributed under torchrun, one process otherwise."""
    cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if "RANK" in os.environ:
        torch.cuda.set_device(device) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)


def barrier():  # every rank calls it, in the same order
    dist.barrier() if dist.is_initialized() else None


def log_jsonl(out, **row):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"time": round(time.time(), 1), **row}) + "\n")


# different_flag: 1 win-lose, 0 tie, -1 unlabelled; status: ok | unreadable | no_label | identical | unscored
HEADER = "index,different_flag,aesthetic_gap,clip_gap,vqa_gap,status\n"


def read_parts(out, repair=False):
    """All ranks' rows so far. A run killed mid-write leaves half a line at a part's end: cut it."""
    parts = sorted(glob.glob(os.path.join(out, "gaps.part*.csv")))
    for p in parts if repair else []:
        with open(p, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    parts = [p for p in parts if os.path.getsize(p)]  # killed before its header reached the disk
    df = pd.concat([pd.read_csv(p) for p in parts]) if parts else pd.DataFrame(columns=HEADER.strip().split(","))
    return df.drop_duplicates("index", keep="last").set_index("index")


# ----------------------------------------------------------------------------- the two steps
def score(cfg, ds, rank, world, device):
    read_parts(cfg.out, repair=rank == 0)  # rank 0 cuts half-written lines
    barrier()
    done = set(read_parts(cfg.out).index.astype(int))
    barrier()  # every rank has read the parts before any rank appends to them
    if done and not cfg.resume:
        raise SystemExit(f"{cfg.out} already holds {len(done)} scored pairs: pass --resume to continue them")
    labelled, usable, is_tie, l0, l1 = pair_labels(ds)
    todo = [i for i in range(min(len(ds), cfg.max_pairs or len(ds))) if usable[i] and i not in done][rank::world]
    scorer, images_ds = load_scorers(cfg, device), ds.select_columns(["caption", "jpg_0", "jpg_1"])
    bad, t0 = 0, time.time()
    with open(os.path.join(cfg.out, f"gaps.part{rank}.csv"), "a") as f:
        f.write(HEADER if f.tell() == 0 else "")
        for b in tqdm(range(0, len(todo), cfg.batch_size), disable=rank != 0, desc="mpcf score"):
            idx, rows = todo[b:b + cfg.batch_size], images_ds[todo[b:b + cfg.batch_size]]
            im0, im1 = [decode(x) for x in rows["jpg_0"]], [decode(x) for x in rows["jpg_1"]]
            ok = np.array([x is not None and y is not None for x, y in zip(im0, im1)], dtype=bool)  # (B,)
            sel, gaps = np.flatnonzero(ok), np.full((len(idx), 3), np.nan)                          # (B, 3)
            if len(sel):
                caps = [rows["caption"][k] for k in sel]
                s = scorer([im0[k] for k in sel] + [im1[k] for k in sel], caps + caps)             # 2m images
                for c, key in enumerate(("aesthetic", "clip", "vqa")):
                    sc = np.asarray(s[key], dtype=np.float64)                                        # (2m,)
                    gaps[sel, c] = pair_gaps(sc[:len(sel)], sc[len(sel):], l0[idx][sel], l1[idx][sel]).numpy()
            f.writelines(f"{i},{int(not is_tie[i])},{a!r},{c!r},{v!r},{'ok' if o else 'unreadable'}\n"
                         for i, (a, c, v), o in zip(idx, gaps.tolist(), ok))
            f.flush(), os.fsync(f.fileno())  # a killed run loses at most the batch in flight
            bad += int((~ok).sum())
    log_jsonl(cfg.out, step="score", rank=rank, pairs=len(todo), unreadable=bad, seconds=round(time.time() - t0, 1))
    barrier()
    if rank == 0:  # merge: one row per dataset row, in dataset order
        part = read_parts(cfg.out).reindex(np.arange(len(ds)))
        flag = np.where(labelled, ~is_tie, -1).astype(int)
        df = pd.DataFrame({"index": np.arange(len(ds)), "different_flag": flag,
                           **{c: part[c].to_numpy(dtype=np.float64) for c in GAP_COLS}})
        status = np.where(~usable, "identical", part["status"].fillna("unscored"))
        df["status"] = np.where(~labelled, "no_label", status)
        df.to_csv(cfg.gaps + ".tmp", index=False)
        os.replace(cfg.gaps + ".tmp", cfg.gaps)
        print(f"mpcf score -> {cfg.gaps}: pairs by status {df['status'].value_counts().to_dict()}")


def filter_pairs(cfg, ds):
    labelled, usable, is_tie, _, _ = pair_labels(ds)
    df = pd.read_parquet(cfg.gaps) if cfg.gaps.endswith(".parquet") else pd.read_csv(cfg.gaps)
    if missing := [c for c in GAP_COLS if c not in df.columns]:
        raise SystemExit(f"{cfg.gaps} lacks gap columns {missing}")
    df = df.sort_values("index") if "index" in df.columns else df  # ours; else row i is dataset row i
    if len(df) != len(ds) or ("index" in df.columns and not np.array_equal(df["index"], np.arange(len(ds)))):
        raise SystemExit(f"{cfg.gaps} has {len(df)} rows but the split has {len(ds)}: not row-aligned, refusing it")
    g = df[list(GAP_COLS)].to_numpy(dtype=np.float64)                                            # (N, 3)
    keep = usable & mpcf_keep(*torch.from_numpy(g).T, torch.from_numpy(is_tie), bounds=cfg.bounds).numpy()
    counts = dict(win_lose=int((usable & ~is_tie).sum()), win_lose_kept=int((keep & ~is_tie).sum()),
                  ties=int((usable & is_tie).sum()), ties_kept=int((keep & is_tie).sum()),
                  no_label=int((~labelled).sum()), identical=int((labelled & ~usable).sum()),
                  unscored=int((usable & ~np.isfinite(g).all(1)).sum()))
    kept, path = np.flatnonzero(keep).tolist(), os.path.join(cfg.out, "keep.json")
    with open(path + ".tmp", "w") as f:
        json.dump(kept, f)
    os.replace(path + ".tmp", path)
    if cfg.save_dataset:
        ds.select(kept).save_to_disk(cfg.save_dataset + ".tmp")
        shutil.rmtree(cfg.save_dataset, ignore_errors=True)
        os.replace(cfg.save_dataset + ".tmp", cfg.save_dataset)
    log_jsonl(cfg.out, step="filter", bounds=cfg.bounds, **counts)
    print(f"mpcf filter {cfg.bounds}: kept {counts['win_lose_kept']} / {counts['win_lose']} win-lose pairs, "
          f"{counts['ties_kept']} / {counts['ties']} ties ({len(kept)} rows -> {path}); dropped "
          f"{counts['no_label']} without labels, {counts['identical']} identical, {counts['unscored']} unscored")
    return counts


# ----------------------------------------------------------------------------- main
def main(cfg):
    rank, world, device = setup_dist()
    os.makedirs(cfg.out, exist_ok=True)
    ds = load_pairs(cfg.data, cfg.split)
    if cfg.step in ("score", "all"):
        score(cfg, ds, rank, world, device)
    counts = filter_pairs(cfg, ds) if cfg.step in ("filter", "all") and rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return counts


if __name__ == "__main__":
    main(get_config())
