"""Generate paired images from a base model and its tuned version (a LoRA from lpo.py, or a merged
U-Net / SD3 transformer), for eval.py and for looking at.

Image i (a global index) gets prompts[i // seeds_per_prompt] and seed + i; base and tuned share
them and the sampler (SD1.5 / SDXL: DDIM, 20 steps, CFG 5.0, as the evaluation of arXiv
2502.01051v3; SD3: its own flow-matching Euler sampler, 28 steps, CFG 7.0, its pipeline's
defaults), so image i of one is the pair of image i of the other.

    python sample.py --model tiny --lora runs/lpo-tiny        # CPU, ~1 min: 15 captions x 10 seeds
    python sample.py --model tiny --prompt "a red circle" --seeds_per_prompt 8
    python sample.py --model sd15 --lora runs/lpo-sd15      # Pick-a-Pic v1 validation_unique
    python sample.py --model sd15 --unet casiatao/LPO/lpo_sd15_merge/unet   # the released LPO U-Net
    torchrun --nproc_per_node=8 sample.py --model sdxl --unet casiatao/LPO/lpo_sdxl_merge/unet
    python sample.py --model tiny-sd3 --lora runs/lpo-tiny-sd3   # the flow-matching tiny world
    python sample.py --model sd3 --unet runs/lpo-sd3/transformer  # lpo.py --save_merged's MMDiT
    python sample.py --model sd15 --prompts parti.tsv --lora runs/lpo-sd15 --resume  # any prompts

Writes OUT/base/ and OUT/tuned/ (ImageFolder layout: {index:05d}_{seed}.png, metadata.jsonl with
file_name, prompt, seed, index; sampling.json = the settings), log.jsonl and grid.png (base | tuned
side by side, caption under each pair). eval.py scores them. Choices:
- eta 0 (deterministic DDIM) by default; with --eta > 0 the step noise also comes from the image's
  own CPU generator, so pairs still share it, on any GPU, CPU or number of ranks.
- A flow-matching base (SD3) keeps its FlowMatchEulerDiscreteScheduler: the Euler ODE its pipeline
  samples with, so the images are the pipeline's own. It has no eta: --eta > 0 is refused rather
  than silently ignored (LPO's stochastic flow step is a training device, not the evaluated
  sampler). Its T5 prompts are encoded at min(256, tokenizer_3.model_max_length) tokens, the
  length lpo.py and the LRM use, so all three see the same embeddings.
- Unique prompts in first-seen order (a *_unique split is one row per prompt already).
- Ranks take every world-th missing image; PNGs are written atomically, so --resume generates
  only the missing ones (and refuses a folder sampled with other settings). A rerun into a folder
  that holds a run is refused without --resume.
- The VAE decodes one image at a time (enable_slicing): its memory does not grow with
  --batch_size (an fp32 1024 px SDXL decode needs several GB per image).
"""
import argparse
import glob
import json
import os
import time
from dataclasses import asdict, dataclass

import huggingface_hub
import torch
import torch.distributed as dist
from datasets.exceptions import DatasetGenerationError
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, SD3Transformer2DModel,
                       UNet2DConditionModel)
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from runs import (barrier, build_parser, command_line, fail, gather_objects, kill_point, log_jsonl,
                  prepare_run_folder, setup_distributed, write_text)

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "sd15"  # preset: sd15 | sdxl | sd3 | tiny | tiny-xl | tiny-sd3, or a pipeline
    base: str = ""  # base pipeline, folder or hub id ("" = the preset's)
    lora: str = ""  # tuned = base + this LoRA (lpo.py's output folder, diffusers format)
    unet: str = ""  # ... or a merged U-Net (SD3: transformer): folder, or hub "owner/repo/sub/dir"
    vae: str = ""  # VAE for both models instead of the base's (SDXL: the fp16-fix VAE)
    prompts: str = ""  # dataset (hub id / folder) or a .txt / .json / .tsv / .csv / .parquet file
    split: str = "validation_unique"  # split of a --prompts dataset
    prompt: str = ""  # one prompt instead of a prompt set
    num_prompts: int = 0  # first N unique prompts; 0 = all
    seeds_per_prompt: int = 1  # images per prompt (the tiny world's 15 captions need several)
    seed: int = 0  # image i uses seed + i, for base and tuned alike
    num_inference_steps: int = 20  # sampler steps (paper, DDIM: 20; SD3's pipeline: 28)
    guidance_scale: float = 5.0  # classifier-free guidance, the same for both models (paper: 5.0)
    eta: float = 0.0  # DDIM eta; 0 = deterministic (a flow model's Euler sampler has none)
    resolution: int = 0  # image side in pixels; 0 = the pipeline's (denoiser size x VAE factor)
    batch_size: int = 8  # images per forward pass per rank
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    out: str = ""  # run folder; "" = runs/samples/{name of the LoRA or U-Net, or base}
    grid_rows: int = 8  # pairs in grid.png (the first seed of the first prompts)
    grid_cell: int = 256  # pixels per image in grid.png
    resume: bool = False  # continue a killed run: generate only the missing images
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    dist_timeout: int = 180  # minutes a rank may wait at a barrier (torchrun)


