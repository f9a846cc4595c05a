"""Generate paired images from a base model and its tuned version (a LoRA from lpo.py, or a merged
U-Net / SD3 transformer), for eval.py and for looking at. Image i (a global index) gets
prompts[i // seeds_per_prompt], seed + i and its own CPU generator in both models, which sample
alike (SD1.5 / SDXL: DDIM, 20 steps, CFG 5.0, as the evaluation of arXiv 2502.01051v3; SD3: its
pipeline's flow-matching Euler sampler, 28 steps, CFG 7.0), so image i of one is the pair of
image i of the other, on any device or number of ranks.

    python sample.py --model tiny --lora runs/lpo-tiny        # CPU, ~1 min: 15 captions x 10 seeds
    python sample.py --model tiny --prompt "a red circle" --seeds_per_prompt 8
    python sample.py --model sd15 --lora runs/lpo-sd15      # Pick-a-Pic v1 validation_unique
    python sample.py --model sd15 --unet casiatao/LPO/lpo_sd15_merge/unet   # the released LPO U-Net
    torchrun --nproc_per_node=8 sample.py --model sdxl --unet casiatao/LPO/lpo_sdxl_merge/unet
    python sample.py --model tiny-sd3 --lora runs/lpo-tiny-sd3   # the flow-matching tiny world
    python sample.py --model sd3 --unet runs/lpo-sd3/transformer  # lpo.py --save_merged's MMDiT
    python sample.py --model sd15 --prompts parti.tsv --lora runs/lpo-sd15 --resume  # any prompts

Writes OUT/base/ and OUT/tuned/ ({index:05d}_{seed}.png, metadata.jsonl, sampling.json), log.jsonl
and grid.png (base | tuned), atomically: --resume generates only the missing images (never into a
folder sampled with other settings). docs/reference.md describes the files, the sampler and the
resume contract.
"""
import json
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from operator import itemgetter

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import load_prompts
from models import (BASES, DENOISERS, ROOT, check_lora, denoiser_name, denoiser_subfolder, family,
                    geometry, is_flow_matching, load_pipeline, resolve_model, t5_length)
from distributed import barrier, close_distributed, gather_objects, setup_distributed
from runs import (command_line, fail, kill_point, log_jsonl, parse_config, peek, prepare_run_folder,
                  settings_changes, write_or_fail, write_text)


# ----------------------------------------------------------------------------- config
PICKAPIC = "yuvalkirstain/pickapic_v1"  # mirrors: pickapic-anonymous/pickapic_v1, a local copy


@dataclass
class Config:
    model: str = "sd15"  # preset: sd15 | sdxl | sd3 | tiny | tiny-xl | tiny-sd3, or a pipeline
    base: str = ""  # base pipeline, folder or hub id ("" = the preset's)
    lora: str = ""  # tuned = base + this LoRA (lpo.py's output folder, diffusers format)
    unet: str = ""  # ... or a merged U-Net (SD3: transformer): folder, or hub "owner/repo/sub/dir"
    vae: str = ""  # VAE for both models instead of the base's (SDXL: the fp16-fix VAE)
    prompts: str = PICKAPIC  # dataset (hub id / folder) or a .txt / .json / .tsv / .csv / .parquet
    split: str = "validation_unique"  # split of a --prompts dataset
    prompt: str = ""  # one prompt instead of a prompt set
    num_prompts: int = 0  # first N unique prompts, in [0, inf); 0 = all
    seeds_per_prompt: int = 1  # images per prompt in [1, inf) (the tiny world's 15 captions: 10)
    seed: int = 0  # in [0, inf): image i uses seed + i, base and tuned alike (and the bootstrap)
    num_inference_steps: int = 20  # sampler steps in [1, 1000] (paper, DDIM: 20; SD3's: 28)
    guidance_scale: float = 5.0  # classifier-free guidance in [0, inf), both models (paper: 5.0)
    eta: float = 0.0  # DDIM eta in [0, 1]; 0 = deterministic (a flow's Euler sampler has none)
    resolution: int = 0  # image side in px, in [0, inf); 0 = the pipeline's (denoiser x VAE's)
    batch_size: int = 8  # images per forward pass per rank, in [1, inf)
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    out: str = ""  # run folder; "" = runs/samples/{name of the LoRA or U-Net, or base}
    grid_rows: int = 8  # pairs in the grid image, in [1, inf) (the first seed of the first prompts)
    grid_cell: int = 256  # pixels per image in the grid image, in [16, inf)
    resume: bool = False  # continue a killed run: keep the images on disk, make only the missing
    threads: int = 0  # CPU threads for torch in [0, inf); 0 = torch's default
    dist_timeout: int = 180  # minutes in [1, inf) a rank may wait at a barrier (torchrun)


