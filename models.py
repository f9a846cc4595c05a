"""Model families, the one place that knows them: SD1.5-like U-Nets (one CLIP text encoder), SDXL
(two, and size conditions) and SD3 (an MMDiT, three text encoders, flow matching). Which family a
base is, where its denoiser lives, its geometry, which schedulers the samplers' steps cover,
loading its pipeline (and a Latent Reward Model for scoring), encoding prompts for
classifier-free guidance and the guided output, a LoRA on its denoiser (added, saved, merged in
fp32). The stages call `denoiser(x, timestep=t, **cond)` for every family."""
import glob
import math
import os
import re
import shutil

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel,
                       UNet2DConditionModel)

from runs import fail, first_line, kill_point, write_or_fail, write_safetensors

ROOT = os.path.dirname(os.path.abspath(__file__))
# --model names -> base pipelines (tiny/...: the embedded tiny worlds, in this repository)
BASES = {"tiny": "tiny/sd15", "tiny-xl": "tiny/sdxl", "tiny-sd3": "tiny/sd3",
         "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
         "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
         "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
         "sd35": "stabilityai/stable-diffusion-3.5-medium"}
# the denoiser's subfolder in a pipeline (and an LRM folder) -> its class
DENOISERS = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel}


# ----------------------------------------------------------------------------- which family
def resolve_model(name):
    """--model name, local folder or hub id -> what from_pretrained takes; says what it tried."""
    path = BASES.get(name, name)
    local = os.path.join(ROOT, path) if path.startswith("tiny/") else path
    if os.path.isdir(local):
        return local
    try:
        DiffusionPipeline.load_config(path)
    except Exception as error:
        raise ValueError(f"model {name!r}: no local folder {os.path.abspath(local)}, and hub id "
                         f"{path!r} failed ({type(error).__name__}: {first_line(error)[:150]})"
                         ) from None
    return path


def denoiser_subfolder(path):
    """"unet" (SD1.5, SDXL) or "transformer" (SD3): the denoiser of a pipeline or LRM folder, or
    of a hub id (read from its model_index.json)."""
    if os.path.isdir(path):
        return "transformer" if os.path.isdir(os.path.join(path, "transformer")) else "unet"
    return "transformer" if "transformer" in DiffusionPipeline.load_config(path) else "unet"


def load_denoiser_config(path):
    """(subfolder, config) of the denoiser of a pipeline or LRM folder or hub id."""
    subfolder = denoiser_subfolder(path)
    return subfolder, DENOISERS[subfolder].load_config(path, subfolder=subfolder)


def family(model):
    """"sd15", "sdxl" or "sd3" of a pipeline: from its configs (SD3: an MMDiT transformer/; SDXL:
    a U-Net taking pooled text and size conditions, addition_embed_type "text_time"), or, where
    they cannot be read (a hub id offline), from its name."""
    try:
        subfolder, config = load_denoiser_config(resolve_model(model))
        if subfolder == "transformer":
            return "sd3"
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    except (OSError, ValueError):
        name = model.lower()
        if "stable-diffusion-3" in name or "sd3" in name:
            return "sd3"
        return "sdxl" if "xl" in name else "sd15"


def is_flow_matching(scheduler_config):
    """SD3's FlowMatchEulerDiscreteScheduler rather than a DDPM-family scheduler: by the class
    a config file names, or, for a scheduler made in memory (its config names no class), by
    having no beta schedule."""
    name = scheduler_config.get("_class_name")
    if name:
        return name == "FlowMatchEulerDiscreteScheduler"
    return "beta_schedule" not in scheduler_config