# mirrors: pickapic-anonymous/pickapic_v1, or a local copy
PICKAPIC = "yuvalkirstain/pickapic_v1"
# held-out seeds (LPO trains on low ones); one thread: the tiny networks are too small to split
TINY = dict(prompts=os.path.join(ROOT, "tiny/pickapic"), batch_size=50, seeds_per_prompt=10,
            seed=1_000_000, grid_rows=15, grid_cell=128, threads=1)
PRESETS = {
    "sd15": dict(base="stable-diffusion-v1-5/stable-diffusion-v1-5", prompts=PICKAPIC),
    # the SDXL VAE overflows in fp16: the fp16-fix VAE
    "sdxl": dict(base="stabilityai/stable-diffusion-xl-base-1.0", prompts=PICKAPIC, batch_size=4,
                 vae="madebyollin/sdxl-vae-fp16-fix"),
    "tiny": dict(TINY, base=os.path.join(ROOT, "tiny/sd15")),
    "tiny-xl": dict(TINY, base=os.path.join(ROOT, "tiny/sdxl")),
    # SD3's pipeline defaults (28 steps, CFG 7.0): the paper does not give its SD3 sampler
    "sd3": dict(base="stabilityai/stable-diffusion-3-medium-diffusers", prompts=PICKAPIC,
                batch_size=4, num_inference_steps=28, guidance_scale=7.0),
    # 20 steps, CFG 5.0 as the other tiny presets: tiny/make_world.py measured its caption match
    # there (CFG 3 matches more, 7 less; the world's choice)
    "tiny-sd3": dict(TINY, base=os.path.join(ROOT, "tiny/sd3")),
}


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
    check_settings(cfg)
    return cfg


def family_of(model):
    """The preset family a pipeline's name suggests: sd3, sdxl or sd15."""
    name = model.lower()
    if "sd3" in name or "diffusion-3" in name:
        return "sd3"
    return "sdxl" if "xl" in name else "sd15"


