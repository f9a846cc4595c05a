"""Multi-Preference Consistent Filtering (MPCF) of preference pairs (arXiv 2502.01051v3, its MPCF
section).

Pick-a-Pic winners are often worse than their losers on looks or on text alignment; such
preferences do not survive noise, and an LRM trained on them learns the noise. MPCF keeps a pair
only when the winner is consistently at least as good under three scorers (gap = winner - loser;
ties: image 0 - image 1, the tie rule reads |gap| only):
    G_A  LAION aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, then an MLP
         768-1024-128-64-16-1 without activations (sac+logos+ava1-l14-linearMSE weights)
    G_C  CLIP score: cosine of image and caption embeddings, CLIP ViT-H/14 laion2B
    G_V  VQAScore: P("Yes" | image, 'Does this figure show "{caption}"? Please answer yes or no.')
    win-lose pair kept iff  G_A > a  and  G_C > 0  and  G_V > 0
                            a = 0 / -0.5 / -1: strategy 1 / 2 (the paper's) / 3
    tie kept           iff  |G_A| < 0.2  and  |G_C| < 0.03  and  |G_V| < 0.07
Paper, Pick-a-Pic v1 train (511,840 win-lose + 71,907 ties): strategy 1 keeps 101,573, strategy 2
168,539 win-lose + 8,537 ties (~30%), strategy 3 201,885; LPO on SD1.5 reaches PickScore 21.61 /
21.69 / 21.47 with them (21.49 without MPCF).

Two steps. `score` (expensive; batched, GPU if present, rows sharded over torchrun ranks) appends
to OUT/gaps.part{rank}.csv, flushed every batch, so a killed run continues where it stopped
(--resume), then merges the parts into OUT/gaps.csv, one row per dataset row. `filter` (cheap)
reads it, or any CSV / parquet with the three gap columns row-aligned with the split, writes
OUT/keep.json (kept row indices, for `lrm.py --keep`), optionally the kept rows (--save_dataset),
and prints the counts. `all` runs both. A rerun of `score` or `all` into a folder that holds a
run is refused without --resume; `filter` alone may be rerun (it only rewrites keep.json).

    python mpcf.py --model tiny                        # score + filter the tiny world, CPU ~8 s
    python mpcf.py filter --model tiny --strategy 3    # re-filter only
    torchrun --nproc_per_node 8 mpcf.py score --model sd15 --resume   # Pick-a-Pic v1 train
    python mpcf.py filter --model sd15 --save_dataset runs/mpcf-sd15/pickapic_v1_mpcf
    python mpcf.py filter --model sd15 --gaps precomputed.parquet --bounds=-0.5,0,0,0.2,0.03,0.07

Under torchrun the ranks meet at a barrier after scoring, and rank 0 merges: a rank that finishes
its shard early waits there for the slowest one, up to --dist_timeout minutes (default 3 hours;
raise it for very uneven shards).

VQA: a BLIP-2-style transformers image-text-to-text model (processor(images, text), prompt
"Question: {q} Answer:"); P("Yes") = softmax over the vocabulary of the first generated token, at
the first token of "Yes" (VQAScore's answer likelihood). Tried: BLIP-2 and InstructBLIP classes
with T5 decoders, as tiny random models in the tests (no real checkpoint can be downloaded here).
Deviations from the paper's code:
  1. VQA model Salesforce/instructblip-flan-t5-xl, the closest transformers relative of the
     official clip-flan-t5-xxl (not in transformers): gaps, hence counts, will differ a little.
  2. Rows with are_different False (identical images) are dropped and counted.
"""
import argparse
import glob
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import DatasetDict, load_dataset, load_from_disk
from PIL import Image
from tqdm import tqdm
from runs import (barrier, build_parser, command_line, fail, kill_point, log_jsonl,
                  prepare_run_folder, setup_distributed, write_text)

