"""Multi-Preference Consistent Filtering (MPCF) of preference pairs: arXiv 2502.01051v3, sec. MPCF.

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
Paper, Pick-a-Pic v1 train: strategy 2 keeps 168,539 of 511,840 win-lose pairs and 8,537 of
71,907 ties; LPO on SD1.5 reaches PickScore 21.69 with them (21.49 without MPCF).

Two steps. `score` (expensive; batched, GPU if present, rows sharded over torchrun ranks, --resume
continues a killed run) writes OUT/gaps.csv, one row per dataset row. `filter` (cheap, may be
rerun) reads it, or any CSV / parquet with the three gap columns, and writes OUT/keep.json, the
kept row indices for `lrm.py --keep`. `all` runs both. Files, log rows, resume: docs/reference.md.

    python mpcf.py --model tiny                        # score + filter the tiny world, CPU ~8 s
    python mpcf.py filter --model tiny --strategy 3    # re-filter only
    torchrun --nproc_per_node 8 mpcf.py score --model sd15 --resume   # Pick-a-Pic v1 train
    python mpcf.py filter --model sd15 --save_dataset runs/mpcf-sd15/pickapic_v1_mpcf
    python mpcf.py filter --model sd15 --gaps precomputed.parquet --bounds=-0.5,0,0,0.2,0.03,0.07

Deviations from the paper's code:
  1. VQA model Salesforce/instructblip-flan-t5-xl, the closest transformers relative of the
     official clip-flan-t5-xxl (not in transformers): gaps, hence counts, will differ a little.
  2. Rows with are_different False (identical images) are dropped and counted.
"""
import glob
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import check_decodable, decode_image, error_line, open_pairs, pair_flags
from distributed import barrier, close_distributed, setup_distributed
from runs import (command_line, fail, first_line, kill_point, log_jsonl, parse_config, peek,
                  prepare_run_folder, write_or_fail, write_text)


@dataclass
class Config:
    model: str = "tiny"  # preset: tiny | tiny-xl | sd15 | sdxl (picks the data and the scorers)
    step: str = "all"  # score | filter | all (also as the first word: `mpcf.py filter`)
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
    batch_size: int = 0  # pairs per scoring batch per rank, in [1, inf) (preset)
    strategy: int = 2  # MPCF strategy 1 | 2 | 3 (the paper uses 2)
    bounds: str = ""  # custom "a,c,v,ta,tc,tv" (win-lose bounds, then tie bounds): over --strategy
    save_dataset: str = ""  # also save the kept rows here (datasets' save_to_disk)
    max_pairs: int = 0  # score only the first N rows, in [0, inf) (smoke runs); 0 = all
    resume: bool = False  # continue a killed score run from its part files
    threads: int = 0  # CPU threads for torch in [0, inf); 0 = torch's default
    dist_timeout: int = 180  # minutes in [1, inf) a rank may wait at a barrier (slowest shard)


TINY = dict(data="tiny/pickapic", scorers="tiny", batch_size=64, threads=1)
REAL = dict(data="yuvalkirstain/pickapic_v1", scorers="real", batch_size=32)
PRESETS = {"tiny": TINY, "tiny-xl": TINY, "sd15": REAL, "sdxl": REAL}  # same data for any base
STEPS = ("score", "filter", "all")


def get_config(argv=None):
    """The Config of a command line; a given --gaps file is only read: scoring never writes it."""
    argv = command_line(__file__, argv)
    if argv and argv[0] in STEPS:  # the step as the first word: `mpcf.py filter ...`
        argv = ["--step", *argv]
    preset = PRESETS.get(peek(argv, "model", Config.model), TINY)  # an unknown one: refused below
    cfg = parse_config(Config, {**asdict(Config()), **preset}, __doc__, argv)
    for name, choices in (("model", PRESETS), ("step", STEPS), ("scorers", ("tiny", "real"))):
        if getattr(cfg, name) not in choices:
            fail(f"--{name} {getattr(cfg, name)}: expected one of {', '.join(choices)}")
    cfg.out = cfg.out or f"runs/mpcf-{cfg.model}"
    if cfg.gaps and cfg.step != "filter":
        fail(f"--gaps {cfg.gaps} is an input of the filter step: run `mpcf.py filter --gaps FILE`")
    cfg.gaps = cfg.gaps or os.path.join(cfg.out, "gaps.csv")
    rule_bounds(cfg)
    if cfg.step == "filter" and not os.path.isfile(cfg.gaps):
        fail(f"no gaps file at {cfg.gaps}: run `python mpcf.py score` first, or pass --gaps FILE")
    return cfg