def check_settings(cfg):
    """The settings' own sanity (no file is read): one line and exit on the first bad one."""
    if cfg.lora and cfg.unet:
        fail("give --lora or --unet, not both")
    if not cfg.prompt and not cfg.prompts:
        fail("no prompts: give --prompts (a dataset or a file) or --prompt")
    for name in ("num_inference_steps", "seeds_per_prompt", "batch_size", "dist_timeout"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_prompts", "threads", "resolution", "eta"):
        if getattr(cfg, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.dtype not in DTYPES:
        fail(f"--dtype {cfg.dtype}: expected auto, fp16, bf16 or fp32")


# ----------------------------------------------------------------------------- input checks
def findable(path):
    """A local path, or a hub model or dataset repo ("owner/name[/sub/folder]") that the hub or
    its cache has."""
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") < 1:
        return os.path.exists(path)
    repo = "/".join(path.split("/")[:2])
    for kind in ("model", "dataset"):
        try:  # a few small JSON files; works offline from the cache
            huggingface_hub.snapshot_download(repo, repo_type=kind, allow_patterns=["*.json"])
            return True
        except Exception:
            pass
    return False


def lora_error(path):
    """Why path is not a diffusers LoRA (a folder holding one, or its .safetensors), or None.
    Reads the file headers only: a bad --lora is found before anything is sampled."""
    from safetensors import safe_open
    if not os.path.exists(path):
        return None  # a hub id (findable): diffusers checks it when it loads it
    files = [path]
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    preferred = os.path.join(path, "pytorch_lora_weights.safetensors")
    if preferred in files:
        files = [preferred]
    if len(files) == 1:
        try:
            with safe_open(files[0], "pt") as weights:
                if any("lora" in key for key in weights.keys()):
                    return None
        except Exception as error:  # safetensors' own error type: a damaged or foreign file
            return f"--lora {files[0]}: cannot read it ({type(error).__name__}): is it damaged?"
    return (f"--lora {path}: no LoRA there (expected pytorch_lora_weights.safetensors with "
            "lora_A / lora_B weights, as lpo.py saves it)")


def pipeline_sizes(base, index, vae):
    """(the pipeline's own resolution, the multiple every resolution must be) from the configs:
    the VAE's downsampling factor times the denoiser's (U-Net: its down blocks; SD3's MMDiT: its
    patch size)."""
    name, model_class = denoiser_of(index)
    denoiser = model_class.load_config(base, subfolder=name)
    if vae:
        vae_config = AutoencoderKL.load_config(vae)
    else:
        vae_config = AutoencoderKL.load_config(base, subfolder="vae")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if name == "transformer":
        factor = denoiser["patch_size"]
    else:
        factor = 2 ** (len(denoiser["down_block_types"]) - 1)
    return denoiser["sample_size"] * vae_factor, vae_factor * factor


def merged_error(path, index):
    """Why --unet does not hold a denoiser of the base's kind (read from its config), or None."""
    name, model_class = denoiser_of(index)
    folder, subfolder = denoiser_location(path, name)
    try:
        config = model_class.load_config(folder, subfolder=subfolder)
    except (OSError, ValueError) as error:
        return (f"--unet {path}: no {name} config.json there ({type(error).__name__}); the "
                f"base's denoiser is a {model_class.__name__}")
    if config.get("_class_name") != model_class.__name__:
        return (f"--unet {path} holds a {config.get('_class_name')}, but the base's denoiser is "
                f"a {model_class.__name__}: pass lpo.py --save_merged's {name}/ folder")
    return None


def check_sampling_inputs(cfg):
    """Bad input found from files and configs alone (nothing heavy is loaded): raises ValueError
    with a one-line message. Fills in --resolution 0 and --out "", and returns the prompts."""
    paths = ["base", "lora", "unet", "vae"] + ([] if cfg.prompt else ["prompts"])
    for name in paths:
        path = getattr(cfg, name)
        if path and not findable(path):
            raise ValueError(f"--{name} {path}: no such local file or folder, and no hub repo of "
                             "that name could be reached")
    error = lora_error(cfg.lora) if cfg.lora else None
    if error:
        raise ValueError(error)
    try:
        index = DiffusionPipeline.load_config(cfg.base)
    except (OSError, ValueError) as error:
        raise ValueError(f"--base {cfg.base}: not a diffusers pipeline "
                         f"({type(error).__name__})") from None
    has_vae = bool((index.get("vae") or [None])[0])
    if os.path.isdir(cfg.base):
        has_vae = has_vae and os.path.isdir(os.path.join(cfg.base, "vae"))
    if not (has_vae or cfg.vae):
        raise ValueError(f"--base {cfg.base} has no VAE: give a whole pipeline, or --vae")
    sampler = sampler_of(cfg.base)
    if cfg.eta and sampler != "DDIMScheduler":
        raise ValueError(f"--eta {cfg.eta}: {cfg.base} samples with its {sampler}, the "
                         "deterministic Euler ODE of its flow, which has no eta: pass --eta 0")
    error = merged_error(cfg.unet, index) if cfg.unet else None
    if error:
        raise ValueError(error)
    try:
        native, multiple = pipeline_sizes(cfg.base, index, cfg.vae)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--base {cfg.base}: cannot read its denoiser and VAE configs "
                         f"({type(error).__name__})") from None
    cfg.resolution = cfg.resolution or native
    if cfg.resolution % multiple:
        raise ValueError(f"--resolution {cfg.resolution}: this pipeline makes images whose side is "
                         f"a multiple of {multiple} (its own: {native}; 0 picks it)")
    cfg.out = cfg.out or default_out(cfg)
    if cfg.resume:
        check_resumable(cfg)
    if cfg.prompt:
        return [cfg.prompt]
    return load_prompts(cfg.prompts, cfg.split, cfg.num_prompts)


def default_out(cfg):
    """runs/samples/{name}: the LoRA folder's name, the merged denoiser's repo/folder name, or
    base."""
    parts = (cfg.lora or cfg.unet or "base").rstrip("/").split("/")
    names = [part for part in parts if part not in ("unet", "transformer", ".")]
    return os.path.join("runs", "samples", names[-1] if names else "base")


# ----------------------------------------------------------------------------- prompts and images
TABLE_FORMATS = {"csv": "csv", "tsv": "csv", "parquet": "parquet", "jsonl": "json",
                 "arrow": "arrow"}


def load_prompts(source, split="validation_unique", limit=0):
    """Unique prompts, in first-seen order, from a text / JSON / table file or a dataset split;
    ValueError naming the problem when none can be read."""
    try:
        if source.endswith(".txt"):
            with open(source) as file:
                prompts = [line.strip() for line in file]
        elif source.endswith(".json"):
            prompts = json_prompts(source)
        else:
            prompts = table_prompts(source, split)
    except (OSError, KeyError, ValueError, DatasetGenerationError) as error:  # a broken file too
        message = str(error).strip().splitlines() or [""]
        raise ValueError(f"--prompts {source} (split {split}): cannot read prompts from it "
                         f"({type(error).__name__}: {message[0][:200]})") from None
    not_text = [p for p in prompts if not isinstance(p, str)]
    if not_text:
        raise ValueError(f"--prompts {source}: the prompts must be text, found "
                         f"{type(not_text[0]).__name__} {not_text[0]!r}")
    prompts = list(dict.fromkeys(p for p in prompts if p.strip()))
    if not prompts:
        raise ValueError(f"--prompts {source}: holds no prompt (every line or row is empty)")
    return prompts[:limit] if limit else prompts


def json_prompts(source):
    """A JSON list of strings (the HPDv2 benchmark prompts) or of {"caption": ...} (the official
    code's 4k training prompts)."""
    with open(source) as file:
        items = json.load(file)
    if not isinstance(items, list):
        raise ValueError("expected a JSON list")
    return [item["caption"] if isinstance(item, dict) else item for item in items]


def table_prompts(source, split):
    """The caption / prompt / Prompt / text column of a table file or a dataset split."""
    from datasets import load_dataset, load_from_disk
    extension = source.rsplit(".", 1)[-1]
    if os.path.isfile(source):  # PartiPrompts is a .tsv with a "Prompt" column
        if extension not in TABLE_FORMATS:
            raise ValueError(f"unknown file type .{extension}: use .txt .json .csv .tsv .parquet")
        options = {"delimiter": "\t"} if extension == "tsv" else {}
        table = load_dataset(TABLE_FORMATS[extension], data_files=source, split="train", **options)
    elif os.path.exists(os.path.join(source, "dataset_dict.json")):  # a save_to_disk folder
        table = load_from_disk(source)[split]
    else:  # hub ids stream: only this split's captions are read, not the 500k train images
        table = load_dataset(source, split=split, streaming=not os.path.isdir(source))
    names = table.column_names or []
    column = next((c for c in ("caption", "prompt", "Prompt", "text") if c in names), None)
    if column is None:
        raise ValueError(f"no caption / prompt / Prompt / text column in {names}")
    return [row[column] for row in table.select_columns([column])]


def file_name(index, seed):
    return f"{index:05d}_{seed}.png"


def save_png(image, path):
    """Atomic: a killed run never leaves half an image for --resume to keep."""
    image.save(path + ".tmp", format="PNG")
    kill_point("mid " + "/".join(path.split(os.sep)[-2:]))
    os.replace(path + ".tmp", path)


def make_grid(columns, captions, cell=256, notes=None, per_row=2):
    """columns: {"base": [PIL], "tuned": [PIL]} -> one image: per_row pairs side by side per row,
    caption under each pair; notes: optional {"base": [str], ...} printed on each image."""
    font = ImageFont.load_default(size=max(10, cell // 16))
    head = cell // 8
    foot = cell // 6
    gap = max(2, cell // 32)
    count = len(captions)
    block = len(columns) * (cell + gap) + 4 * gap  # one pair and a margin
    per_row = max(1, min(per_row, count))
    rows = -(-count // per_row)
    grid = Image.new("RGB", (per_row * block - 5 * gap, head + rows * (cell + foot)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(count):
        left = (r % per_row) * block
        top = head + (r // per_row) * (cell + foot)
        for c, (name, images) in enumerate(columns.items()):
            x = left + c * (cell + gap)
            if r < per_row:
                draw.text((x + cell // 2, head // 2), name, fill="black", font=font, anchor="mm")
            # small images (the tiny world's 32 px) are enlarged with crisp pixels
            image = images[r].convert("RGB")
            method = Image.NEAREST if image.width < cell else Image.LANCZOS
            grid.paste(image.resize((cell, cell), method), (x, top))
            if notes:
                draw.text((x + 3, top + 2), notes[name][r], fill="black", font=font,
                          stroke_width=1, stroke_fill="white")
        caption = captions[r]
        while len(caption) > 8 and draw.textlength(caption, font=font) > block - 8 * gap:
            caption = caption[:-4] + "..."
        draw.text((left + 4, top + cell + 2), caption, fill="black", font=font)
    return grid


# ----------------------------------------------------------------------------- models
DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


FLOW_SAMPLER = "FlowMatchEulerDiscreteScheduler"
# SD3's pipeline encodes T5 prompts at 256 tokens by default; a shorter tokenizer (the tiny
# world's) caps it, as everywhere in this repository
T5_TOKENS = 256


def denoiser_of(index):
    """(component name, class) of a pipeline's denoiser, from its model_index.json: SD1.5 / SDXL's
    U-Net, or SD3's MMDiT."""
    if (index.get("transformer") or [None])[0]:
        return "transformer", SD3Transformer2DModel
    return "unet", UNet2DConditionModel


def sampler_of(base):
    """The scheduler sample.py samples `base` with: a flow-matching base (SD3) keeps its own Euler
    sampler (the ODE its pipeline runs); SD1.5 and SDXL get DDIM (the paper's evaluation)."""
    scheduler = DiffusionPipeline.load_config(base).get("scheduler") or [None, None]
    return FLOW_SAMPLER if scheduler[1] == FLOW_SAMPLER else "DDIMScheduler"


def load_pipeline(cfg, device, dtype):
    """The base pipeline (DiffusionPipeline picks SD1.5's, SDXL's or SD3's class) with the sampler
    of sampler_of."""
    index = DiffusionPipeline.load_config(cfg.base)
    options = {}
    if "safety_checker" in index:
        options = dict(safety_checker=None, requires_safety_checker=False)
    if cfg.vae:
        options["vae"] = AutoencoderKL.from_pretrained(cfg.vae, dtype=dtype)
    pipe = DiffusionPipeline.from_pretrained(cfg.base, dtype=dtype, **options)
    if sampler_of(cfg.base) == "DDIMScheduler":
        # one sampler for every U-Net: DDIM on the base's own betas (leading spacing, steps_offset
        # 1); no x0 clipping to [-1, 1] (a pixel-space default: SD latents are wider than that)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    # the VAE decodes one image at a time: its memory does not grow with the batch
    pipe.vae.enable_slicing()
    return pipe.to(device)


def t5_length(pipe):
    """SD3's T5 sequence length: min(256, the T5 tokenizer's own maximum)."""
    tokenizer = getattr(pipe, "tokenizer_3", None)
    if tokenizer is None:  # an SD3 pipeline loaded without T5: the pipeline's zeros
        return T5_TOKENS
    return min(T5_TOKENS, tokenizer.model_max_length)


def sampler_options(pipe, cfg):
    """The pipeline-call options of each family: DDIM's eta; SD3's T5 sequence length."""
    if isinstance(pipe.scheduler, DDIMScheduler):
        return dict(eta=cfg.eta)
    return dict(max_sequence_length=t5_length(pipe))


def denoiser_location(path, name):
    """(folder or repo, subfolder) of a merged denoiser: its own folder, a folder holding
    {name}/ (a pipeline, or lpo.py's run folder), or hub "owner/repo[/sub/folder]"."""
    if os.path.isdir(path):
        inside = os.path.exists(os.path.join(path, name, "config.json"))
        subfolder = name if inside else None
        return path, subfolder
    parts = path.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or name


def load_denoiser(path, index, dtype):
    """A merged U-Net or SD3 transformer (the base's kind), from denoiser_location(path)."""
    name, model_class = denoiser_of(index)
    folder, subfolder = denoiser_location(path, name)
    return model_class.from_pretrained(folder, subfolder=subfolder, dtype=dtype)


# ----------------------------------------------------------------------------- sampling
def sampling_settings(cfg):
    """sampling.json: what makes two folders comparable (eval.py refuses pairs sampled otherwise)
    and what --resume must find unchanged."""
    return dict(base=cfg.base, tuned=None, vae=cfg.vae or None, scheduler=sampler_of(cfg.base),
                num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                eta=cfg.eta, resolution=cfg.resolution, dtype=cfg.dtype,
                prompts=cfg.prompt or cfg.prompts, split=cfg.split, num_prompts=cfg.num_prompts,
                seeds_per_prompt=cfg.seeds_per_prompt, seed=cfg.seed)


def check_resumable(cfg):
    """--resume into folders sampled with other settings would mix images: ValueError."""
    settings = sampling_settings(cfg)
    for side in ("base", "tuned"):
        path = os.path.join(cfg.out, side, "sampling.json")
        if not os.path.exists(path):
            continue
        with open(path) as file:
            old = json.load(file)
        if side == "tuned":
            settings["tuned"] = cfg.lora or cfg.unet
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise ValueError(f"--resume: {path} holds other settings ({', '.join(changed)}): "
                             "pass the same ones, or another --out")


@torch.no_grad()
def sample_folder(pipe, jobs, folder, settings, cfg, rank, world):
    """Generate jobs [(index, prompt, seed)] into folder, sharded over ranks: each index once."""
    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        for leftover in glob.glob(os.path.join(folder, "*.tmp")):
            os.remove(leftover)  # a write that a kill cut short
        write_text(os.path.join(folder, "sampling.json"), json.dumps(settings, indent=2))
    barrier()
    on_disk = set(os.listdir(folder))
    todo = [(i, prompt, seed) for i, prompt, seed in jobs if file_name(i, seed) not in on_disk]
    barrier()  # every rank has listed the folder before anyone writes to it
    mine = todo[rank::world]
    start = time.time()
    batches = range(0, len(mine), cfg.batch_size)
    for first in tqdm(batches, disable=rank != 0, desc=os.path.basename(folder)):
        batch = mine[first:first + cfg.batch_size]
        # one noise stream per image: its pixels do not depend on the batch or the rank
        generators = [torch.Generator().manual_seed(seed) for _, _, seed in batch]
        prompts = [prompt for _, prompt, _ in batch]
        images = pipe(prompts, generator=generators, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, height=cfg.resolution,
                      width=cfg.resolution, **sampler_options(pipe, cfg)).images
        for (index, _, seed), image in zip(batch, images):
            save_png(image, os.path.join(folder, file_name(index, seed)))
    done = gather_objects([index for index, _, _ in mine])
    if rank == 0:
        generated = sorted(index for part in done for index in part)
        # todo = jobs minus the images on disk: every index exactly once, none missing
        assert generated == sorted(job[0] for job in todo), f"{folder}: sharding lost an image"
        per_prompt = cfg.seeds_per_prompt
        rows = [dict(file_name=file_name(index, seed), prompt=prompt, seed=seed, index=index,
                     prompt_index=index // per_prompt) for index, prompt, seed in jobs]
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        write_text(os.path.join(folder, "metadata.jsonl"), lines)
        row = dict(folder=os.path.basename(folder), images=len(jobs), generated=len(generated),
                   per_rank=[len(part) for part in done], seconds=round(time.time() - start, 2))
        log_jsonl(os.path.join(os.path.dirname(folder), "log.jsonl"), row)
    barrier()


def sample_models(cfg, prompts, rank, world, device):
    """Base images into OUT/base, tuned ones (with --lora or --unet) into OUT/tuned.
    -> (base folder, tuned folder or None)"""
    per_prompt = cfg.seeds_per_prompt
    # the global image list: index i -> (i, prompt i // per_prompt, seed + i)
    count = len(prompts) * per_prompt
    jobs = [(i, prompts[i // per_prompt], cfg.seed + i) for i in range(count)]
    dtype = torch_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg, device, dtype)
    settings = sampling_settings(cfg)
    if rank == 0:
        print(f"{len(prompts)} prompts x {per_prompt} seeds = {count} images per model on {world} "
              f"rank(s): {settings['scheduler']} {cfg.num_inference_steps} steps, "
              f"CFG {cfg.guidance_scale}, eta {cfg.eta}, {cfg.resolution} px", flush=True)
    base_dir = os.path.join(cfg.out, "base")
    sample_folder(pipe, jobs, base_dir, settings, cfg, rank, world)
    if not (cfg.lora or cfg.unet):
        return base_dir, None
    # base -> tuned in place: the diffusers way for a LoRA (SD3: transformer_lora_layers), or
    # swap in a merged denoiser (pipe.unet, or SD3's pipe.transformer)
    if cfg.lora:
        pipe.load_lora_weights(cfg.lora)
    else:
        index = DiffusionPipeline.load_config(cfg.base)
        denoiser = load_denoiser(cfg.unet, index, dtype).to(device)
        setattr(pipe, denoiser_of(index)[0], denoiser)
    tuned_dir = os.path.join(cfg.out, "tuned")
    settings["tuned"] = cfg.lora or cfg.unet
    sample_folder(pipe, jobs, tuned_dir, settings, cfg, rank, world)
    return base_dir, tuned_dir


def read_metadata(folder):
    """metadata.jsonl rows of a sample folder."""
    with open(os.path.join(folder, "metadata.jsonl")) as file:
        return [json.loads(line) for line in file if line.strip()]


def folder_grid(folders, cfg):
    """grid.png: the first seed of the first grid_rows prompts (so each row is another prompt)."""
    rows = read_metadata(next(iter(folders.values())))
    first_of_prompt = {}
    for row in rows:
        first_of_prompt.setdefault(row["prompt"], row)
    picks = list(first_of_prompt.values())[:cfg.grid_rows]
    columns = {}
    for name, folder in folders.items():
        columns[name] = [Image.open(os.path.join(folder, row["file_name"])) for row in picks]
    return make_grid(columns, [row["prompt"] for row in picks], cfg.grid_cell)


# ----------------------------------------------------------------------------- main
def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        prompts = check_sampling_inputs(cfg)
    except ValueError as error:
        fail(error)
    rank, world, device = setup_distributed(cfg.dist_timeout)
    prepare_run_folder(cfg.out, cfg.resume)
    base_dir, tuned_dir = sample_models(cfg, prompts, rank, world, device)
    if rank == 0:
        folders = {"base": base_dir}
        if tuned_dir:
            folders["tuned"] = tuned_dir
        grid_path = os.path.join(cfg.out, "grid.png")
        save_png(folder_grid(folders, cfg), grid_path)
        print(f"wrote {', '.join(folders.values())} and {grid_path}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_config())