ROOT = os.path.dirname(os.path.abspath(__file__))
STEPS = ("score", "filter", "all")


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "tiny"  # preset: tiny | tiny-xl | sd15 | sdxl (picks the data and the scorers)
    step: str = "all"  # score | filter | all (also positional: `mpcf.py filter`)
    data: str = ""  # Pick-a-Pic-schema pairs: hub id, load_dataset or save_to_disk folder, .parquet
    split: str = "train"  # split of --data (a single .parquet file is its own split)
    out: str = ""  # run folder; "" = runs/mpcf-{model}
    gaps: str = ""  # filter input, CSV or parquet with the three gap columns; "" = OUT/gaps.csv
    scorers: str = ""  # tiny (the tiny world's judge) | real (the three models below)
    aesthetic_clip: str = "openai/clip-vit-large-patch14"  # G_A: CLIP ViT-L/14 image tower
    aesthetic_mlp: str = "trl-lib/ddpo-aesthetic-predictor"  # G_A: LAION head, .pth/folder/hub id
    clip_model: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # G_C: CLIP ViT-H/14
    vqa_model: str = "Salesforce/instructblip-flan-t5-xl"  # G_V: VQA model (deviation 1)
    vqa_question: str = 'Does this figure show "{caption}"? Please answer yes or no.'  # G_V
    batch_size: int = 0  # pairs per scoring batch per rank (preset)
    strategy: int = 2  # MPCF strategy 1 | 2 | 3 (the paper uses 2)
    bounds: str = ""  # custom "a,c,v,ta,tc,tv" (win-lose bounds, then tie bounds): over --strategy
    save_dataset: str = ""  # also save the kept rows here (datasets' save_to_disk)
    max_pairs: int = 0  # score only the first N rows (smoke runs); 0 = all
    resume: bool = False  # continue a killed score run from its part files
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    dist_timeout: int = 180  # minutes a rank may wait at a barrier (torchrun)


TINY = dict(data="tiny/pickapic", scorers="tiny", batch_size=64, threads=1)
REAL = dict(data="yuvalkirstain/pickapic_v1", scorers="real", batch_size=32)
# MPCF filters the data, whatever base model is trained on it later
PRESETS = {"tiny": TINY, "tiny-xl": TINY, "sd15": REAL, "sdxl": REAL}