# held-out seeds (LPO trains on low ones); one thread: the tiny networks are too small to split
TINY = dict(prompts=os.path.join(ROOT, "tiny/pickapic"), batch_size=50, seeds_per_prompt=10,
            seed=1_000_000, grid_rows=15, grid_cell=128, threads=1)
PRESETS = {
    "sd15": dict(base=BASES["sd15"]),
    "sdxl": dict(base=BASES["sdxl"], batch_size=4,
                 vae="madebyollin/sdxl-vae-fp16-fix"),  # SDXL's own VAE overflows in fp16
    "sd3": dict(base=BASES["sd3"], batch_size=4, num_inference_steps=28,
                guidance_scale=7.0),  # its pipeline's defaults: the paper gives no SD3 sampler
    **{name: dict(TINY, base=resolve_model(name)) for name in ("tiny", "tiny-xl", "tiny-sd3")},
}
DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def get_config(argv=None):
    return parse_stage(__file__, Config, PRESETS, __doc__, argv)


def parse_stage(stage_file, config_class, presets, doc, argv):
    """The stage's Config: the --model preset's defaults (a pipeline folder or hub id: its
    family's preset), then the command line; then the settings' own sanity (no file is read), one
    line on the first bad one."""
    argv = command_line(stage_file, argv)
    model = peek(argv, "model", config_class.model)
    preset = presets.get(model) or dict(presets[family(model)], base=model)
    cfg = parse_config(config_class, {**asdict(config_class()), **preset}, doc, argv)
    if cfg.lora and cfg.unet:
        fail("give --lora or --unet, not both")
    if cfg.dtype not in DTYPES:
        fail(f"--dtype {cfg.dtype}: expected auto, fp16, bf16 or fp32")
    return cfg


# ----------------------------------------------------------------------------- input checks
def findable(path):
    """A local path, or a hub model or dataset repo ("owner/name[/sub/folder]") that the hub or
    its cache has (a local-looking path, /x/y or ./x/y, is no valid repo id: refused at once)."""
    if os.path.exists(path) or "/" not in path:
        return os.path.exists(path)
    for kind in ("model", "dataset"):
        try:  # a few small JSON files; works offline from the cache
            huggingface_hub.snapshot_download("/".join(path.split("/")[:2]), repo_type=kind,
                                              allow_patterns=["*.json"])
            return True
        except Exception:
            pass
    return False


def merged_location(path, base):
    """(folder or repo, subfolder) of --unet's merged denoiser: its own folder, a folder holding
    {name}/ (a pipeline, or lpo.py's run folder), or hub "owner/repo[/sub/folder]"; refused
    unless its config names a denoiser of the base's kind."""
    name = denoiser_subfolder(base)
    denoiser = DENOISERS[name]
    if os.path.isdir(path):
        folder = path
        subfolder = name if os.path.exists(os.path.join(path, name, "config.json")) else None
    else:
        folder, subfolder = "/".join(path.split("/")[:2]), "/".join(path.split("/")[2:]) or name
    try:
        found = denoiser.load_config(folder, subfolder=subfolder).get("_class_name")
    except (OSError, ValueError):
        found = f"no {name} config.json"
    if found != denoiser.__name__:
        fail(f"--unet {path} holds {found}, where the base's denoiser is a {denoiser.__name__}: "
             f"pass lpo.py --save_merged's {name}/ folder")
    return folder, subfolder