def rule_bounds(cfg):
    """(a, c, v, ta, tc, tv) of --bounds, else of --strategy."""
    try:
        bounds = STRATEGIES[cfg.strategy] if not cfg.bounds else tuple(
            map(float, cfg.bounds.split(",")))
    except (ValueError, KeyError):
        bounds = ()
    if len(bounds) != 6:
        fail(f"need --strategy 1, 2 or 3, or --bounds=a,c,v,ta,tc,tv (six numbers); got "
             f"--strategy {cfg.strategy}, --bounds {cfg.bounds!r}")
    return bounds


# ----------------------------------------------------------------------------- the method
STRATEGIES = {  # the paper's three strategies differ in the aesthetic bound a only
    1: (0.0, 0.0, 0.0, 0.2, 0.03, 0.07),
    2: (-0.5, 0.0, 0.0, 0.2, 0.03, 0.07),
    3: (-1.0, 0.0, 0.0, 0.2, 0.03, 0.07),
}
GAP_COLS = ("aesthetic_gap", "clip_gap", "vqa_gap")
HEADER = "index,different_flag,aesthetic_gap,clip_gap,vqa_gap,status\n"  # gaps.csv and its parts


def mpcf_keep(aes_gap, clip_gap, vqa_gap, is_tie, strategy=2, bounds=None):
    """MPCF rule (arXiv 2502.01051v3, MPCF section) -> bool (N,). Bounds (a, c, v, ta, tc, tv):
    win-lose lower bounds on G_A, G_C, G_V, then tie bounds on |G_A|, |G_C|, |G_V|. Strict
    inequalities both ways: a win-lose pair exactly on a bound is dropped, and so is a tie exactly
    on one. NaN gaps (unscored) never pass."""
    bounds = np.array(STRATEGIES[strategy] if bounds is None else bounds)  # (6,)
    gaps = np.stack([aes_gap, clip_gap, vqa_gap], -1)  # (N, 3): G_A, G_C, G_V
    win = (gaps > bounds[:3]).all(-1)  # the winner is consistently not worse: G_A > a, ...
    tie = (np.abs(gaps) < bounds[3:]).all(-1)  # consistently a tie: |G_A| < ta, ...
    return np.where(is_tie, tie, win)


def pair_gaps(scores_0, scores_1, label_0, label_1):
    """Winner minus loser of one per-image score; ties (labels equal): image 0 minus image 1.
    (N,) each -> (N,) float64"""
    sign = np.where(np.asarray(label_1) > np.asarray(label_0), -1.0, 1.0)  # (N,)
    return (np.asarray(scores_0, float) - np.asarray(scores_1, float)) * sign  # float64


def aesthetic_score(image_embeds, head):
    """LAION aesthetic predictor: its linear MLP on the L2-normalised CLIP ViT-L/14 image
    embedding (the head was trained on unit vectors). (N, 768) -> (N,), about 1..10"""
    return head(F.normalize(image_embeds.float(), dim=-1)).squeeze(-1)


def clip_score(image_embeds, text_embeds, logit_scale=None):
    """cos(image, text) per row; PickScore multiplies it by exp(logit_scale) (Kirstain et al.
    2023). (N, D), (N, D) -> (N,)"""
    cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return cosine if logit_scale is None else logit_scale.float().exp() * cosine