def get_config(argv=None):
    argv = command_line(__file__, argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model", default=Config.model)
    model = peek.parse_known_args(argv)[0].model
    if model not in PRESETS:
        fail(f"--model {model}: expected one of {', '.join(PRESETS)}")
    defaults = {**asdict(Config()), **PRESETS[model]}
    parser = build_parser(Config, defaults, __doc__)
    parser.add_argument("step_name", nargs="?", choices=STEPS, help="the same as --step")
    args = vars(parser.parse_args(argv))
    step_name = args.pop("step_name")
    cfg = Config(**args)
    cfg.step = step_name or cfg.step
    cfg.out = cfg.out or f"runs/mpcf-{model}"
    if cfg.step not in STEPS:
        fail(f"--step {cfg.step}: expected one of {', '.join(STEPS)}")
    # a given --gaps file is only read: scoring writes OUT/gaps.csv and must never overwrite it
    if cfg.gaps and cfg.step != "filter":
        fail(f"--gaps {cfg.gaps} is an input of the filter step: run `mpcf.py filter --gaps FILE`")
    cfg.gaps = cfg.gaps or os.path.join(cfg.out, "gaps.csv")
    rule_bounds(cfg)
    if cfg.scorers not in ("tiny", "real"):
        fail(f"--scorers {cfg.scorers}: expected tiny or real")
    for name in ("batch_size", "dist_timeout"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_pairs", "threads"):
        if getattr(cfg, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.step == "filter" and not os.path.isfile(cfg.gaps):
        fail(f"no gaps file at {cfg.gaps}: run `python mpcf.py score` first, or pass --gaps FILE")
    return cfg


def rule_bounds(cfg):
    """(a, c, v, ta, tc, tv) of --bounds, else of --strategy."""
    if not cfg.bounds and cfg.strategy in STRATEGIES:
        return STRATEGIES[cfg.strategy]
    try:
        bounds = tuple(float(x) for x in cfg.bounds.split(","))
    except ValueError:
        bounds = ()
    if len(bounds) != 6:
        fail(f"need --strategy 1, 2 or 3, or --bounds=a,c,v,ta,tc,tv (six numbers); got "
             f"--strategy {cfg.strategy}, --bounds {cfg.bounds!r}")
    return bounds


# ----------------------------------------------------------------------------- math
# (a, c, v, ta, tc, tv): win-lose lower bounds on G_A, G_C, G_V, then tie bounds on |G_A|, |G_C|,
# |G_V|; the paper's three strategies differ in the aesthetic bound a only
STRATEGIES = {
    1: (0.0, 0.0, 0.0, 0.2, 0.03, 0.07),
    2: (-0.5, 0.0, 0.0, 0.2, 0.03, 0.07),
    3: (-1.0, 0.0, 0.0, 0.2, 0.03, 0.07),
}
SCORES = ("aesthetic", "clip", "vqa")
GAP_COLS = ("aesthetic_gap", "clip_gap", "vqa_gap")


def pair_gaps(scores_0, scores_1, label_0, label_1):
    """Winner minus loser of one per-image score; ties (labels equal): image 0 minus image 1.
    (N,) each -> (N,) float64"""
    image_1_wins = torch.as_tensor(label_1) > torch.as_tensor(label_0)
    sign = torch.where(image_1_wins, -1.0, 1.0)  # (N,)
    scores_0 = torch.as_tensor(scores_0, dtype=torch.float64)
    scores_1 = torch.as_tensor(scores_1, dtype=torch.float64)
    return (scores_0 - scores_1) * sign


def mpcf_keep(aes_gap, clip_gap, vqa_gap, is_tie, strategy=2, bounds=None):
    """MPCF rule (arXiv 2502.01051v3, MPCF section) -> bool (N,). Strict inequalities both ways: a
    win-lose pair exactly on a bound is dropped, and so is a tie exactly on one. NaN gaps
    (unscored) never pass."""
    a, c, v, ta, tc, tv = STRATEGIES[strategy] if bounds is None else bounds
    g_a = torch.as_tensor(aes_gap, dtype=torch.float64)
    g_c = torch.as_tensor(clip_gap, dtype=torch.float64)
    g_v = torch.as_tensor(vqa_gap, dtype=torch.float64)
    # the winner is consistently not worse
    win = (g_a > a) & (g_c > c) & (g_v > v)
    # the tie is consistently a tie
    tie = (g_a.abs() < ta) & (g_c.abs() < tc) & (g_v.abs() < tv)
    return torch.where(torch.as_tensor(is_tie, dtype=torch.bool), tie, win)


def aesthetic_score(image_embeds, head):
    """LAION aesthetic predictor: its linear MLP on the L2-normalised CLIP ViT-L/14 image
    embedding (the head was trained on unit vectors). (N, 768) -> (N,), about 1..10"""
    return head(F.normalize(image_embeds.float(), dim=-1)).squeeze(-1)


def clip_score(image_embeds, text_embeds, logit_scale=None):
    """cos(image, text) per row; PickScore multiplies it by exp(logit_scale) (Kirstain et al.
    2023). (N, D), (N, D) -> (N,)"""
    cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    if logit_scale is None:
        return cosine
    return logit_scale.float().exp() * cosine


# ----------------------------------------------------------------------------- scorers
def load_aesthetic_head(src):
    """LAION aesthetic head from its .pth (a file, a folder or hub repo holding one .pth, or hub
    "owner/repo/file.pth"): Linears at `layers.{0,2,4,6,7}`, Dropouts between, no activations.
    Dropout is the identity at eval, so the Linears alone, in order, are the head."""
    if not os.path.isfile(src):
        src = find_head_file(src)
    state = torch.load(src, map_location="cpu", weights_only=True)
    weights = [k for k in state if k.startswith("layers.") and k.endswith(".weight")]
    layer_ids = sorted(int(k.split(".")[1]) for k in weights)
    linears = []
    for i in layer_ids:
        linear = torch.nn.Linear(*state[f"layers.{i}.weight"].T.shape)
        linear.weight.data.copy_(state[f"layers.{i}.weight"])
        linear.bias.data.copy_(state[f"layers.{i}.bias"])
        linears.append(linear)
    return torch.nn.Sequential(*linears).eval()


def find_head_file(src):
    from huggingface_hub import hf_hub_download, snapshot_download
    if src.startswith(("/", ".", "~")) and not os.path.isdir(src):
        raise FileNotFoundError(f"no file or folder {src}")
    if not os.path.isdir(src) and src.count("/") >= 2:
        parts = src.split("/")
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    folder = src if os.path.isdir(src) else snapshot_download(src, allow_patterns=["*.pth"])
    found = sorted(glob.glob(os.path.join(folder, "*.pth")))
    if len(found) != 1:
        raise ValueError(f"expected exactly one .pth aesthetic head in {src}, found {found}")
    return found[0]


def vqa_score(vlm, processor, question, images, captions):
    """VQAScore: P("Yes") of the first answer token, softmax over the whole vocabulary. -> (N,)"""
    tokenizer = processor.tokenizer
    # BLIP-2's VQA prompt format
    # capped: InstructBLIP's Q-Former reads at most 512 BERT tokens, and a batch that fails
    # would fail again on every --resume
    prompts = [f"Question: {question.format(caption=c[:1000])} Answer:" for c in captions]
    # decoder-only LMs continue after the last position: pad left. T5-style encoders: pad right,
    # as left pads (which land after the image tokens) would shift the text's relative positions
    text_config = getattr(vlm.config, "text_config", vlm.config)
    tokenizer.padding_side = "right" if text_config.is_encoder_decoder else "left"
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    # BatchFeature.to casts the float tensors only
    inputs = inputs.to(device=vlm.device, dtype=vlm.dtype)
    out = vlm.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    yes = tokenizer("Yes", add_special_tokens=False).input_ids[0]
    return out.logits[0].float().softmax(-1)[:, yes]  # (N,) in [0, 1]


def load_scorers(cfg, device):
    """-> score(images: list of PIL, captions) -> {aesthetic, clip, vqa}: per-image arrays (N,)."""
    if cfg.scorers == "tiny":
        return tiny_world_scorer
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPModel,
                              CLIPVisionModelWithProjection)
    try:
        head = load_aesthetic_head(cfg.aesthetic_mlp).to(device)  # fp32: a tiny head
    except (OSError, ValueError) as error:
        fail(f"--aesthetic_mlp {cfg.aesthetic_mlp}: {error_line(error)}")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        aesthetic_processor = AutoProcessor.from_pretrained(cfg.aesthetic_clip)
        clip_processor = AutoProcessor.from_pretrained(cfg.clip_model)
        vqa_processor = AutoProcessor.from_pretrained(cfg.vqa_model)
        vision = CLIPVisionModelWithProjection.from_pretrained(cfg.aesthetic_clip, dtype=dtype)
        clip = CLIPModel.from_pretrained(cfg.clip_model, dtype=dtype)
        vlm = AutoModelForImageTextToText.from_pretrained(cfg.vqa_model, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"cannot load a scorer ({error_line(error)}): check --aesthetic_clip, "
             "--clip_model and --vqa_model")
    vision = vision.to(device).eval()
    clip = clip.to(device).eval()
    vlm = vlm.to(device).eval()

    @torch.no_grad()
    def score_images(images, captions):
        pixels = aesthetic_processor(images=images, return_tensors="pt").pixel_values
        embeds = vision(pixel_values=pixels.to(device, dtype)).image_embeds  # (N, 768)
        inputs = clip_processor(text=captions, images=images, return_tensors="pt", padding=True,
                                truncation=True)
        # BatchFeature.to casts the float tensors only
        out = clip(**inputs.to(device=device, dtype=dtype))
        yes = vqa_score(vlm, vqa_processor, cfg.vqa_question, images, captions)
        return {"aesthetic": aesthetic_score(embeds, head).cpu().numpy(),
                "clip": clip_score(out.image_embeds, out.text_embeds).cpu().numpy(),
                "vqa": yes.cpu().numpy()}
    return score_images


def tiny_world_scorer(images, captions):
    """The tiny world's judge: its aesthetic, clip and vqa sub-scores (no real models needed)."""
    from tiny.world import judge_scores
    scores = judge_scores(images, captions)
    return {key: scores[key] for key in SCORES}


# ----------------------------------------------------------------------------- data
PICKAPIC_COLUMNS = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label",
                    "are_different"}


def load_pairs(path, split):
    """A Pick-a-Pic-schema split: hub id, load_dataset folder, save_to_disk folder or parquet."""
    path = os.path.join(ROOT, path) if path.startswith("tiny/") else path
    try:
        pairs = read_split(path, split)
    except (FileNotFoundError, ValueError, KeyError) as error:  # incl. DatasetNotFoundError
        fail(f"cannot load split {split!r} of --data {path} ({error_line(error)}): check "
             "--data and --split")
    missing = sorted(PICKAPIC_COLUMNS - set(pairs.features))
    if missing:
        fail(f"--data {path} [{split}] lacks the Pick-a-Pic columns {missing}")
    caption_type = getattr(pairs.features["caption"], "dtype", None)
    if caption_type not in ("string", "large_string"):
        fail(f"--data {path}: its caption column holds {caption_type}, not strings")
    return pairs


def read_split(path, split):
    saved = [os.path.join(path, f) for f in ("dataset_dict.json", "state.json")]
    if any(os.path.isfile(f) for f in saved):  # a save_to_disk folder
        pairs = load_from_disk(path)
        return pairs[split] if isinstance(pairs, DatasetDict) else pairs
    if os.path.isfile(path):  # one parquet file
        return load_dataset("parquet", data_files=path, split="train")
    return load_dataset(path, split=split)  # a hub id or a load_dataset folder


def error_line(error):
    """An exception as `Type: its first line` (200 characters at most): a scorer's load error."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


@dataclass
class PairLabels:
    """Per dataset row, numpy (N,) each."""
    labelled: np.ndarray  # has_label, and the labels sum to > 0
    usable: np.ndarray  # labelled, with two different images
    is_tie: np.ndarray  # label_0 == label_1
    label_0: np.ndarray
    label_1: np.ndarray


def pair_labels(pairs):
    columns = ["label_0", "label_1", "has_label", "are_different"]
    table = pairs.select_columns(columns).with_format("numpy")[:]
    label_0 = table["label_0"].astype(np.float64)
    label_1 = table["label_1"].astype(np.float64)
    total = label_0 + label_1
    labelled = table["has_label"].astype(bool) & np.isfinite(total) & (total > 0)
    usable = labelled & table["are_different"].astype(bool)
    return PairLabels(labelled, usable, label_0 == label_1, label_0, label_1)


def decode(jpeg):
    """A Pick-a-Pic image cell (bytes, {"bytes": ...} or PIL) -> RGB PIL, or None if broken."""
    if isinstance(jpeg, Image.Image):
        return jpeg.convert("RGB")
    if isinstance(jpeg, dict):
        jpeg = jpeg["bytes"]
    try:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")
    except (OSError, ValueError, TypeError):  # a broken row must not stop a day-long run: count it
        return None



# ----------------------------------------------------------------------------- the two steps
# different_flag: 1 win-lose, 0 tie, -1 unlabelled;
# status: ok | unreadable | no_label | identical | unscored
HEADER = "index,different_flag,aesthetic_gap,clip_gap,vqa_gap,status\n"


def repair_parts(out):
    """A run killed mid-write leaves half a line at a part's end: cut it."""
    for path in glob.glob(os.path.join(out, "gaps.part*.csv")):
        with open(path, "rb+") as part:
            part.truncate(part.read().rfind(b"\n") + 1)


def read_parts(out):
    """All ranks' scored rows so far, one per dataset index (the last one written)."""
    parts = sorted(glob.glob(os.path.join(out, "gaps.part*.csv")))
    # a part of size 0: its rank was killed before the header reached the disk
    tables = [pd.read_csv(path) for path in parts if os.path.getsize(path)]
    if not tables:
        tables = [pd.DataFrame(columns=HEADER.strip().split(","))]
    rows = pd.concat(tables).drop_duplicates("index", keep="last")
    return rows.set_index("index")


def score_batch(scorer, rows, label_0, label_1):
    """Gaps (B, 3) of one batch of rows, NaN where an image cannot be decoded; decoded (B,)."""
    images_0 = [decode(x) for x in rows["jpg_0"]]
    images_1 = [decode(x) for x in rows["jpg_1"]]
    decoded = np.array([a is not None and b is not None for a, b in zip(images_0, images_1)])
    gaps = np.full((len(decoded), 3), np.nan)  # (B, 3)
    picked = np.flatnonzero(decoded)  # (m,)
    if len(picked) == 0:
        return gaps, decoded
    captions = [rows["caption"][k] for k in picked]
    images = [images_0[k] for k in picked] + [images_1[k] for k in picked]
    # one scorer call on 2m images: the m images 0, then the m images 1
    scores = scorer(images, captions + captions)
    for column, key in enumerate(SCORES):
        per_image = np.asarray(scores[key], dtype=np.float64)  # (2m,)
        scores_0 = per_image[:len(picked)]
        scores_1 = per_image[len(picked):]
        gap = pair_gaps(scores_0, scores_1, label_0[picked], label_1[picked])
        gaps[picked, column] = gap.numpy()
    return gaps, decoded


def part_line(index, is_tie, gaps, decoded):
    aes, clip, vqa = gaps
    status = "ok" if decoded else "unreadable"
    return f"{index},{int(not is_tie)},{aes!r},{clip!r},{vqa!r},{status}\n"


def score(cfg, pairs, rank, world, device):
    """Append this rank's share of the unscored rows to its part file; rank 0 merges the parts."""
    if rank == 0:
        repair_parts(cfg.out)
    barrier()
    done = set(read_parts(cfg.out).index.astype(int))
    barrier()  # every rank has read the parts before any rank appends to them
    labels = pair_labels(pairs)
    num_rows = min(len(pairs), cfg.max_pairs or len(pairs))
    todo = [i for i in range(num_rows) if labels.usable[i] and i not in done]
    mine = todo[rank::world]
    scorer = load_scorers(cfg, device)
    images = pairs.select_columns(["caption", "jpg_0", "jpg_1"])
    unreadable = 0
    start = time.time()
    with open(os.path.join(cfg.out, f"gaps.part{rank}.csv"), "a") as part:
        if part.tell() == 0:
            part.write(HEADER)
        batches = range(0, len(mine), cfg.batch_size)
        for batch_number, first in enumerate(tqdm(batches, disable=rank != 0, desc="mpcf score")):
            index = mine[first:first + cfg.batch_size]
            label_0 = labels.label_0[index]
            label_1 = labels.label_1[index]
            gaps, decoded = score_batch(scorer, images[index], label_0, label_1)
            for i, row_gaps, ok in zip(index, gaps.tolist(), decoded):
                part.write(part_line(i, labels.is_tie[i], row_gaps, ok))
            part.flush()
            # on disk: a killed run loses at most the batch in flight
            os.fsync(part.fileno())
            kill_point(f"scored batch {batch_number + 1}")
            unreadable += int((~decoded).sum())
    seconds = round(time.time() - start, 1)
    row = dict(step="score", rank=rank, pairs=len(mine), unreadable=unreadable, seconds=seconds)
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), row)
    # a rank that finished early waits here for the slowest one (--dist_timeout)
    barrier()
    if rank == 0:
        merge_parts(cfg, labels)