def sampler_of(base):
    """The scheduler class sample.py samples `base` with: a flow-matching base (SD3) keeps its own
    Euler sampler (the ODE its pipeline runs); SD1.5 and SDXL get DDIM (the paper's evaluation)."""
    try:
        if is_flow_matching(DDIMScheduler.load_config(base, subfolder="scheduler")):
            return FlowMatchEulerDiscreteScheduler
    except (OSError, ValueError) as error:
        fail(f"--base {base}: not a diffusers pipeline (no scheduler: {type(error).__name__})")
    return DDIMScheduler


def check_sampling_inputs(cfg):
    """Bad input found from files and configs alone (nothing heavy is loaded): one line. Fills in
    --resolution 0 and --out "" (runs/samples/{name}: the LoRA folder's name, the merged
    denoiser's repo or folder name, or base), and returns the prompts."""
    if not (cfg.prompt or cfg.prompts):
        fail("no prompts: give --prompts (a dataset or a file) or --prompt")
    for name in ("lora", "unet", "vae"):  # --base: geometry reads it; --prompts: load_prompts
        path = getattr(cfg, name)
        if path and not findable(path):
            fail(f"--{name} {path}: no such local file or folder, and no hub repo of that name "
                 "could be reached")
    cfg.resolution = geometry(cfg.base, cfg.resolution, cfg.vae)[0]
    if os.path.exists(cfg.lora):  # a hub id: checked as it loads, below
        check_lora(cfg.lora, cfg.base)
    if cfg.eta and sampler_of(cfg.base) is not DDIMScheduler:
        fail(f"--eta {cfg.eta}: {cfg.base} samples with its FlowMatchEulerDiscreteScheduler, the "
             "deterministic Euler ODE of its flow, which has no eta: pass --eta 0")
    if cfg.unet:
        merged_location(cfg.unet, cfg.base)
    tuned = re.sub("/(unet|transformer)$", "", os.path.abspath(cfg.lora or cfg.unet or "base"))
    cfg.out = cfg.out or os.path.join("runs", "samples", os.path.basename(tuned))
    if cfg.resume:
        check_resumable(cfg)
    return [cfg.prompt] if cfg.prompt else load_prompts(cfg.prompts, cfg.split, cfg.num_prompts)


SAMPLING = ("base", "tuned", "vae", "scheduler", "num_inference_steps", "guidance_scale", "eta",
            "resolution", "dtype", "prompts", "split", "num_prompts", "seeds_per_prompt", "seed")


def sampling_settings(cfg, side):
    """OUT/side/sampling.json, SAMPLING's values: what makes two folders comparable (eval.py
    refuses pairs sampled otherwise) and what --resume must find unchanged; tuned: the LoRA or
    merged denoiser (None in base/), prompts: --prompt or --prompts."""
    values = dict(asdict(cfg), tuned=(cfg.lora or cfg.unet) if side == "tuned" else None,
                  vae=cfg.vae or None, scheduler=sampler_of(cfg.base).__name__,
                  prompts=cfg.prompt or cfg.prompts)
    return {name: values[name] for name in SAMPLING}


def sampler_line(settings):
    """sampling.json's sampler in words: DDIMScheduler 20 steps, CFG 5.0, eta 0.0, 512 px."""
    return ("{scheduler} {num_inference_steps} steps, CFG {guidance_scale}, eta {eta}, "
            "{resolution} px").format_map(defaultdict(lambda: None, settings))