def vqa_score(vlm, processor, question, images, captions):
    """VQAScore: P("Yes") of the first answer token, softmax over the whole vocabulary. -> (N,)
    BLIP-2's prompt; captions capped (InstructBLIP's Q-Former reads at most 512 BERT tokens, and a
    failing batch would fail on every --resume). Decoder-only LMs: pad left. T5-style encoders: pad
    right, as left pads (after the image tokens) would shift the text's relative positions."""
    prompts = [f"Question: {question.format(caption=c[:1000])} Answer:" for c in captions]
    text_config = vlm.config.get_text_config()  # the VLM's language model
    processor.tokenizer.padding_side = "right" if text_config.is_encoder_decoder else "left"
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(
        device=vlm.device, dtype=vlm.dtype)  # casts the float tensors only
    out = vlm.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    yes = processor.tokenizer("Yes", add_special_tokens=False).input_ids[0]
    return out.logits[0].float().softmax(-1)[:, yes]  # (N,) in [0, 1]


def load_aesthetic_head(src):
    """LAION aesthetic head from its .pth (a file, a folder or hub repo holding one .pth, or hub
    "owner/repo/file.pth"): Linears at `layers.{0,2,4,6,7}`, Dropouts between, no activations.
    Dropout is the identity at eval, so the Linears alone, in order, are the head."""
    from huggingface_hub import hf_hub_download, snapshot_download
    if not os.path.exists(src):  # a hub repo, or a file in one
        if src.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"no file or folder {src}")
        parts = src.split("/", 2)
        src = (hf_hub_download("/".join(parts[:2]), parts[2]) if len(parts) == 3
               else snapshot_download(src, allow_patterns=["*.pth"]))
    if os.path.isdir(src):
        found = sorted(glob.glob(os.path.join(src, "*.pth")))
        if len(found) != 1:
            raise ValueError(f"expected exactly one .pth aesthetic head in {src}, found {found}")
        src = found[0]
    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = [state[key] for key in state if key.startswith("layers.")]  # as saved: w, b, w, ...
    head = torch.nn.Sequential(*(torch.nn.Linear(*weight.T.shape) for weight in tensors[::2]))
    head.load_state_dict(dict(zip(head.state_dict(), tensors)))
    return head.eval()


def clip_scorer(model, processor, head=None, logit_scale=None):
    """-> fn(images, captions) -> (N,): a CLIP model's aesthetic score (`head` given: G_A) or
    clip_score (G_C; PickScore with logit_scale) of its projected image (and caption) embeddings.
    model: a CLIPModel, or with a head a CLIPVisionModelWithProjection; eval.py's columns too."""
    def score(images, captions):
        pixels = processor(images=images, return_tensors="pt").pixel_values
        vision = model.vision_model(pixel_values=pixels.to(model.device, model.dtype))
        image_embeds = model.visual_projection(vision.pooler_output)  # (N, D)
        if head is not None:
            return aesthetic_score(image_embeds, head)
        tokens = processor(text=captions, padding=True, truncation=True, return_tensors="pt")
        text = model.text_model(**tokens.to(model.device))  # input_ids, attention_mask
        return clip_score(image_embeds, model.text_projection(text.pooler_output), logit_scale)
    return score


def load_scorers(cfg, device):
    """-> score(images: list of PIL, captions) -> {aesthetic, clip, vqa}: per-image arrays (N,);
    the tiny world's judge gives its own three sub-scores (no real models needed)."""
    if cfg.scorers == "tiny":
        from tiny.world import judge_scores
        return judge_scores
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPModel,
                              CLIPVisionModelWithProjection)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def load(kind, path):  # a model (from_pretrained leaves it in eval mode) and its processor
        model = kind.from_pretrained(path, dtype=dtype).to(device)
        return model, AutoProcessor.from_pretrained(path)
    try:
        head = load_aesthetic_head(cfg.aesthetic_mlp).to(device)  # fp32: a tiny head
        scorers = dict(
            aesthetic=clip_scorer(*load(CLIPVisionModelWithProjection, cfg.aesthetic_clip), head),
            clip=clip_scorer(*load(CLIPModel, cfg.clip_model)),
            vqa=partial(vqa_score, *load(AutoModelForImageTextToText, cfg.vqa_model),
                        cfg.vqa_question))
    except (OSError, ValueError) as error:
        fail(f"cannot load a scorer ({error_line(error)}): check --aesthetic_mlp, "
             "--aesthetic_clip, --clip_model and --vqa_model")

    @torch.no_grad()
    def score_images(images, captions):
        return {key: scorer(images, captions).cpu().numpy() for key, scorer in scorers.items()}
    return score_images


