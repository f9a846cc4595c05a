"""Generate paired images from a base model and its tuned version (LoRA from lpo.py or a merged U-Net).

SPEC.md section 4. Image i (global index) gets prompts[i // seeds_per_prompt] and seed + i; base and
tuned share them and the sampler (DDIM, 20 steps, CFG 5.0), so image i of one is the pair of image i of the other.

    python sample.py --model tiny --lora runs/lpo-tiny                   # CPU, ~1 min: 15 captions x 10 seeds
    python sample.py --model tiny --prompt "a red circle" --seeds-per-prompt 8
    python sample.py --model sd15 --lora runs/lpo-sd15                   # Pick-a-Pic v1 validation_unique (500)
    python sample.py --model sd15 --unet casiatao/LPO/lpo_sd15_merge/unet     # the paper's released LPO U-Net
    torchrun --nproc_per_node=8 sample.py --model sdxl --unet casiatao/LPO/lpo_sdxl_merge/unet
    python sample.py --model sd15 --prompts parti.tsv --lora runs/lpo-sd15 --resume   # any prompt file

Writes {out}/base/ and {out}/tuned/ (ImageFolder layout: {index:05d}_{seed}.png, metadata.jsonl with
file_name, prompt, seed, index; sampling.json = the settings), log.jsonl and grid.png (base | tuned
side by side, caption under each pair). eval.py scores them. Choices:
- eta 0 (deterministic DDIM) by default; with --eta > 0 the step noise also comes from the image's
  own CPU generator, so pairs still share it, on any GPU, CPU or number of ranks.
- Unique prompts in first-seen order (a *_unique split is one row per prompt already).
- Ranks take every world-th missing image; PNGs are written atomically, so --resume generates
  only the missing ones (and refuses a folder sampled with other settings).
"""
import argparse, glob, inspect, json, os, re, sys, time  # noqa: E401
from dataclasses import asdict, dataclass, fields

import huggingface_hub
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "sd15"          # preset: sd15 | sdxl | tiny | tiny-xl, or any pipeline folder / hub id
    base: str = ""               # base pipeline
    lora: str = ""               # tuned = base + this LoRA (lpo.py's output, diffusers format)
    unet: str = ""               # ... or a merged U-Net: folder, or hub "owner/repo/sub/folder"
    vae: str = ""                # optional VAE for both models (paper's SDXL eval: the fp16-fix VAE)
    prompts: str = ""            # dataset (hub id / folder) or a .txt / .json / .tsv / .csv / .parquet file
    split: str = "validation_unique"
    prompt: str = ""             # one prompt instead of a prompt set
    num_prompts: int = 0         # first N unique prompts; 0 = all
    seeds_per_prompt: int = 1    # images per prompt (tiny world: its 15 captions need several seeds)
    seed: int = 0                # image i uses seed + i, for base and tuned alike
    steps: int = 20              # paper Sec. 5: DDIM, 20 steps
    guidance: float = 5.0        # paper: CFG 5.0, the same for both models (SPEC sec. 4)
    eta: float = 0.0             # 0 = deterministic DDIM
    resolution: int = 512
    batch_size: int = 8          # images per forward pass per rank
    dtype: str = "auto"          # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    out: str = ""                # default runs/samples/{name of the LoRA / U-Net, or "base"}
    grid_rows: int = 8           # pairs in grid.png (first seed of the first prompts)
    grid_cell: int = 256         # pixels per image in grid.png
    resume: bool = False


PICKAPIC = "yuvalkirstain/pickapic_v1"   # mirrors: pickapic-anonymous/pickapic_v1, or a local copy
TINY = dict(prompts=os.path.join(ROOT, "tiny/pickapic"), resolution=32, batch_size=50, seeds_per_prompt=10,
            seed=1_000_000, grid_rows=15, grid_cell=128)   # held-out seeds: LPO trains on low ones
PRESETS = {
    "sd15": dict(base="stable-diffusion-v1-5/stable-diffusion-v1-5", prompts=PICKAPIC, resolution=512),
    "sdxl": dict(base="stabilityai/stable-diffusion-xl-base-1.0", prompts=PICKAPIC, resolution=1024,
                 batch_size=4, vae="madebyollin/sdxl-vae-fp16-fix"),   # the SDXL VAE overflows in fp16
    "tiny": dict(TINY, base=os.path.join(ROOT, "tiny/sd15")),
    "tiny-xl": dict(TINY, base=os.path.join(ROOT, "tiny/sdxl")),
}