def geometry(base, resolution=0, vae=None):
    """(resolution, latent side) from the base's configs, before any weight is read: resolution 0
    is the pipeline's own (denoiser sample_size x VAE factor); other sizes must be multiples of
    the VAE factor x the U-Net's downsampling (SD3: x the transformer's patch size), or the latent
    could not be sampled; an MMDiT's must fit its position embedding. vae: another VAE's folder."""
    try:
        vae_config = AutoencoderKL.load_config(vae or base, subfolder=None if vae else "vae")
        subfolder, denoiser = load_denoiser_config(base)
    except (OSError, ValueError) as error:
        fail(f"cannot read the base pipeline {base} ({first_line(error)}): pass --base (or "
             "--model) naming a diffusers pipeline folder or hub id with vae/ and unet/ (or "
             "transformer/)")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    downsampling = denoiser.get("patch_size") or 2 ** (len(denoiser["down_block_types"]) - 1)
    multiple = vae_factor * downsampling
    resolution = resolution or denoiser["sample_size"] * vae_factor
    if resolution % multiple:
        fail(f"--resolution {resolution}: {base} needs a positive multiple of {multiple} (VAE "
             f"factor {vae_factor} x {downsampling}, the {subfolder}'s downsampling); 0 takes its "
             "own size")
    largest = multiple * denoiser.get("pos_embed_max_size", math.inf)  # an MMDiT's positions
    if resolution > largest:
        fail(f"--resolution {resolution}: {base}'s position embedding covers at most {largest} px")
    return resolution, resolution // vae_factor


def check_scheduler(base, num_inference_steps):
    """Refuse, before any weight is read, a base whose scheduler the step maths of lpo.py does not
    cover: DDIM needs epsilon prediction, a_0 at the chain's end and at least num_inference_steps
    training timesteps; a flow-matching one (SD3) needs a grid fixed by the step count alone
    (no resolution-dependent dynamic shift) that runs from noise to data (not inverted)."""
    from diffusers import DDIMScheduler
    try:
        scheduler = DDIMScheduler.load_config(base, subfolder="scheduler")
    except (OSError, ValueError) as error:
        fail(f"cannot read the scheduler of {base} ({first_line(error)}): pass --base (or --model) "
             "naming a diffusers pipeline with scheduler/")
    timesteps = scheduler.get("num_train_timesteps", 1000)
    if is_flow_matching(scheduler):
        if scheduler.get("use_dynamic_shifting") or scheduler.get("invert_sigmas"):
            fail(f"{base}: need a flow-matching scheduler without use_dynamic_shifting and "
                 "invert_sigmas (SD3's)")
    elif (scheduler.get("prediction_type", "epsilon") != "epsilon"
          or scheduler.get("set_alpha_to_one")):
        fail(f"{base}: need an epsilon-prediction base with set_alpha_to_one=False "
             "(SD1.5, SDXL) or a flow-matching one (SD3)")
    elif num_inference_steps > timesteps:
        fail(f"--num_inference_steps {num_inference_steps}: {base} has {timesteps} "
             "training timesteps, the most DDIM can take")


# ----------------------------------------------------------------------------- loading
def load_pipeline(base, device, dtype, vae=True, lrm=None):
    """The base pipeline (DiffusionPipeline picks SD1.5's, SDXL's or SD3's class) with frozen text
    encoders, without its safety checker and image encoders (and VAE with vae=False: only images
    need it); frozen weights in dtype. lrm: one whose text encoders are the base's frozen ones
    (SD3's), which the pipeline then uses instead of a second copy (one T5-XXL)."""
    components = DiffusionPipeline.load_config(base)
    optional = ["safety_checker", "feature_extractor", "image_encoder"] + ([] if vae else ["vae"])
    skipped = {name: None for name in optional if name in components}
    if "safety_checker" in skipped:
        skipped["requires_safety_checker"] = False
    # loaded straight in dtype (bf16 / fp16 on a GPU; transformers keeps T5's wo layers in fp32
    # there): a LoRA added later keeps fp32 weights
    if lrm is not None and not lrm.text_trained:
        for name, encoder, tokenizer in zip(lrm.config["text_encoders"], lrm.text_encoders,
                                            lrm.tokenizers):
            skipped.update({name: encoder, name.replace("text_encoder", "tokenizer"): tokenizer})
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype, **skipped).to(device)
    for encoder in text_encoders(pipe):
        encoder.requires_grad_(False)
    return pipe