# ----------------------------------------------------------------------------- the two steps
def score_batch(scorer, rows):
    """Gaps (B, 3) of one batch of rows, NaN where an image cannot be decoded; decoded (B,).
    One scorer call on the 2m decoded pairs' images: the m images 0, then the m images 1."""
    images = [[decode_image(x) for x in rows[column]] for column in ("jpg_0", "jpg_1")]  # (2, B)
    decoded = np.array([None not in pair for pair in zip(*images)])  # (B,)
    picked = np.flatnonzero(decoded)  # (m,)
    gaps = np.full((len(decoded), 3), np.nan)  # (B, 3)
    if len(picked):
        captions = [rows["caption"][k] for k in picked]
        scores = scorer([side[k] for side in images for k in picked], captions + captions)
        labels = np.array([rows["label_0"], rows["label_1"]])[:, picked]  # (2, m)
        for column, key in enumerate(("aesthetic", "clip", "vqa")):  # images 0, then images 1
            gaps[picked, column] = pair_gaps(*np.reshape(scores[key], (2, -1)), *labels)
    return gaps, decoded


def append_lines(path, lines):
    """Append to a part file (its header first), fsync'd: a kill loses at most the batch in
    flight."""
    with open(path, "a") as part:
        part.writelines(([] if part.tell() else [HEADER]) + lines)
        part.flush()
        os.fsync(part.fileno())


def read_parts(out):
    """All ranks' scored rows so far, one per dataset index (the last one written)."""
    tables = [pd.read_csv(path) for path in sorted(glob.glob(os.path.join(out, "gaps.part*.csv")))
              if os.path.getsize(path)]  # 0 bytes: killed before its header reached the disk
    rows = pd.concat(tables) if tables else pd.read_csv(io.StringIO(HEADER))
    return rows.drop_duplicates("index", keep="last").set_index("index")


def score(cfg, pairs, labels, rank, world, device):
    """Append this rank's share of the unscored rows to its part file, then rank 0 merges the parts
    into OUT/gaps.csv, one row per dataset row in dataset order, and prints its rows by status."""
    if rank == 0:  # a run killed mid-write leaves half a line at a part's end: cut it
        for path in glob.glob(os.path.join(cfg.out, "gaps.part*.csv")):
            with open(path, "rb+") as part:
                part.truncate(part.read().rfind(b"\n") + 1)
    barrier()
    done = set(read_parts(cfg.out).index)
    barrier()  # every rank has read the parts before any rank appends to them
    todo = np.flatnonzero(labels.usable[:cfg.max_pairs or None]).tolist()  # the same on all ranks
    mine = sorted(set(todo) - done)[rank::world]
    scorer = load_scorers(cfg, device)
    path = os.path.join(cfg.out, f"gaps.part{rank}.csv")
    unreadable, start = 0, time.time()
    batches = tqdm(range(0, len(mine), cfg.batch_size), disable=rank != 0, desc="mpcf score")
    for number, first in enumerate(batches, 1):
        index = mine[first:first + cfg.batch_size]
        gaps, decoded = score_batch(scorer, pairs[index])
        write_or_fail(path, append_lines, path, [
            f"{i},{int(not labels.is_tie[i])},{aes!r},{clip!r},{vqa!r},"
            f"{'ok' if ok else 'unreadable'}\n"
            for i, (aes, clip, vqa), ok in zip(index, gaps.tolist(), decoded)])
        kill_point(f"scored batch {number}")
        unreadable += int((~decoded).sum())
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(
        step="score", rank=rank, pairs=len(mine), unreadable=unreadable,
        seconds=round(time.time() - start, 1)))
    barrier()  # a rank that finished early waits here for the slowest one (--dist_timeout)
    if rank > 0:
        return
    table = read_parts(cfg.out).reindex(pd.RangeIndex(len(labels.usable), name="index"))
    table["different_flag"] = np.where(labels.labelled, ~labels.is_tie, -1)
    table["status"] = np.select([~labels.labelled, ~labels.different, ~labels.usable],
                                ["no_label", "identical", "blank_caption"],
                                table["status"].fillna("unscored"))
    write_text(cfg.gaps, table.to_csv())
    counts = table["status"].value_counts().to_dict()
    print(f"mpcf score -> {cfg.gaps}: rows by status {counts}")
    unreadable = counts.get("unreadable", 0)
    check_decodable(unreadable, unreadable + counts.get("ok", 0), cfg.data)  # (gaps.csv is kept)