def check_resumable(cfg):
    """--resume into folders sampled with other settings would mix images: refused."""
    for side in ("base", "tuned"):
        path = os.path.join(cfg.out, side, "sampling.json")
        saved = read_json(path)
        changed, _ = settings_changes(saved, sampling_settings(cfg, side), ())
        if saved and changed:
            fail(f"--resume: {path} holds other settings ({', '.join(changed)}): pass the same "
                 "ones, or another --out")


# ----------------------------------------------------------------------------- images
def file_name(index, seed):
    return f"{index:05d}_{seed}.png"


def save_png(image, path):
    """Atomic (a killed run never leaves half an image for --resume to keep) and guarded."""
    def write():
        image.save(path + ".tmp", format="PNG")
        kill_point("mid " + "/".join(path.split(os.sep)[-2:]))
        os.replace(path + ".tmp", path)
    write_or_fail(path, write)


def read_metadata(folder):
    """metadata.jsonl rows of a sample folder, or one line."""
    try:
        with open(os.path.join(folder, "metadata.jsonl")) as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        fail(f"{folder}: no metadata.jsonl (expected a sample.py folder)")


def read_json(path):
    """A JSON file's content ({} without one)."""
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return {}


def make_grid(folders, rows, count, cell=256, notes=None):
    """The first seed (lowest index) of each of the first `count` prompts of metadata `rows`, its
    image in each of folders ({"base": folder, ...}) side by side, two pairs per row, the caption
    under each pair (small images, as the tiny world's 32 px, enlarged with crisp pixels); notes:
    optional {"base": {index: text}, ...} printed on each image."""
    first = {}
    for row in sorted(rows, key=itemgetter("index")):
        first.setdefault(row["prompt"], row)
    rows = list(first.values())[:count]
    head = cell // 8
    foot = cell // 6
    gap = max(2, cell // 32)
    block = len(folders) * (cell + gap) + 4 * gap  # one pair and a margin
    per_row = min(2, len(rows))
    height = head + -(-len(rows) // per_row) * (cell + foot)
    grid = Image.new("RGB", (per_row * block - 5 * gap, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.font = ImageFont.load_default(size=max(10, cell // 16))  # what each text is drawn in
    for r, row in enumerate(rows):
        left = (r % per_row) * block
        top = head + (r // per_row) * (cell + foot)
        for c, (name, folder) in enumerate(folders.items()):
            x = left + c * (cell + gap)
            if r < per_row:
                draw.text((x + cell // 2, head // 2), name, fill="black", anchor="mm")
            image = Image.open(os.path.join(folder, row["file_name"])).convert("RGB")
            method = Image.NEAREST if image.width < cell else Image.LANCZOS
            grid.paste(image.resize((cell, cell), method), (x, top))
            if notes:
                draw.text((x + 3, top + 2), notes[name][row["index"]], fill="black", stroke_width=1,
                          stroke_fill="white")
        caption = row["prompt"]
        while len(caption) > 8 and draw.textlength(caption) > block - 8 * gap:
            caption = caption[:-4] + "..."
        draw.text((left + 4, top + cell + 2), caption, fill="black")
    return grid


# ----------------------------------------------------------------------------- sampling
def torch_dtype(name, device):
    return DTYPES[name] or (torch.float16 if device.type == "cuda" else torch.float32)


@torch.no_grad()
def sample_folder(generate, jobs, side, cfg, rank, world):
    """Generate jobs (metadata.jsonl's rows) into OUT/side with generate(prompts, generator=...),
    sharded over ranks: each index once, with its own noise stream, so its pixels do not depend on
    the batch or the rank. -> folder"""
    folder = os.path.join(cfg.out, side)
    todo = [job for job in jobs if not os.path.exists(os.path.join(folder, job["file_name"]))]
    prepare_run_folder(folder, resume=True)  # (a barrier: all have looked) made, *.tmp removed
    if rank == 0:
        write_text(os.path.join(folder, "sampling.json"),
                   json.dumps(sampling_settings(cfg, side), indent=2))
    barrier()
    mine = todo[rank::world]
    start = time.time()
    for batch in tqdm(DataLoader(mine, cfg.batch_size, collate_fn=list), disable=rank > 0,
                      desc=side):
        generators = [torch.Generator().manual_seed(job["seed"]) for job in batch]
        images = generate([job["prompt"] for job in batch], generator=generators).images
        for job, image in zip(batch, images):
            save_png(image, os.path.join(folder, job["file_name"]))
    per_rank = gather_objects(len(mine))
    if rank == 0:
        write_text(os.path.join(folder, "metadata.jsonl"),
                   "".join(json.dumps(job) + "\n" for job in jobs))
        log_jsonl(os.path.join(cfg.out, "log.jsonl"), dict(
            folder=side, images=len(jobs), generated=sum(per_rank), per_rank=per_rank,
            seconds=round(time.time() - start, 2)))
    barrier()
    return folder


def sample_models(cfg, prompts, rank, world, device):
    """Base images into OUT/base, tuned ones (with --lora or --unet) into OUT/tuned; image i is
    (i, prompt i // seeds_per_prompt, seed + i). A U-Net samples with DDIM on the base's betas,
    without x0 clipping (a pixel-space default: SD latents are wider); tuned = the base with the
    LoRA loaded, or the merged denoiser. -> {"base": folder, "tuned": folder}"""
    per_prompt = cfg.seeds_per_prompt
    jobs = [dict(file_name=file_name(i, cfg.seed + i), prompt=prompts[i // per_prompt],
                 seed=cfg.seed + i, index=i, prompt_index=i // per_prompt)
            for i in range(len(prompts) * per_prompt)]
    dtype = torch_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.base, device, dtype)
    if cfg.vae:
        pipe.vae = AutoencoderKL.from_pretrained(cfg.vae, dtype=dtype).to(device)
    options = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   height=cfg.resolution, width=cfg.resolution)
    if not is_flow_matching(pipe.scheduler.config):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        options["eta"] = cfg.eta
    elif getattr(pipe, "tokenizer_3", None):  # SD3's T5: as long as every SD3 encoding here
        options["max_sequence_length"] = t5_length(pipe.tokenizer_3)
    generate = partial(pipe, **options)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # the VAE decodes one image at a time: its memory does not grow
    if rank == 0:
        print(f"{len(prompts)} prompts x {per_prompt} seeds = {len(jobs)} images per model on "
              f"{world} rank(s): {sampler_line(sampling_settings(cfg, 'base'))}", flush=True)
    folders = {"base": sample_folder(generate, jobs, "base", cfg, rank, world)}
    name = denoiser_name(pipe)
    if cfg.lora:
        pipe.load_lora_weights(cfg.lora)
        if name not in pipe.get_list_adapters():
            fail(f"--lora {cfg.lora}: none of its weights went to {cfg.base}'s denoiser (a LoRA "
                 "of another model family?): the tuned images would be the base's")
    elif cfg.unet:
        folder, subfolder = merged_location(cfg.unet, cfg.base)
        setattr(pipe, name, DENOISERS[name].from_pretrained(folder, subfolder=subfolder,
                                                            dtype=dtype).to(device))
    else:
        return folders
    folders["tuned"] = sample_folder(generate, jobs, "tuned", cfg, rank, world)
    return folders


# ----------------------------------------------------------------------------- main
def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts = check_sampling_inputs(cfg)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    prepare_run_folder(cfg.out, cfg.resume)
    folders = sample_models(cfg, prompts, rank, world, device)
    if rank == 0:
        save_png(make_grid(folders, read_metadata(folders["base"]), cfg.grid_rows, cfg.grid_cell),
                 os.path.join(cfg.out, "grid.png"))
        print(f"wrote {', '.join(folders.values())} and {cfg.out}/grid.png", flush=True)
    close_distributed()


if __name__ == "__main__":
    main(get_config())