def lrm_folder(path, hint):
    """--lrm: a local folder, or hub "owner/repo/sub/folder", of which only sub/folder/ is
    downloaded (a release holding several LRMs); one line if neither."""
    if os.path.isdir(path):
        return path
    parts = path.rstrip("/").split("/", 2)  # owner, repo, sub/folder
    if len(parts) < 3 or path.startswith((".", "/", "~")):
        fail(f"no LRM at {path}: train one ({hint}) and pass its --out as --lrm, or name a "
             "hub folder owner/repo/sub/folder")
    import huggingface_hub
    repo, subfolder = "/".join(parts[:2]), parts[2]
    try:
        local = huggingface_hub.snapshot_download(repo, allow_patterns=[f"{subfolder}/*"])
    except Exception as error:  # offline, no such repo, no access: the hub's many error types
        fail(f"--lrm {path}: cannot download {subfolder}/ of the hub repo {repo} "
             f"({first_line(error)})")
    return os.path.join(local, subfolder)


def load_lrm(folder, base, device, dtype, hint, text_dtype=None):
    """A frozen Latent Reward Model for scoring (lrm_model's, without the parts score() never
    runs), or one line. from_pretrained reads lrm_config.json first and refuses another latent
    space than base's before loading weights; it also refuses non-finite weights (saved by a
    diverged training run: such an LRM would keep no pair). hint: a command that trains one.
    text_dtype: frozen text encoders (SD3's) in it, not dtype, for a pipeline to share them."""
    from lrm_model import LatentRewardModel  # (it imports this module)
    try:
        lrm = LatentRewardModel.from_pretrained(lrm_folder(folder, hint), base=base)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        fail(f"--lrm {folder}: not a readable LRM ({type(error).__name__}): {first_line(error)}; "
             f"train one ({hint}) and pass its --out as --lrm")
    encoders = lrm.for_scoring().text_encoders
    if text_dtype and not lrm.text_trained:  # kept out of the cast below
        encoders.to(device, text_dtype)
        lrm.text_encoders = torch.nn.ModuleList()
    lrm.to(device, dtype).text_encoders = encoders
    return lrm


def denoiser_name(pipe):
    """The pipeline's denoising network: "unet" (SD1.5, SDXL) or "transformer" (SD3's MMDiT)."""
    return "transformer" if "transformer" in pipe.components else "unet"


def numbered(pipe, name):
    """pipe.name, pipe.name_2, pipe.name_3: those the pipeline has."""
    found = [getattr(pipe, name + suffix, None) for suffix in ("", "_2", "_3")]
    return [part for part in found if part is not None]


def text_encoders(pipe):
    """SD1.5: [CLIP-L]; SDXL: [CLIP-L, OpenCLIP bigG]; SD3: [CLIP-L, OpenCLIP bigG, T5]."""
    return numbered(pipe, "text_encoder")


def tokenizers(pipe):
    """The tokenizers of text_encoders(pipe), in the same order."""
    return numbered(pipe, "tokenizer")


def t5_length(tokenizer):
    """SD3's T5 token count: the pipeline's default 256, or the tokenizer's own limit where that
    is shorter (the tiny world's T5: 16); every SD3 encoding here and every SD3 pipeline call uses
    it, so they give the same embeddings."""
    return min(256, tokenizer.model_max_length)  # StableDiffusion3Pipeline's max_sequence_length