def read_gaps(path, num_rows):
    """The (N, 3) gaps of a CSV or parquet file, row-aligned with the split (by `index` if any)."""
    try:
        table = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
        table = table.set_index("index").sort_index() if "index" in table else table
        gaps = table[list(GAP_COLS)].to_numpy(float)
    except (OSError, ValueError, KeyError, TypeError) as error:  # (UnicodeDecodeError too)
        fail(f"--gaps {path}: cannot read numbers from its columns {', '.join(GAP_COLS)} "
             f"({error_line(error)})")
    if not table.index.equals(pd.RangeIndex(num_rows)):
        fail(f"--gaps {path} has {len(table) or 'no'} rows, not row-aligned with the split's rows "
             f"0..{num_rows - 1} (matched by its index column, else by position)")
    return gaps


def filter_pairs(cfg, pairs, labels):
    """Apply the MPCF rule to the gaps: OUT/keep.json, the log row, the printed counts."""
    gaps = read_gaps(cfg.gaps, len(pairs))  # (N, 3)
    bounds = rule_bounds(cfg)
    usable, tie = labels.usable, labels.is_tie
    keep = usable & mpcf_keep(*gaps.T, tie, bounds=bounds)  # (N,)
    counts = {name: int(rows.sum()) for name, rows in dict(
        win_lose=usable & ~tie, win_lose_kept=keep & ~tie, ties=usable & tie, ties_kept=keep & tie,
        no_label=~labels.labelled, identical=labels.labelled & ~labels.different,
        unscored=usable & ~np.isfinite(gaps).all(1)).items()}
    kept = np.flatnonzero(keep).tolist()
    path = os.path.join(cfg.out, "keep.json")
    write_text(path, json.dumps(kept))
    if cfg.save_dataset:
        pairs.select(kept).save_to_disk(cfg.save_dataset + ".tmp")
        shutil.rmtree(cfg.save_dataset, ignore_errors=True)
        os.replace(cfg.save_dataset + ".tmp", cfg.save_dataset)
    log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(step="filter", bounds=bounds, **counts))
    print("mpcf filter {bounds}: kept {win_lose_kept} / {win_lose} win-lose pairs, {ties_kept} / "
          "{ties} ties ({kept} rows -> {path}); dropped {no_label} without labels, {identical} "
          "identical, {unscored} unscored".format(bounds=bounds, kept=len(kept), path=path,
                                                  **counts))
    return counts


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    prepare_run_folder(cfg.out, cfg.resume or cfg.step == "filter")  # filter may be rerun
    try:  # a Pick-a-Pic-schema split and its flags by the one rule of the stages (data.py)
        pairs = open_pairs(cfg.data, cfg.split)
        labels = pair_flags(pairs, cfg.data, cfg.split)  # labelled, different, usable, is_tie
    except ValueError as error:
        fail(first_line(error))
    if cfg.step != "filter":
        score(cfg, pairs, labels, rank, world, device)
    close_distributed()  # every rank waits for rank 0's gaps.csv
    if cfg.step != "score" and rank == 0:
        return filter_pairs(cfg, pairs, labels)


if __name__ == "__main__":
    main(get_config())