def get_config(cls=Config, presets=PRESETS, argv=None, doc=__doc__):
    """CLI from the dataclass: defaults from the --model preset, help from each field's comment;
    --seeds-per-prompt and --seeds_per_prompt both work, --resume or --resume true."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=cls.model)
    model = pre.parse_known_args(argv)[0].model
    preset = presets.get(model) or dict(presets["sdxl" if "xl" in model.lower() else "sd15"], base=model)
    defaults = {**asdict(cls()), **preset, "model": model}
    src = "".join(inspect.getsource(c) for c in cls.__mro__[:-1])   # the dataclass(es), not object
    notes = dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", src, re.M))
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        is_bool = dict(type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
        kw = is_bool if f.type is bool else dict(type=f.type)
        p.add_argument(*sorted({"--" + f.name, "--" + f.name.replace("_", "-")}), dest=f.name, default=defaults[f.name],
                       help=f"{notes.get(f.name, '')} (default: {defaults[f.name]!r})".replace("%", "%%"), **kw)
    return cls(**vars(p.parse_args(argv)))


def findable(path):
    """A local path, or a hub model or dataset repo ("owner/name[/sub/folder]") that the hub or its cache has."""
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") < 1:
        return os.path.exists(path)
    for kind in ("model", "dataset"):
        try:   # a few small JSON files; works offline from the cache
            return bool(huggingface_hub.snapshot_download("/".join(path.split("/")[:2]), repo_type=kind,
                                                          allow_patterns=["*.json"]))
        except Exception:
            pass
    return False


def check_config(cfg, prog="sample.py", paths=("base", "lora", "unet", "vae", "prompts")):
    """One-line errors on bad input, before anything heavy is loaded."""
    die = lambda msg: sys.exit(f"{prog}: {msg}")   # SystemExit: the message, exit status 1
    if cfg.lora and cfg.unet:
        die("give --lora or --unet, not both")
    if not cfg.prompt and not cfg.prompts:
        die("no prompts: give --prompts (dataset or file) or --prompt")
    for name in (p for p in paths if not (p == "prompts" and cfg.prompt)):
        path = getattr(cfg, name)
        if path and not findable(path):
            die(f"--{name} {path}: no such local file or folder, and no hub repo of that name could be reached")
    for name in (n for n in ("steps", "seeds_per_prompt", "batch_size", "resolution") if getattr(cfg, n) < 1):
        die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dtype not in ("auto", "fp16", "bf16", "fp32"):
        die(f"--dtype {cfg.dtype}: expected auto, fp16, bf16 or fp32")


# ----------------------------------------------------------------------------- prompts and images
def load_prompts(source, split="validation_unique", limit=0):
    """Unique prompts, in first-seen order, from a text/JSON/table file or a dataset split."""
    if source.endswith(".txt"):
        prompts = [line.strip() for line in open(source) if line.strip()]
    elif source.endswith(".json"):   # a list of strings (e.g. the HPDv2 benchmark prompts)
        prompts = list(json.load(open(source)))
    else:
        from datasets import load_dataset, load_from_disk
        ext = source.rsplit(".", 1)[-1]
        if os.path.isfile(source):   # PartiPrompts is a .tsv with a "Prompt" column
            ds = load_dataset("csv" if ext in ("csv", "tsv") else ext, data_files=source, split="train",
                              **({"delimiter": "\t"} if ext == "tsv" else {}))
        elif os.path.exists(os.path.join(source, "dataset_dict.json")):   # save_to_disk folder
            ds = load_from_disk(source)[split]
        else:   # hub ids stream: only this split's captions are read, not the 500k train images
            ds = load_dataset(source, split=split, streaming=not os.path.isdir(source))
        col = next((c for c in ("caption", "prompt", "Prompt", "text") if c in (ds.column_names or [])), None)
        if col is None:
            raise SystemExit(f"{source}: no caption / prompt / Prompt / text column in {ds.column_names}")
        prompts = [row[col] for row in ds.select_columns([col])]
    prompts = list(dict.fromkeys(prompts))
    return prompts[:limit] if limit else prompts


def file_name(index, seed):
    return f"{index:05d}_{seed}.png"


def save_png(img, path):
    img.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)   # atomic: a killed run never leaves half an image for --resume


def write_jsonl(path, rows):   # atomic, as the images
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def make_grid(columns, captions, cell=256, notes=None, per_row=2):
    """columns: {"base": [PIL], "tuned": [PIL]} -> one image: per_row pairs side by side per row,
    caption under each pair; notes: optional {"base": [str], ...} printed on each image (its score)."""
    font = ImageFont.load_default(size=max(10, cell // 16))
    head, foot, gap = cell // 8, cell // 6, max(2, cell // 32)
    n, block = len(captions), len(columns) * (cell + gap) + 4 * gap   # block: one pair and a margin
    per_row = max(1, min(per_row, n))
    grid = Image.new("RGB", (per_row * block - 5 * gap, head + -(-n // per_row) * (cell + foot)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(n):
        x0, y = (r % per_row) * block, head + (r // per_row) * (cell + foot)
        for c, (name, images) in enumerate(columns.items()):
            x, img = x0 + c * (cell + gap), images[r]
            if r < per_row:
                draw.text((x + cell // 2, head // 2), name, fill="black", font=font, anchor="mm")
            # small images (the tiny world's 32 px) are enlarged with crisp pixels
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST if img.width < cell else Image.LANCZOS), (x, y))
            if notes:
                draw.text((x + 3, y + 2), notes[name][r], fill="black", font=font, stroke_width=1, stroke_fill="white")
        cap = captions[r]
        while len(cap) > 8 and draw.textlength(cap, font=font) > block - 8 * gap:
            cap = cap[:-4] + "..."
        draw.text((x0 + 4, y + cell + 2), cap, fill="black", font=font)
    return grid


# ----------------------------------------------------------------------------- models
def torch_dtype(name, device):
    name = ("fp16" if device.type == "cuda" else "fp32") if name == "auto" else name
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_pipeline(cfg, device, dtype):
    """The base pipeline (SD1.5 or SDXL: DiffusionPipeline picks the class) with a DDIM sampler."""
    index = DiffusionPipeline.load_config(cfg.base)
    kw = dict(safety_checker=None, requires_safety_checker=False) if "safety_checker" in index else {}
    if cfg.vae:
        kw["vae"] = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=dtype)
    pipe = DiffusionPipeline.from_pretrained(cfg.base, torch_dtype=dtype, **kw)
    # one sampler for every model: DDIM on the base's own betas (leading spacing, steps_offset 1);
    # no x0 clipping to [-1, 1] (a pixel-space default: SD latents are wider than that)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_unet(path, dtype):
    """A merged U-Net: a unet folder, a pipeline folder, or hub "owner/repo[/sub/folder]"."""
    if os.path.isdir(path):
        sub = "unet" if os.path.exists(os.path.join(path, "unet", "config.json")) else None
        return UNet2DConditionModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
    repo, sub = "/".join(path.split("/")[:2]), "/".join(path.split("/")[2:]) or "unet"
    return UNet2DConditionModel.from_pretrained(repo, subfolder=sub, torch_dtype=dtype)


# ----------------------------------------------------------------------------- distributed + logging
def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj):
    """Every rank's obj, in rank order (a collective: call it on every rank)."""
    out = [obj] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def log_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_folder(pipe, jobs, folder, info, cfg, rank, world):
    """Generate jobs [(index, prompt, seed)] into folder, sharded over ranks: each index once."""
    os.makedirs(folder, exist_ok=True)
    info_file = os.path.join(folder, "sampling.json")
    old = json.load(open(info_file)) if cfg.resume and os.path.exists(info_file) else info
    if old != info:   # every rank checks: no rank-0-only exit
        raise SystemExit(f"sample.py: --resume: {folder} was sampled with {old}, not {info}")
    barrier()   # every rank has read sampling.json before rank 0 rewrites it
    if rank == 0:
        for path in [] if cfg.resume else glob.glob(os.path.join(folder, "[0-9]*_[0-9]*.png")):
            os.remove(path)   # a fresh run: no stale image of an earlier run survives in the folder
        with open(info_file, "w") as f:
            json.dump(info, f, indent=2)
    barrier()
    todo = [j for j in jobs if not os.path.exists(os.path.join(folder, file_name(j[0], j[2])))]
    barrier()   # every rank has listed the folder before anyone writes to it
    mine, t0 = todo[rank::world], time.time()
    for b in tqdm(range(0, len(mine), cfg.batch_size), disable=rank != 0, desc=os.path.basename(folder)):
        batch = mine[b:b + cfg.batch_size]
        gens = [torch.Generator().manual_seed(s) for _, _, s in batch]   # one noise stream per image
        images = pipe([p for _, p, _ in batch], generator=gens, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance, eta=cfg.eta, height=cfg.resolution, width=cfg.resolution).images
        for (i, _, s), img in zip(batch, images):
            save_png(img, os.path.join(folder, file_name(i, s)))
    done = gather_objects([i for i, _, _ in mine])
    if rank == 0:
        flat = sorted(i for part in done for i in part)
        # todo = jobs minus the images on disk, so this means: every index exactly once, none missing
        assert flat == sorted(i for i, _, _ in todo), f"{folder}: sharding lost or repeated an image"
        write_jsonl(os.path.join(folder, "metadata.jsonl"), [dict(file_name=file_name(i, s), prompt=p, seed=s,
                    index=i, prompt_index=i // cfg.seeds_per_prompt) for i, p, s in jobs])
        log_jsonl(os.path.join(os.path.dirname(folder), "log.jsonl"), dict(folder=os.path.basename(folder),
                  images=len(jobs), generated=len(flat), per_rank=[len(p) for p in done], seconds=round(time.time() - t0, 2)))
    barrier()


def default_out(cfg):
    """runs/samples/{name}: the LoRA folder's name, the merged U-Net's repo/folder name, or base."""
    parts = [p for p in (cfg.lora or cfg.unet or "base").rstrip("/").split("/") if p not in ("unet", ".")]
    return os.path.join("runs", "samples", parts[-1] if parts else "base")


def sample_pair(cfg, rank, world, device):
    """Base images into {out}/base, tuned (if a LoRA / U-Net is given) into {out}/tuned."""
    prompts = [cfg.prompt] if cfg.prompt else load_prompts(cfg.prompts, cfg.split, cfg.num_prompts)
    S = cfg.seeds_per_prompt   # global image list: index i -> (i, prompt i // S, seed + i)
    jobs = [(i, prompts[i // S], cfg.seed + i) for i in range(len(prompts) * S)]
    dtype = torch_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg, device, dtype)
    base_dir, tuned_dir = os.path.join(cfg.out, "base"), os.path.join(cfg.out, "tuned")
    if rank == 0:
        print(f"{len(prompts)} prompts x {cfg.seeds_per_prompt} seeds = {len(jobs)} images per model "
              f"on {world} rank(s): DDIM {cfg.steps} steps, CFG {cfg.guidance}, eta {cfg.eta}", flush=True)
    # sampling.json: what makes two folders comparable (eval.py refuses pairs sampled differently)
    info = dict(base=cfg.base, tuned=None, vae=cfg.vae or None, scheduler="DDIMScheduler", steps=cfg.steps,
                guidance=cfg.guidance, eta=cfg.eta, resolution=cfg.resolution, dtype=cfg.dtype)
    sample_folder(pipe, jobs, base_dir, info, cfg, rank, world)
    if not (cfg.lora or cfg.unet):
        return base_dir, None
    if cfg.lora:   # base -> tuned in place: the diffusers way for a LoRA, or swap in a merged U-Net
        pipe.load_lora_weights(cfg.lora)
    else:
        pipe.unet = load_unet(cfg.unet, dtype).to(device)
    sample_folder(pipe, jobs, tuned_dir, dict(info, tuned=cfg.lora or cfg.unet), cfg, rank, world)
    return base_dir, tuned_dir


def read_folder(folder):
    """metadata.jsonl rows of a sample folder, and its sampling.json."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl")) if line.strip()]
    info_file = os.path.join(folder, "sampling.json")
    return rows, (json.load(open(info_file)) if os.path.exists(info_file) else {})


def folder_grid(folders, cfg, notes=None):
    """grid.png of the first seed of the first grid_rows prompts (so each row is another prompt)."""
    rows = read_folder(next(iter(folders.values())))[0]
    seen = set()   # first image of each prompt
    picks = [r for r in rows if not (r["prompt"] in seen or seen.add(r["prompt"]))][:cfg.grid_rows]
    cols = {k: [Image.open(os.path.join(d, r["file_name"])) for r in picks] for k, d in folders.items()}
    cut = {k: [v[r["index"]] for r in picks] for k, v in notes.items()} if notes else None
    return make_grid(cols, [r["prompt"] for r in picks], cfg.grid_cell, cut)


# ----------------------------------------------------------------------------- main
def main(cfg):
    check_config(cfg)
    cfg.out = cfg.out or default_out(cfg)
    rank, world, device = setup_distributed()
    base_dir, tuned_dir = sample_pair(cfg, rank, world, device)
    if rank == 0:
        folders = {"base": base_dir, **({"tuned": tuned_dir} if tuned_dir else {})}
        save_png(folder_grid(folders, cfg), os.path.join(cfg.out, "grid.png"))
        print(f"wrote {', '.join(folders.values())} and {os.path.join(cfg.out, 'grid.png')}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_config())