#------------------------------------------------------------------------ prompt encoding, guidance
def encode_prompt(encoders, tokenizers, prompts, resolution):
    """The denoiser's text inputs, as each family's pipeline encodes them. SD1.5: CLIP-L's last
    hidden state, pooled = its EOS state. SDXL: both CLIPs' penultimate states concatenated,
    pooled = bigG's projected text_embeds, added conditions with time_ids = (H, W, 0, 0, H, W).
    SD3: both CLIPs' penultimate states (768 + 1280) zero-padded to T5's width and followed by
    T5's states along the sequence (77 + 256 tokens), pooled = both projected text_embeds
    (768 + 1280). The CLIPs tokenize to the first tokenizer's length, as the pipelines."""
    xl = len(encoders) > 1
    outputs = []
    for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        length = t5_length(tokenizer) if index == 2 else tokenizers[0].model_max_length
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")
        outputs.append(encoder(tokens.input_ids.to(encoder.device),
                               output_hidden_states=xl and index < 2))
    clips = outputs[:2]
    states = [output.hidden_states[-2] if xl else output.last_hidden_state for output in clips]
    context = torch.cat(states, -1)  # (B, L, sum D_i)
    if len(encoders) == 3:
        t5_states = outputs[2].last_hidden_state
        context = F.pad(context, (0, t5_states.shape[-1] - context.shape[-1]))
        context = torch.cat([context, t5_states], -2)  # (B, 77 + L_T5, D_T5)
        pooled = torch.cat([output.text_embeds for output in clips], -1)  # (B, P_1 + P_2)
        return {"encoder_hidden_states": context, "pooled_projections": pooled, "pooled": pooled}
    pooled = clips[-1].text_embeds if xl else clips[0].pooler_output
    added = None
    if xl:
        size = [resolution, resolution, 0, 0, resolution, resolution]
        time_ids = torch.tensor([size], device=pooled.device).to(pooled.dtype)  # (1, 6)
        added = dict(text_embeds=pooled, time_ids=time_ids.expand(len(prompts), 6))
    return {"encoder_hidden_states": context, "added_cond_kwargs": added, "pooled": pooled}


def uncond_then_cond(uncond, cond):
    """The one CFG batch of the repository, [uncond; cond] along the batch (guidance, VFE), for
    tensors and (nested) dicts of them, None staying None; an uncond of one row (the empty
    prompt) is repeated for every prompt."""
    if isinstance(cond, dict):
        return {key: uncond_then_cond(uncond[key], cond[key]) for key in cond}
    if cond is None:
        return None
    return torch.cat([uncond.expand_as(cond), cond])


@torch.no_grad()
def encode_for_cfg(pipe, prompts, resolution):
    """Denoiser kwargs of the CFG batch [uncond; cond] (2B), encoded as the family's pipeline does
    (encode_prompt): uncond = the empty prompt (SD1.5, SD3), or zeros with the real size
    conditions where the pipeline forces zeros for it (SDXL)."""
    cond, uncond = (encode_prompt(text_encoders(pipe), tokenizers(pipe), texts, resolution)
                    for texts in (prompts, [""]))
    if pipe.config.get("force_zeros_for_empty_prompt", False):  # SDXL's
        added = cond["added_cond_kwargs"]
        uncond = dict(encoder_hidden_states=cond["encoder_hidden_states"] * 0,
                      added_cond_kwargs=dict(added, text_embeds=added["text_embeds"] * 0))
    return {name: uncond_then_cond(uncond[name], value) for name, value in cond.items()
            if name != "pooled" and value is not None}