def merge_parts(cfg, labels):
    """OUT/gaps.csv: one row per dataset row, in dataset order; prints the rows by status."""
    num_rows = len(labels.usable)
    scored = read_parts(cfg.out).reindex(np.arange(num_rows))
    table = pd.DataFrame({"index": np.arange(num_rows)})
    table["different_flag"] = np.where(labels.labelled, ~labels.is_tie, -1).astype(int)
    for column in GAP_COLS:
        table[column] = scored[column].to_numpy(dtype=np.float64)
    status = np.where(labels.usable, scored["status"].fillna("unscored"), "identical")
    table["status"] = np.where(labels.labelled, status, "no_label")
    write_text(cfg.gaps, table.to_csv(index=False))
    counts = table["status"].value_counts().to_dict()
    print(f"mpcf score -> {cfg.gaps}: rows by status {counts}")


def read_gaps(path, num_rows):
    """The (N, 3) gaps of a CSV or parquet file, row-aligned with the split (by `index` if any)."""
    try:
        table = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        fail(f"--gaps {path}: cannot read it ({error_line(error)})")
    missing = [c for c in GAP_COLS if c not in table.columns]
    if missing:
        fail(f"--gaps {path} lacks the gap columns {missing}")
    if "index" in table.columns:
        table = table.sort_values("index")
        index = table["index"].to_numpy()
        if len(index) == 0:
            fail(f"--gaps {path} has no rows")
        if not np.array_equal(index, np.arange(num_rows)):
            fail(f"--gaps {path}: its index column holds {len(index)} values in "
                 f"[{index.min()}, {index.max()}] but the split has rows 0..{num_rows - 1}: "
                 "not row-aligned, refusing it")
    elif len(table) != num_rows:
        fail(f"--gaps {path} has {len(table)} rows but the split has {num_rows}: not row-aligned, "
             "refusing it")
    try:
        return table[list(GAP_COLS)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        fail(f"--gaps {path}: its gap columns hold something else than numbers")


def filter_counts(labels, keep, gaps):
    """What filter prints and logs: pairs and ties, kept and all, and the rows it drops."""
    win_lose = labels.usable & ~labels.is_tie
    ties = labels.usable & labels.is_tie
    scored = np.isfinite(gaps).all(1)
    return dict(win_lose=int(win_lose.sum()), win_lose_kept=int((keep & win_lose).sum()),
                ties=int(ties.sum()), ties_kept=int((keep & ties).sum()),
                no_label=int((~labels.labelled).sum()),
                identical=int((labels.labelled & ~labels.usable).sum()),
                unscored=int((labels.usable & ~scored).sum()))


def filter_pairs(cfg, pairs):
    """Apply the MPCF rule to the gaps: OUT/keep.json, the log row, the printed counts."""
    labels = pair_labels(pairs)
    gaps = read_gaps(cfg.gaps, len(pairs))  # (N, 3)
    bounds = rule_bounds(cfg)
    gap_a, gap_c, gap_v = torch.from_numpy(gaps).T
    rule = mpcf_keep(gap_a, gap_c, gap_v, torch.from_numpy(labels.is_tie), bounds=bounds)
    keep = labels.usable & rule.numpy()  # (N,)
    counts = filter_counts(labels, keep, gaps)
    kept = np.flatnonzero(keep).tolist()
    path = os.path.join(cfg.out, "keep.json")
    write_text(path, json.dumps(kept))
    if cfg.save_dataset:
        pairs.select(kept).save_to_disk(cfg.save_dataset + ".tmp")
        shutil.rmtree(cfg.save_dataset, ignore_errors=True)
        os.replace(cfg.save_dataset + ".tmp", cfg.save_dataset)
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(step="filter", bounds=bounds, **counts))
    print(f"mpcf filter {bounds}: kept {counts['win_lose_kept']} / {counts['win_lose']} win-lose "
          f"pairs, {counts['ties_kept']} / {counts['ties']} ties ({len(kept)} rows -> {path}); "
          f"dropped {counts['no_label']} without labels, {counts['identical']} identical, "
          f"{counts['unscored']} unscored")
    return counts


# ----------------------------------------------------------------------------- main
def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    # filter alone only rewrites keep.json: rerunning it with other bounds is what it is for
    prepare_run_folder(cfg.out, cfg.resume or cfg.step == "filter")
    pairs = load_pairs(cfg.data, cfg.split)
    if cfg.step != "filter":
        score(cfg, pairs, rank, world, device)
    counts = None
    if cfg.step != "score" and rank == 0:
        counts = filter_pairs(cfg, pairs)
    if dist.is_initialized():
        dist.destroy_process_group()
    return counts


if __name__ == "__main__":
    main(get_config())