def guided_prediction(denoiser, x, t, cond, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022) on the denoiser's output: eps = eps_u +
    w (eps_c - eps_u) for a U-Net; the same line on the velocity for SD3's transformer (as its
    pipeline: the guidance is linear in the output). (B, C, h, w) fp32"""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))  # (B,)
    # timestep by name: the U-Net takes it second, SD3's transformer fourth
    output = denoiser(torch.cat([x, x]), timestep=torch.cat([t, t]), **cond).sample  # (2B, ...)
    uncond, conditional = output.float().chunk(2)  # (B, C, h, w) each
    return uncond + guidance_scale * (conditional - uncond)


# ----------------------------------------------------------------------------- LoRA
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) reads


def add_lora(denoiser, lora_rank, seed, grad_ckpt):
    """LoRA on the attention projections (LPO paper: to_q, to_k, to_v, to_out.0; alpha = rank);
    returns the trainable parameters, in fp32 even where the frozen weights are bf16.
    SD3 (a choice): the same four names, which in an MMDiT joint block are the image stream's
    projections (and those of SD3.5's second, image-only attention). The text stream's add_q_proj,
    add_k_proj, add_v_proj and to_add_out stay frozen: the paper names only the four, and the joint
    attention mixes both streams, so the adapted image projections still change how the image
    attends to the prompt. Flow-GRPO and diffusers' SD3 LoRA script adapt the text stream too."""
    from peft import LoraConfig
    torch.manual_seed(seed)  # the same LoRA init on every rank
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [param for param in denoiser.parameters() if param.requires_grad]
    for param in params:
        param.data = param.data.float()
    if grad_ckpt:
        denoiser.enable_gradient_checkpointing()
    return params


def save_lora(pipe, denoiser, out):
    """The LoRA in diffusers format (`pipe.load_lora_weights(out)` reads it), moved in whole."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    kill_point("before lora")
    path = os.path.join(out, LORA_FILE)
    # unet_lora_layers= (SD1.5, SDXL) or transformer_lora_layers= (SD3)
    write_or_fail(path, type(pipe).save_lora_weights, out, weight_name=LORA_FILE + ".tmp",
                  save_function=write_safetensors, **{f"{denoiser_name(pipe)}_lora_layers": layers})
    kill_point("mid " + LORA_FILE)
    os.replace(path + ".tmp", path)
    kill_point("after lora")


def check_lora(path, base):
    """A local LoRA (a diffusers LoRA file, or a folder holding one) that fits base's denoiser,
    found before anything is sampled: each down / up (A / B) weight names one of its layers, with
    its width (one of another family would load nothing: "tuned" images equal to the base's), and
    every weight is finite (a diverged run's LoRA samples black images)."""
    from safetensors.torch import load_file
    files = glob.glob(os.path.join(path, "*.safetensors")) if os.path.isdir(path) else [path]
    preferred = os.path.join(path, LORA_FILE)
    files = [preferred] if preferred in files else files
    try:
        weights = load_file(files[0]) if len(files) == 1 else {}
    except Exception as error:  # safetensors' own error type: a damaged or foreign file
        fail(f"--lora {files[0]}: cannot read it ({type(error).__name__}): is it damaged?")
    if not any("lora" in key for key in weights):
        fail(f"--lora {path}: no LoRA there (expected {LORA_FILE} with lora_A / lora_B weights, "
             "as lpo.py saves it)")
    subfolder, config = load_denoiser_config(base)
    with torch.device("meta"):  # the layers' shapes, no weights
        denoiser = DENOISERS[subfolder].from_config(config)
    layers = {f"{subfolder}.{name}": layer for name, layer in denoiser.named_modules()}
    for key, weight in weights.items():
        match = re.fullmatch(r"(\w+\..+)\.lora(\.down|_A|\.up|_B)\.weight", key)
        if not match:  # another format: pipe.load_lora_weights judges it
            continue
        down = match[2] in (".down", "_A")  # down / A: (rank, in); up / B: (out, rank)
        width = getattr(layers.get(match[1]), "in_features" if down else "out_features", None)
        if weight.ndim != 2 or width != weight.shape[down]:
            fail(f"--lora {path} does not fit {base}: {key} {tuple(weight.shape)} has no layer of "
                 f"its {subfolder} to go to (a LoRA of another model family?)")
        if not torch.isfinite(weight).all():
            fail(f"--lora {path}: non-finite weights in {key} (a diverged run's LoRA)")


def merged_denoiser(base, denoiser, subfolder="unet"):
    """The base's denoiser (U-Net; SD3: subfolder "transformer") read again in fp32 with every
    LoRA delta of `denoiser` added in fp32: fused into a bf16 training copy, a small delta would
    mostly round away (a bf16 weight keeps 8 bits). The delta: (alpha / r) B A (Hu et al. 2021,
    Eq. (3))."""
    merged = type(denoiser).from_pretrained(base, subfolder=subfolder, torch_dtype=torch.float32)
    for name, layer in denoiser.named_modules():
        if hasattr(layer, "lora_A"):
            delta = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
            merged.get_submodule(name).weight.data += (layer.scaling["default"] * delta).cpu()
    return merged


def save_merged_denoiser(base, denoiser, out, subfolder="unet"):
    """{out}/unet (SD3: {out}/transformer), a plain diffusers model folder, replaced whole."""
    folder = os.path.join(out, subfolder)
    merged = merged_denoiser(base, denoiser, subfolder)
    write_or_fail(folder, merged.save_pretrained, folder + ".tmp")
    kill_point("mid " + subfolder)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(folder + ".tmp", folder)

