"""bench.py: the time and the peak memory of every stage of the pipeline on one GPU, at the paper's
per-GPU settings, on full-size SD1.5 (512 px), SDXL (1024 px) and SD3-Medium (1024 px; the paper's
later version) with random weights.

LPO is fast because its step reward reads noisy latents (arXiv 2502.01051v3: 10-28x less training
time than Diffusion-DPO, 2.5-3.5x less than SPO; one A100 sampling step with K = 4: LPO 0.039 s,
SPO 0.243 s). Random weights cost the same FLOPs and bytes as trained ones, so
this builds the published architectures, bf16 on one GPU, downloads nothing, and times the project's
own code (median of --repeats after --warmup, CUDA-synchronised). The phases, one stage at a time,
each with only what that stage holds on its GPU:
  1 LPO sampling step, K = 4: lpo.sample_tuples (CFG denoise, K children, LRM scores with VFE,
    pairs) over a whole pass (lpo.py's steps: 20; SD3 28), per step, with lpo.py's own sample /
    score split; lpo.make_schedule picks the step (DDIM, or SD3's DDIM in flow form)
  2 the same pass with an SPO-style pixel reward in the LRM's place: per child an x0 prediction
    (a CFG denoiser pass), a VAE decode and a CLIP ViT-H/14 image tower (PickScore's) at 224 px
  3 one LPO update on --batch_size pairs (lpo.pair_logprobs with CFG, lpo_loss, lpo.apply_update)
  4 one Diffusion-DPO step at the same batch: the full denoiser trained against a frozen reference
    (SD3: the same loss on the velocity's error, its flow-matching target)
  5 one LPO iteration (a sampling pass + an update) at lpo.py's per-GPU batches and settings
  6 one LRM training step at the paper's global batch (128 pairs SD1.5 / 32 SDXL) split over 8
    GPUs: 16 / 4 pairs: lrm.train_step (VAE encode, add noise, LatentRewardModel.score with VFE,
    Bradley-Terry, backward; in the micro-batches lrm.choose_micro_batch picks), clip, AdamW
  7 one LRM validation batch as lrm.pair_accuracy runs it: 32 pairs, VAE encode, 5 timesteps
  8 one MPCF scoring batch (32 pairs = 64 images; MPCF does not depend on the base, so only the
    sd15 / tiny column has it): CLIP ViT-L/14 image tower + mpcf.aesthetic_score (LAION MLP),
    CLIP ViT-H/14 + mpcf.clip_score, mpcf.vqa_score (InstructBLIP flan-t5-xl, one token)
  9 one eval sampling batch as sample.py runs it (its preset batch, sampler, steps and CFG: DDIM
    20 steps, CFG 5; SD3 its Euler sampler, 28 steps, CFG 7; decode)
Phases 5-9 report peak memory: on CUDA torch.cuda.max_memory_allocated / _reserved, on a CPU the
peak resident set of the process (Linux VmHWM, reset before each phase; it includes Python itself).

    python bench.py                          # sd15 + sdxl + sd3 on one CUDA GPU
    python bench.py --model sdxl --compile   # opt-in torch.compile of the repeated blocks
    python bench.py --model sdxl --lrm_dtype fp32 --grad_ckpt off --attn classic  # what each buys
    python bench.py --tiny                   # the tiny worlds, CPU, a minute: times mean nothing
    python bench.py --estimate               # computed memory table, meta device, no GPU: a minute
    python bench.py --smoke                  # full-size SD1.5 at 64 px through every stage, CPU
Writes {out}/bench.json (table, GPU, versions, settings), {out}/bench.jsonl (a row a phase) and,
with --estimate, {out}/memory_estimate.md.

--estimate computes, without a GPU, which stage fits a 24 / 40 / 80 GB GPU: parameters x bytes of
the published architectures built on the meta device, + gradients and AdamW moments of what is
trained, + activations. Activations are counted on the meta device at the real resolution and
batch: for a training step, the bytes autograd saves for backward (attention counted as fused
kernels save it: q, k, v and output, not the attention matrix); for inference, the largest
input + output of one layer. It is computed, not measured; phases 5-9 measure.

--smoke runs phases 1, 3 and 5-9 (not the pixel reward, Diffusion-DPO or the VQA model: none is
the pipeline's code) on the full-size SD1.5 architecture at 64 px on the CPU, at batches of 1-2:
a full-size-only crash (a shape, a dtype, a config field) shows up there before a GPU hour is
spent. It needs about 11 GB of RAM (peak: the LRM training step) and 5-6 minutes of 2 cores. SD3
is not in it: its T5-XXL text encoder alone is 19 GB in fp32 (4.76B parameters, more than a
developer machine's RAM, and minutes to initialise); --estimate and --tiny (tiny-sd3) cover it.

Deviations:
  1. random weights; every CLIP tokenizer is the tiny world's, padded to the real 77 tokens (its
     ids fit every vocabulary: CLIP's 49,408, flan-t5's 32,128); SD3's T5 tokenizer is the tiny
     SD3 world's, padded to the SD3 pipeline's 256 tokens (its ids fit T5's 32,128);
  2. the pixel path gets every advantage: K children batched through denoiser and VAE, the VAE in
     bf16 (real SDXL upcasts it to fp32: slower), its text embedding cached;
  3. the LRM phases feed lrm.py's functions random pairs (no dataset), and phase 7 is
     lrm.pair_accuracy's loop body (pair_accuracy itself reads the base's files);
  4. the eval batch runs in bf16 (sample.py: fp16; the same bytes and kernels);
  5. one process, one GPU (no torchrun); no checkpoints: --resume keeps the models already in
     bench.json and refuses other settings;
  6. SD3 with --attn classic is refused: diffusers has no matmul + softmax processor for the
     MMDiT's joint attention.
"""
import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from tqdm import tqdm
from transformers import (BlipImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                          InstructBlipConfig, InstructBlipForConditionalGeneration,
                          InstructBlipProcessor, T5Config, T5EncoderModel, T5TokenizerFast)

import lpo
import lrm as lrm_script
import mpcf
import sample
from lpo import (FlowSchedule, NonFiniteUpdate, add_lora, apply_update, guided_prediction,
                 lpo_loss, make_schedule, pair_logprobs, sample_tuples)
from models import denoiser_name, encode_for_cfg, t5_length, text_encoders, uncond_then_cond
from lrm_model import LatentRewardModel
from tiny.world import CAPTIONS
from runs import (build_parser, command_line, fail, log_jsonl, prepare_run_folder, write_text)

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "sd15,sdxl,sd3"  # comma list of sd15 | sdxl | sd3 | tiny | tiny-xl | tiny-sd3
    tiny: bool = False          # the tiny worlds: --model tiny,tiny-xl,tiny-sd3 --device cpu
    estimate: bool = False      # only the computed memory table (meta device, seconds, no GPU)
    smoke: bool = False         # full-size SD1.5 at 64 px through every stage on the CPU (minutes)
    device: str = "cuda"        # cuda | cuda:N | cpu
    out: str = "runs/bench"     # bench.json, bench.jsonl, memory_estimate.md
    resume: bool = False        # keep the models already measured in {out}/bench.json
    seed: int = 0               # random weights, prompts and latents
    threads: int = 0            # CPU intra-op threads, 0 = torch's default
    resolution: int = 0         # px, 0 = each preset's (512 / 1024 / 1024); smaller: CPU smoke
    num_children: int = 4       # K children per sampling step (paper: K = 4)
    batch_size: int = 1         # prompts per timed pass of phases 1-2, pairs per update of 3-4
    sample_batch_size: int = 0  # phase 5: prompts per sampling pass (0 = lpo.py's per-GPU preset)
    train_batch_size: int = 0   # phase 5: pairs per update (0 = lpo.py's per-GPU preset)
    lrm_batch_size: int = 0     # phase 6: pairs per GPU (0 = the paper's: 16 SD1.5, 4 SDXL/SD3)
    warmup: int = 2             # untimed runs before the timed ones
    repeats: int = 5            # timed runs; the median is reported
    lrm_dtype: str = "fp16"     # the frozen LRM in LPO: fp16 (lpo.py on a GPU) | bf16 | fp32
    # a tri-state, not a flag: one run benches SD1.5 (lpo.py's preset: off) and SDXL (on)
    grad_ckpt: str = "preset"   # policy denoiser checkpointing: preset (lpo.py's) | on | off
    attn: str = "sdpa"          # sdpa (torch's scaled_dot_product_attention) | classic (matmul)
    compile: bool = False       # torch.compile each repeated transformer block (regional)
    dpo: bool = True            # phase 4 (SDXL: a second, fp32 denoiser with its optimizer state)
    pixel: bool = True          # phase 2: the SPO-style pixel reward, its parts and the ratios
    stages: bool = True         # phases 6-9: the LRM, MPCF and eval stages
    validation_batch_size: int = 32  # phase 7: pairs (lrm.pair_accuracy's batch: 32)
    mpcf_batch_size: int = 32   # phase 8: pairs (mpcf.py's real-scorer preset: 32)
    eval_batch_size: int = 0    # phase 9: images (0 = sample.py's preset: 8 SD1.5, 4 SDXL/SD3)
    vqa: bool = True            # phase 8 includes the VQA model (InstructBLIP flan-t5-xl, 4B)


TINY = dict(model="tiny,tiny-xl,tiny-sd3", device="cpu", warmup=1, repeats=3, threads=1,
            sample_batch_size=4, train_batch_size=4)
# --smoke: every stage's code path at full size in little CPU time and memory (no pixel reward,
# Diffusion-DPO or VQA model: they are not the pipeline's code); one thread: on a shared 2-core
# machine a second one mostly waits (an SD1.5 U-Net pass at 64 px: 2.8 s with one, 6.1 s with two)
SMOKE = dict(model="sd15", device="cpu", resolution=64, warmup=0, repeats=1, threads=1,
             num_children=2, sample_batch_size=1, train_batch_size=1, lrm_batch_size=2,
             validation_batch_size=2, mpcf_batch_size=2, eval_batch_size=1, pixel=False,
             dpo=False, vqa=False)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GRAD_CKPT = ("preset", "on", "off")
ATTENTION = ("sdpa", "classic")
# the step the timed updates (LPO, LRM) train at: mid-grid (the costs do not depend on t); SD3's
# unit is sigma x 1000, so the same numbers are its mid levels
T = 501
T_PREV = 451
# lrm.py: --eval_timesteps, and pair_accuracy's batch of 32 pairs
VALIDATION_TIMESTEPS = (1, 251, 501, 751, 951)
VALIDATION_PAIRS = 32        # (for --estimate; the phase: --validation_batch_size)
# the paper's global LRM batch (128 pairs SD1.5, 32 SDXL) over 8 GPUs; SD3: lrm.py's preset, SDXL's
LRM_PAIRS_PER_GPU = {"sd15": 16, "sdxl": 4, "sd3": 4, "tiny": 4, "tiny-xl": 4, "tiny-sd3": 4}
# mpcf.py's real-scorer preset (for --estimate; the phase: --mpcf_batch_size)
MPCF_PAIRS = 32
# fits a GPU of N GB when the computed total stays under this share of it (CUDA context, cache)
USABLE_SHARE = 0.9
GPU_SIZES_GB = (24, 40, 80)


# ----------------------------------------------------------------------------- command line
def get_config(argv=None):
    argv = command_line(__file__, argv)
    modes = argparse.ArgumentParser(add_help=False)
    modes.add_argument("--tiny", action="store_true")
    modes.add_argument("--smoke", action="store_true")
    known = modes.parse_known_args(argv)[0]
    defaults = asdict(Config())
    if known.tiny:
        defaults.update(TINY)
    if known.smoke:
        defaults.update(SMOKE)
    parser = build_parser(Config, defaults, __doc__)
    cfg = Config(**vars(parser.parse_args(argv)))
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Bad settings end here in one line, before any network is built."""
    names = cfg.model.split(",")
    unknown = set(names) - set(DPO_RECIPES)
    if unknown:
        fail(f"--model {cfg.model!r}: a comma list of {', '.join(DPO_RECIPES)}")
    if cfg.lrm_dtype not in DTYPES:
        fail(f"--lrm_dtype {cfg.lrm_dtype!r}: one of {', '.join(DTYPES)}")
    if cfg.grad_ckpt not in GRAD_CKPT:
        fail(f"--grad_ckpt {cfg.grad_ckpt!r}: one of {', '.join(GRAD_CKPT)}")
    if cfg.attn not in ATTENTION:
        fail(f"--attn {cfg.attn!r}: one of {', '.join(ATTENTION)}")
    if cfg.smoke and "sd3" in names:
        fail("--smoke --model sd3: SD3's T5-XXL alone needs 19 GB of RAM in fp32 and minutes to "
             "initialise on a CPU; --estimate and --tiny (tiny-sd3) cover SD3 without a GPU")
    flow_models = [name for name in names if name in FLOW_MODELS]
    if cfg.attn == "classic" and flow_models and not cfg.estimate:
        fail(f"--attn classic: diffusers has no matmul + softmax processor for the joint "
             f"attention of {', '.join(flow_models)} (deviation 6): leave them out of --model")
    if cfg.num_children < 2:
        fail(f"--num_children {cfg.num_children}: at least 2 (a winner and a loser)")
    if min(cfg.batch_size, cfg.repeats, cfg.validation_batch_size, cfg.mpcf_batch_size) < 1:
        fail("--batch_size, --repeats, --validation_batch_size and --mpcf_batch_size: at least 1")
    if cfg.warmup < 0:
        fail(f"--warmup {cfg.warmup}: at least 0")
    zero_is_preset = ("sample_batch_size", "train_batch_size", "lrm_batch_size", "eval_batch_size",
                      "threads")
    for option in zero_is_preset:
        if getattr(cfg, option) < 0:
            fail(f"--{option} {getattr(cfg, option)}: 0 (the preset) or more")
    if cfg.resolution % 64 or cfg.resolution < 0:
        fail(f"--resolution {cfg.resolution}: a multiple of 64 that the VAE and U-Net can "
             "produce (0: each preset's)")
    no_cuda = cfg.device.startswith("cuda") and not torch.cuda.is_available()
    if no_cuda and not cfg.estimate:
        fail(f"--device {cfg.device}: no CUDA GPU here; full-size networks need one "
             "(--tiny, --smoke and --estimate run on a CPU)")


# ----------------------------------------------------------------------------- math
def predict_x0(x_t, eps, alpha_bar_t):
    """DDIM (Song et al. 2021) Eq. (12), "predicted x0": (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def predict_x0_flow(x_t, velocity, level):
    """Rectified flow's predicted x0 (x_s = (1 - s) x0 + s e, v = e - x0): x0 = x_s - s v."""
    return x_t - level * velocity


def diffusion_dpo_loss(err, ref_err, beta):
    """Diffusion-DPO (Wallace et al. 2023):
    -log sigmoid(-beta/2 ((e_w - e_l) - (e_ref_w - e_ref_l))), e = per-sample noise-prediction
    MSE, rows [winners; losers].  (2B,), (2B,) -> scalar"""
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    margin = (err_w - err_l) - (ref_w - ref_l)
    return -F.logsigmoid(-0.5 * beta * margin).mean()


def stage_bytes(weights, trainable, activations, autocast_copies=False):
    """Bytes on one GPU: weights = [(parameters, bytes each)], + 12 bytes per trained parameter
    (fp32 gradient + AdamW's two fp32 moments; + 2 for its bf16 autocast copy), + activations."""
    per_trained = 12 + 2 * autocast_copies
    return sum(count * size for count, size in weights) + per_trained * trainable + activations


def fits(total_bytes):
    """Whether total_bytes stays under USABLE_SHARE of a 24 / 40 / 80 GB (GiB) GPU."""
    return [total_bytes <= USABLE_SHARE * size * 2**30 for size in GPU_SIZES_GB]


# ----------------------------------------------------------------------------- published configs
# stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, stable-diffusion-3-medium-diffusers,
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, openai/clip-vit-large-patch14,
# Salesforce/instructblip-flan-t5-xl, google/t5-v1_1-xxl (SD3's text_encoder_3)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
             hidden_act="gelu")
VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768,
             hidden_act="quick_gelu")
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, hidden_act="gelu")
T5_XL = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
           sample_size=512)
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 use_linear_projection=True)
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
# SD3-Medium's MMDiT: 24 joint blocks of 24 heads x 64 = 1536 wide over 2 x 2 patches of 16
# latent channels; text: CLIP-L + bigG penultimate states (768 + 1280 -> padded to 4096) and T5's
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                       num_layers=24, attention_head_dim=64, num_attention_heads=24,
                       joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, pos_embed_max_size=192)
# SD3's VAE: SD's layout with 16 latent channels and no quant convs
SD3_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False)
FULL_SIZE = ("sd15", "sdxl", "sd3")
FLOW_MODELS = ("sd3", "tiny-sd3")
SCALING_FACTORS = {"sd15": 0.18215, "sdxl": 0.13025}
# the tiny world's stand-ins for the image towers and the VQA model
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                patch_size=8, image_size=32, projection_dim=32)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, encoder_hidden_size=32)
# Diffusion-DPO's own recipe (SalesforceAIResearch/DiffusionDPO): 1 pair per GPU, beta 5000,
# mixed precision over fp32 weights, AdamW; for SDXL its train.py forces Adafactor + checkpointing
DPO_RECIPES = {"sd15": dict(adafactor=False, grad_ckpt=False),
               "sdxl": dict(adafactor=True, grad_ckpt=True)}
DPO_RECIPES["tiny"] = DPO_RECIPES["sd15"]
DPO_RECIPES["tiny-xl"] = DPO_RECIPES["sdxl"]
# SD3 (2B, 1024 px): SDXL's recipe; the velocity's error in the noise's place
DPO_RECIPES["sd3"] = DPO_RECIPES["sdxl"]
DPO_RECIPES["tiny-sd3"] = DPO_RECIPES["sdxl"]


# ----------------------------------------------------------------------------- models
def tiny_tokenizer():
    """The tiny world's CLIP tokenizer (deviation 1), padded to CLIP's 77 tokens."""
    path = os.path.join(ROOT, "tiny/sd15/tokenizer")
    return CLIPTokenizer.from_pretrained(path, model_max_length=77)


def text_config(tokenizer, **sizes):
    """A CLIP text tower config of the given sizes over the tokenizer's vocabulary."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **ids, **sizes)


T5_TOKENIZER = os.path.join(ROOT, "tiny/sd3/tokenizer_3")


def t5_tokenizer():
    """The tiny SD3 world's T5 tokenizer (deviation 1), padded to the SD3 pipeline's 256 tokens."""
    return T5TokenizerFast.from_pretrained(T5_TOKENIZER, model_max_length=256)


def ddim_scheduler():
    """SD1.5's and SDXL's scheduler config, as DDIM (what lpo.py and sample.py sample with)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading")


def full_size_sd3(device):
    """A random SD3-Medium pipeline: the MMDiT, the 16-channel VAE, CLIP-L and bigG with their
    projections, T5-v1.1-XXL's encoder, its flow-matching Euler scheduler (shift 3.0)."""
    tokenizer = tiny_tokenizer()
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
        vae = AutoencoderKL(**SD3_VAE)
        clip_l = CLIPTextModelWithProjection(text_config(tokenizer, **CLIP_L))
        bigg = CLIPTextModelWithProjection(text_config(tokenizer, **CLIP_BIGG))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip_l,
                                    tokenizer=tokenizer, text_encoder_2=bigg,
                                    tokenizer_2=tokenizer, text_encoder_3=t5,
                                    tokenizer_3=t5_tokenizer(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def full_size(name, device):
    """A random SD1.5, SDXL or SD3-Medium pipeline of the published architecture, created directly
    on `device` (initialising 2.6B parameters on a CPU is slow; on "meta" it is free)."""
    if name == "sd3":
        return full_size_sd3(device)
    tokenizer = tiny_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(**UNETS[name])
        vae = AutoencoderKL(**VAE, scaling_factor=SCALING_FACTORS[name])
        text_encoder = CLIPTextModel(text_config(tokenizer, **CLIP_L))
        if name == "sdxl":
            bigg = CLIPTextModelWithProjection(text_config(tokenizer, **CLIP_BIGG))
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                 scheduler=ddim_scheduler())
    if name == "sdxl":
        return StableDiffusionXLPipeline(**parts, text_encoder_2=bigg, tokenizer_2=tokenizer,
                                         force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(name, device, dtype):
    """The pipeline of `name` (a random full-size one, or the tiny world's folder) on device."""
    if name in FULL_SIZE:
        pipe = full_size(name, device)
    else:
        folder = os.path.join(ROOT, TINY_FOLDERS[name])
        pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


TINY_FOLDERS = {"tiny": "tiny/sd15", "tiny-xl": "tiny/sdxl", "tiny-sd3": "tiny/sd3"}


def tokenizers(pipe):
    found = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None), getattr(pipe, "tokenizer_3", None)]
    return [tokenizer for tokenizer in found if tokenizer is not None]


def denoiser(pipe):
    """The pipeline's denoising network: SD1.5's or SDXL's U-Net, SD3's MMDiT."""
    return getattr(pipe, denoiser_name(pipe))


def default_resolution(pipe):
    """The pipeline's own: denoiser sample size x the VAE's downsampling (SD1.5 512, SDXL and SD3
    1024)."""
    return denoiser(pipe).config.sample_size * pipe.vae_scale_factor


def latent_channels(pipe):
    return pipe.vae.config.latent_channels


def latent_reward_model(pipe, resolution, copy_networks):
    """An LRM over the pipeline's denoiser and text encoders (copies, or the networks themselves);
    SD3's reads its default share of the MMDiT's blocks (18 of SD3-Medium's 24)."""
    network = denoiser(pipe)
    encoders = text_encoders(pipe)
    if copy_networks:
        network = copy.deepcopy(network)
        encoders = copy.deepcopy(encoders)
    config = dict(resolution=resolution, g=7.5)
    return LatentRewardModel(network, encoders, tokenizers(pipe), config)


REPEATED_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock", "CLIPEncoderLayer")


def speedups(cfg, *modules):
    """--attn classic: matmul + softmax attention; --compile: each repeated block compiled."""
    for module in modules:
        if cfg.attn == "classic" and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor())   # diffusers: baddbmm + softmax
        elif cfg.attn == "classic":
            module.set_attn_implementation("eager")      # transformers: matmul + softmax
        if not cfg.compile:
            continue
        for block in module.modules():
            if type(block).__name__ in REPEATED_BLOCKS:
                # each repeated block compiled once: a short compile, most of the gain
                block.compile()


# ----------------------------------------------------------------------------- phases 1-5: LPO
@dataclass
class LPOStage:
    """What lpo.py holds on its GPU: the pipeline (policy denoiser + LoRA, text encoders), the
    frozen LRM, AdamW over the LoRA, and its schedule (DDIM, or SD3's flow); with lpo.py's own
    config."""
    pipe: object
    settings: lpo.Config
    lrm: LatentRewardModel
    lora: list
    optimizer: torch.optim.Optimizer
    schedule: object  # lpo.Schedule (DDIM) or lpo.FlowSchedule (SD3)
    autocast: torch.autocast
    device: torch.device
    dtype: torch.dtype
    latent_size: int


@dataclass
class Batch:
    """Prompts, their CFG conditioning, and random latents (children for LPO, images for DPO)."""
    prompts: list
    prompt_ids: torch.Tensor
    generator: torch.Generator
    cond: dict
    cond_pair: dict
    x_t: torch.Tensor
    x_w: torch.Tensor
    x_l: torch.Tensor


def lpo_settings(name, cfg):
    """lpo.py's own preset for `name`, with the bench's overrides."""
    settings = {**asdict(lpo.Config()), **lpo.PRESETS[name]}
    settings["num_children"] = cfg.num_children
    settings["resolution"] = cfg.resolution or settings["resolution"]
    settings["sample_batch_size"] = cfg.sample_batch_size or settings["sample_batch_size"]
    settings["train_batch_size"] = cfg.train_batch_size or settings["train_batch_size"]
    if cfg.grad_ckpt != "preset":
        settings["grad_ckpt"] = cfg.grad_ckpt == "on"
    return lpo.Config(**settings)


def load_lpo_stage(name, cfg, device):
    """lpo.py's resident set: policy denoiser + LoRA (reference = adapters off) + AdamW, the text
    encoders, the frozen LRM (its own denoiser and text encoders, without the parts it never runs,
    half precision)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lrm_dtype = DTYPES[cfg.lrm_dtype] if device.type == "cuda" else torch.float32
    settings = lpo_settings(name, cfg)
    pipe = load_pipeline(name, device, dtype)
    pipe.vae.to("cpu")   # lpo.py trains without the VAE on its GPU (the pixel reward brings it)
    for encoder in text_encoders(pipe):
        encoder.requires_grad_(False)
    settings.resolution = settings.resolution or default_resolution(pipe)
    latent_size = settings.resolution // pipe.vae_scale_factor
    lrm = latent_reward_model(pipe, settings.resolution, copy_networks=True)
    lrm.for_scoring().to(device, lrm_dtype)
    grad_ckpt = settings.grad_ckpt
    lora = add_lora(denoiser(pipe), settings.lora_rank, settings.seed, grad_ckpt)
    # as lpo.main: AdamW (0.9, 0.999), weight decay 1e-4, eps 1e-8
    optimizer = torch.optim.AdamW(lora, lr=settings.lr, weight_decay=1e-4, eps=1e-8)
    schedule = make_schedule(pipe.scheduler.config, settings.num_inference_steps,
                             settings.th_min, settings.th_max, device, latent_size)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    speedups(cfg, denoiser(pipe), lrm.denoiser)
    return LPOStage(pipe, settings, lrm, lora, optimizer, schedule, autocast, device, dtype,
                    latent_size)


def conditional_rows(cond):
    """The conditional half of a CFG batch [uncond; cond], for tensors and dicts of them."""
    if isinstance(cond, dict):
        return {key: conditional_rows(value) for key, value in cond.items()}
    return cond.chunk(2)[1]


def unconditional_row(cond):
    """The first unconditional row of a CFG batch (they are all the same: "" or zeros)."""
    if isinstance(cond, dict):
        return {key: unconditional_row(value) for key, value in cond.items()}
    return cond[:1]


@torch.no_grad()
def make_batch(stage, size, seed):
    """`size` prompts (distinct tokens in every tokenizer), their CFG conditioning, latents."""
    generator = torch.Generator(device=stage.device).manual_seed(seed)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]
    resolution = stage.settings.resolution
    cond = encode_for_cfg(stage.pipe, prompts, resolution)
    # Diffusion-DPO: the conditional rows only, one per image of a pair
    cond_pair = conditional_rows(encode_for_cfg(stage.pipe, prompts + prompts, resolution))
    shape = (size, latent_channels(stage.pipe), stage.latent_size, stage.latent_size)
    latents = [torch.randn(shape, generator=generator, device=stage.device) for _ in range(3)]
    prompt_ids = torch.arange(size)
    return Batch(prompts, prompt_ids, generator, cond, cond_pair, *latents)


class PixelReward:
    """SPO-style step reward with the LRM's interface, so lpo.sample_tuples runs it unchanged: per
    child an x0 prediction (one more CFG pass of the policy), a VAE decode, and a CLIP ViT-H/14-size
    image tower (PickScore's) scoring 100 * cos(image, text) at 224 px."""

    def __init__(self, stage, cfg):
        self.stage = stage
        dtype = stage.dtype
        full_size_model = denoiser(stage.pipe).config.sample_size >= 64
        vit_config = VIT_H if full_size_model else TINY_VIT
        with torch.device(stage.device):
            self.vit = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_config))
        self.vit.to(dtype).requires_grad_(False)
        self.vae = stage.pipe.vae.to(stage.device).requires_grad_(False)
        self.mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
        speedups(cfg, self.vae, self.vit)

    def encode_text(self, prompts):
        """Cached once per pass, like the LRM's: the policy's CFG conditioning and a text
        embedding, per prompt under "cond" (the rows lpo.sample_tuples repeats K times)."""
        resolution = self.stage.settings.resolution
        cond = encode_for_cfg(self.stage.pipe, prompts, resolution)
        generator = torch.Generator().manual_seed(len(prompts))
        width = self.vit.config.projection_dim
        embedding = torch.randn(len(prompts), width, generator=generator)   # (B, D)
        embedding = F.normalize(embedding, dim=-1).to(self.stage.device)
        per_prompt = dict(denoiser=conditional_rows(cond), emb=embedding)
        return dict(cond=per_prompt, uncond=unconditional_row(cond))

    def x0(self, x, t, text):
        """x0 of each child at its own noise level t (lpo.py's lrm_t "child")."""
        cond = uncond_then_cond(text["uncond"], text["cond"]["denoiser"])
        guidance = self.stage.settings.guidance_scale
        schedule = self.stage.schedule
        # eps (U-Net) or velocity (SD3), (n, C, h, w)
        prediction = guided_prediction(denoiser(self.stage.pipe), x, t, cond, guidance)
        if isinstance(schedule, FlowSchedule):
            level = torch.as_tensor(t, device=x.device) / schedule.train_timesteps
            return predict_x0_flow(x, prediction, level.float().view(-1, 1, 1, 1))
        alpha_bar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # (n, 1, 1, 1)
        return predict_x0(x, prediction, alpha_bar)

    def decode(self, x0):
        """The pipeline's decode: z = latents / scaling_factor (+ shift_factor: SD3)."""
        shift = self.vae.config.get("shift_factor") or 0.0
        latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents).sample   # (n, 3, H, W) in [-1, 1]

    def reward(self, images, embedding):
        size = self.vit.config.image_size
        pixels = (images.float() + 1) / 2
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True)
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        image_embeds = self.vit(pixel_values=pixels.to(self.vit.dtype)).image_embeds
        return 100 * F.cosine_similarity(image_embeds.float(), embedding, dim=-1)   # (n,)

    @torch.no_grad()
    def score(self, latents, timesteps, text):
        # all B x K children in one batch through denoiser, VAE and image tower
        with self.stage.autocast:
            images = self.decode(self.x0(latents, timesteps, text))
            return self.reward(images, text["cond"]["emb"])


def sampling_pass(stage, batch, reward):
    """lpo.py's whole sampling pass (its steps x K children) with this reward; returns lpo.py's
    own split of its seconds: "sample" (CFG denoise + the schedule's step) and "score" (the
    reward)."""
    seconds = {}
    reward_text = reward.encode_text(batch.prompts)
    sample_tuples(denoiser(stage.pipe), reward, batch.cond, reward_text, batch.prompt_ids,
                  stage.schedule, stage.settings, batch.generator, seconds, stage.autocast)
    return seconds


def lpo_update(stage, batch):
    """One update of lpo.py's training loop: lpo.pair_logprobs (winner and loser under the
    policy and the reference = LoRA off, CFG), lpo_loss, backward, lpo.apply_update."""
    size = len(batch.prompts)
    t = torch.full((size,), T, device=stage.device)
    t_prev = torch.full((size,), T_PREV, device=stage.device)
    minibatch = dict(x_t=batch.x_t, x_w=batch.x_w, x_l=batch.x_l, t=t, t_prev=t_prev,
                     prompt_ids=batch.prompt_ids)
    logprobs = pair_logprobs(denoiser(stage.pipe), minibatch, batch.cond, stage.schedule,
                             stage.settings, stage.autocast)
    loss, _ = lpo_loss(*logprobs, stage.settings.beta, stage.settings.clip_eps)
    loss.backward()
    try:
        apply_update(stage.lora, stage.optimizer, loss, 1)
    except NonFiniteUpdate as error:  # random weights can overflow in half precision
        fail(f"the timed LPO update was not finite ({error})")


def make_dpo(stage, name):
    """Diffusion-DPO trains the whole denoiser (fp32 weights, bf16 autocast); the bf16 base is its
    reference. Its launchers: --learning_rate 1e-8 --scale_lr, 2048 pairs a step."""
    recipe = DPO_RECIPES[name]
    base = denoiser(stage.pipe)
    with torch.device(stage.device):
        policy = type(base).from_config(base.config)
    if recipe["grad_ckpt"]:
        policy.enable_gradient_checkpointing()
    lr = 1e-8 * 2048
    if recipe["adafactor"]:
        optimizer = transformers.Adafactor(policy.parameters(), lr=lr, weight_decay=1e-2,
                                           clip_threshold=1.0, scale_parameter=False,
                                           relative_step=False)
    else:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-2)
    return policy, optimizer


def prediction_error(model, x, t, cond, target):
    """Per-sample MSE of the denoiser's output against its target (the noise; SD3: the
    velocity).  (n, C, h, w) -> (n,)"""
    return (model(x, timestep=t, **cond).sample.float() - target).pow(2).mean((1, 2, 3))


def noised_and_target(stage, x0, noise, t):
    """Training input and target at t: DDPM's sqrt(a_t) x0 + sqrt(1 - a_t) e and e, or SD3's
    rectified flow (1 - s) x0 + s e and its velocity e - x0, s = t / 1000."""
    if isinstance(stage.schedule, FlowSchedule):
        level = (t.float() / stage.schedule.train_timesteps).view(-1, 1, 1, 1)   # (n, 1, 1, 1)
        return (1 - level) * x0 + level * noise, noise - x0
    return stage.pipe.scheduler.add_noise(x0, noise, t), noise


def dpo_update(stage, policy, optimizer, batch):
    """One Diffusion-DPO step: the same t and noise for winner and loser; policy vs reference."""
    size = len(batch.prompts)
    generator = batch.generator
    t = torch.randint(0, 1000, (size,), generator=generator, device=stage.device).repeat(2)
    noise = torch.randn(batch.x_w.shape, generator=generator, device=stage.device)
    noise = noise.repeat(2, 1, 1, 1)                                              # (2B, C, h, w)
    x, target = noised_and_target(stage, torch.cat([batch.x_w, batch.x_l]), noise, t)
    reference = denoiser(stage.pipe)
    with stage.autocast:
        err = prediction_error(policy, x, t, batch.cond_pair, target)             # (2B,)
        reference.disable_adapters()                                              # reference = base
        with torch.no_grad():
            ref_err = prediction_error(reference, x, t, batch.cond_pair, target)
        reference.enable_adapters()
    diffusion_dpo_loss(err, ref_err, 5000.0).backward()                           # --beta_dpo 5000
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- phases 6-9: stages
@dataclass
class LRMStage:
    """What lrm.py holds on its GPU: the LRM being trained (fp32 weights, bf16 autocast), AdamW,
    the frozen fp32 VAE, the base's noising (DDPM, or SD3's flow); lrm.py's preset for the model."""
    lrm: LatentRewardModel
    vae: AutoencoderKL
    optimizer: torch.optim.Optimizer
    noise_scheduler: object  # DDPMScheduler or FlowMatchEulerDiscreteScheduler, as lrm.py's
    autocast: torch.autocast
    settings: lrm_script.Config   # lrm.py's preset for the model
    latent_size: int


def lrm_settings(name, cfg):
    """lrm.py's own preset for `name`, at the bench's resolution."""
    settings = {**asdict(lrm_script.Config()), **lrm_script.PRESETS[name]}
    settings["resolution"] = cfg.resolution
    return lrm_script.Config(**settings)


def load_lrm_stage(name, cfg, device):
    """lrm.py's model and optimizer (AdamW, weight decay on matrices only, its preset's lr and
    checkpointing), built as lrm.main builds them."""
    settings = lrm_settings(name, cfg)
    pipe = load_pipeline(name, device, torch.float32)
    settings.resolution = settings.resolution or default_resolution(pipe)
    lrm = latent_reward_model(pipe, settings.resolution, copy_networks=False)
    lrm.train()
    if settings.grad_ckpt:
        lrm.denoiser.enable_gradient_checkpointing()
    trained = [p for p in lrm.parameters() if p.requires_grad]
    matrices = dict(params=[p for p in trained if p.ndim >= 2], weight_decay=settings.weight_decay)
    vectors = dict(params=[p for p in trained if p.ndim < 2], weight_decay=0.0)
    optimizer = torch.optim.AdamW([matrices, vectors], lr=settings.lr)
    vae = pipe.vae.requires_grad_(False)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    noise_scheduler = lrm_noising(pipe)
    latent_size = settings.resolution // pipe.vae_scale_factor
    return LRMStage(lrm, vae, optimizer, noise_scheduler, autocast, settings, latent_size)


def lrm_noising(pipe):
    """The noising lrm.py trains with: the base's flow matching (SD3), else DDPM."""
    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


def make_pairs(stage, pairs, seed):
    """A collated batch as lrm.Pairs gives it: `pairs` random pairs (a decisive pair, then a tie,
    and so on), images in [-1, 1], one t a pair, the VAE's and the added noise of each image."""
    generator = torch.Generator().manual_seed(seed)
    size = stage.settings.resolution
    pixels = torch.rand(pairs, 2, 3, size, size, generator=generator)             # (b, 2, 3, H, W)
    channels = stage.vae.config.latent_channels
    noise_shape = (pairs, 2, 2, channels, stage.latent_size, stage.latent_size)
    noise = torch.randn(noise_shape, generator=generator)   # (b, image, VAE | added, C, h, w)
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).repeat(pairs, 1)[:pairs]     # (b, 2)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(pairs)]
    t = torch.full((pairs,), T)
    weight = torch.ones(pairs)
    bad = torch.zeros(pairs, dtype=torch.bool)
    return dict(px=2 * pixels - 1, caption=captions, bad=bad, label=labels, weight=weight, t=t,
                eps=noise)


def lrm_micro_batch(stage, pairs):
    """The micro-batch lrm.py picks for `pairs` pairs a process on this device."""
    device = stage.lrm.logit_scale.device
    return lrm_script.choose_micro_batch(stage.settings, pairs, stage.lrm, device)


def lrm_train_step(stage, batch, micro_batch):
    """One step of lrm.main: lrm.train_step (VAE encode in lrm.py's chunks, add noise, score with
    VFE, Bradley-Terry, backward, in micro-batches), clip, AdamW."""
    device = stage.lrm.logit_scale.device
    settings = stage.settings
    stage.optimizer.zero_grad(set_to_none=True)
    loss, *_ = lrm_script.train_step(stage.lrm, stage.vae, stage.noise_scheduler, batch,
                                     micro_batch, device, settings.vae_batch_size)
    trained = [p for p in stage.lrm.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
    stage.optimizer.step()


@torch.no_grad()
def lrm_validation_batch(stage, batch):
    """One batch of lrm.pair_accuracy (its loop body): lrm.pair_latents, the captions' text
    once, both images of each pair scored at every validation timestep."""
    device = stage.lrm.logit_scale.device
    settings = stage.settings
    latents, noise = lrm_script.pair_latents(stage.vae, batch, device, settings.vae_batch_size)
    prompts = [caption for caption in batch["caption"] for _ in range(2)]
    stage.lrm.eval()
    text = stage.lrm.encode_text(prompts)
    for step in VALIDATION_TIMESTEPS:
        t = torch.full((len(latents),), step, device=device)
        x_t = lrm_script.add_noise(stage.noise_scheduler, latents, noise, t)     # (2b, C, h, w)
        with stage.autocast:
            stage.lrm.score(x_t, t, text=text)                                    # (2b,)
    stage.lrm.train()


def vqa_scorer(tiny, device, dtype):
    """InstructBLIP flan-t5-xl (or a tiny one) with an offline processor (deviation 1)."""
    image_size = 32 if tiny else 224
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    tokenizer = tiny_tokenizer()
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=tiny_tokenizer(),
                                      num_query_tokens=4 if tiny else 32)
    # flan-t5's 32,128 tokens; the tiny one: the tokenizer's + the processor's <image> token
    vocabulary = len(processor.tokenizer) if tiny else 32128
    t5 = T5Config(**(TINY_T5 if tiny else T5_XL), vocab_size=vocabulary, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    sizes = dict(vision_config=TINY_VIT, qformer_config=TINY_QFORMER) if tiny else {}
    queries = 4 if tiny else 32
    config = InstructBlipConfig(**sizes, text_config=t5.to_dict(), num_query_tokens=queries,
                                image_token_index=image_token)
    with torch.device(device):
        model = InstructBlipForConditionalGeneration(config)
    return model.to(dtype).eval(), processor


def mpcf_scorers(tiny, device, dtype, with_vqa):
    """mpcf.py's three scorers at their published sizes (random weights), or tiny ones."""
    tokenizer = tiny_tokenizer()
    image_size = 32 if tiny else 224
    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    vision = dict(TINY_VIT, projection_dim=768) if tiny else VIT_L
    text = TINY_VIT if tiny else CLIP_H_TEXT
    text = {k: v for k, v in text.items() if k not in ("patch_size", "image_size")}
    clip_config = CLIPConfig(text_config=text_config(tokenizer, **text).to_dict(),
                             vision_config=TINY_VIT if tiny else VIT_H,
                             projection_dim=32 if tiny else 1024)
    with torch.device(device):
        aesthetic = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        clip = CLIPModel(clip_config)
        # LAION's aesthetic head: 768-1024-128-64-16-1, no activations
        widths = (768, 1024, 128, 64, 16, 1)
        head = torch.nn.Sequential(*map(torch.nn.Linear, widths[:-1], widths[1:]))
    scorers = dict(aesthetic=(aesthetic.to(dtype).eval(), image_processor, head),
                   clip=(clip.to(dtype).eval(), CLIPProcessor(image_processor, tokenizer)))
    if with_vqa:
        scorers["vqa"] = vqa_scorer(tiny, device, dtype)
    return scorers


@torch.no_grad()
def mpcf_batch(scorers, images, captions):
    """One batch of mpcf.py's real scorers (its load_scorers' score_images, re-assembled):
    its aesthetic_score, clip_score and vqa_score on 2 x 32 images."""
    vision, image_processor, head = scorers["aesthetic"]
    pixels = image_processor(images=images, return_tensors="pt").pixel_values
    image_embeds = vision(pixel_values=pixels.to(vision.device, vision.dtype)).image_embeds
    head = head.to(vision.device)
    scores = dict(aesthetic=mpcf.aesthetic_score(image_embeds, head))        # (N,)
    clip, processor = scorers["clip"]
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True,
                       truncation=True)
    out = clip(**inputs.to(device=clip.device, dtype=clip.dtype))
    scores["clip"] = mpcf.clip_score(out.image_embeds, out.text_embeds)       # (N,)
    if "vqa" in scorers:
        question = mpcf.Config.vqa_question
        scores["vqa"] = mpcf.vqa_score(*scorers["vqa"], question, images, captions)   # (N,)
    return scores


def random_images(count, size, seed):
    generator = np.random.default_rng(seed)
    arrays = generator.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return [Image.fromarray(array) for array in arrays]


def sample_settings(name):
    """sample.py's config for this preset: its batch, steps, CFG and eta."""
    return sample.Config(**{**asdict(sample.Config()), **sample.PRESETS.get(name, {})})


def eval_batch_size(name):
    """sample.py's per-GPU batch for this preset."""
    return sample_settings(name).batch_size


@torch.no_grad()
def eval_batch(pipe, prompts, resolution, seed, settings):
    """One batch of sample.py (its preset `settings`): DDIM 20 steps, CFG 5, eta 0 (SD3: its Euler
    sampler, 28 steps, CFG 7), VAE decode."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, height=resolution, width=resolution,
                generator=generator, output_type="np",
                **sample.sampler_options(pipe, settings)).images


# ----------------------------------------------------------------------------- measuring
def reset_peaks(device):
    """Start a phase's peak memory: CUDA counters, or the process's peak RSS (Linux VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")   # 5: reset the peak resident set size to the current one
    except OSError:
        pass


def peak_rss_gb():
    """The process's peak resident set since reset_peaks (GB = 1e9 bytes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed(fn, device, warmup, repeats):
    """fn() `warmup` times, then `repeats` timed runs: median seconds, peak GPU memory (GB = 1e9
    bytes) of the timed runs, and the per-key medians of what fn returns (a dict of seconds)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    reset_peaks(device)
    seconds = []
    parts = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        parts.append(result if isinstance(result, dict) else {})
        if cuda:
            torch.cuda.synchronize(device)   # kernels are asynchronous: wait for them
        seconds.append(time.perf_counter() - start)
    split = {key: statistics.median(part[key] for part in parts) for key in parts[0]}
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    return statistics.median(seconds), peak, split


class Recorder:
    """Runs the phases of one model and keeps their numbers in `results`, a log row a phase."""

    def __init__(self, name, cfg, device, log):
        self.name = name
        self.cfg = cfg
        self.device = device
        self.log = log
        self.results = {}

    def measure(self, key, fn, warmup=None, repeats=None, per=1):
        warmup = self.cfg.warmup if warmup is None else warmup
        repeats = self.cfg.repeats if repeats is None else repeats
        seconds, peak, split = timed(fn, self.device, warmup, repeats)
        row = {key + "_s": seconds / per, key + "_peak_gb": peak}   # peak allocated by tensors
        row[key + "_reserved_gb"] = None
        if self.device.type == "cuda":
            row[key + "_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 1e9  # + cache
        else:
            row[key + "_rss_gb"] = peak_rss_gb()
        for part, part_seconds in split.items():
            row[f"{key}_{part}_s"] = part_seconds / per
        self.results.update(row)
        self.log(dict(model=self.name, phase=key, **row))

    def measure_memory(self, key, fn):
        """A memory phase: one warm-up (if --warmup), one measured run; its result is dropped."""
        def run():
            fn()
        self.measure(key, run, warmup=min(self.cfg.warmup, 1), repeats=1)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_lpo(recorder, name):
    """Phases 5, 1-3 and 4 on lpo.py's resident set, into recorder.results."""
    cfg = recorder.cfg
    stage = load_lpo_stage(name, cfg, recorder.device)
    settings = stage.settings
    results = recorder.results
    results["resolution"] = settings.resolution
    batches = f"{settings.sample_batch_size}x{cfg.num_children} / {settings.train_batch_size}"
    results["iteration_batches"] = batches
    # 5 first, with only what lpo.py holds resident, at its per-GPU batches
    bench_iteration(recorder, stage)
    # 1 and 3 at --batch_size: whole 20-step sampling passes, reported per step
    batch = make_batch(stage, cfg.batch_size, cfg.seed + 2)
    steps = len(stage.schedule.timesteps)
    recorder.measure("lpo_step", lambda: sampling_pass(stage, batch, stage.lrm), per=steps)
    recorder.measure("lpo_update", lambda: lpo_update(stage, batch))
    if cfg.pixel:
        bench_pixel(recorder, stage, batch)
    if cfg.dpo:
        # 4: first free what Diffusion-DPO does not hold: it needs a second, fp32 denoiser
        stage.lrm = None
        stage.optimizer = None
        stage.pipe.vae.to("cpu")
        for encoder in text_encoders(stage.pipe):
            encoder.to("cpu")
        free_memory(recorder.device)
        policy, optimizer = make_dpo(stage, name)
        recorder.measure("dpo_update", lambda: dpo_update(stage, policy, optimizer, batch))
        results["ratio_dpo"] = results["dpo_update_s"] / results["lpo_update_s"]


def bench_pixel(recorder, stage, batch):
    """Phase 2: the same sampling pass with the pixel reward, its parts, and the ratios."""
    results = recorder.results
    pixel = PixelReward(stage, recorder.cfg)
    steps = len(stage.schedule.timesteps)
    recorder.measure("pixel_step", lambda: sampling_pass(stage, batch, pixel), per=steps)
    bench_pixel_parts(recorder, stage, pixel, batch)
    results["ratio_step"] = results["pixel_step_s"] / results["lpo_step_s"]
    pixel_iteration = results["pixel_step_s"] + results["lpo_update_s"]
    results["ratio_iteration"] = pixel_iteration / (results["lpo_step_s"] + results["lpo_update_s"])
    stage.pipe.vae.to("cpu")   # back where lpo.py keeps it


def bench_iteration(recorder, stage):
    """Phase 5: one sampling pass and one update at lpo.py's per-GPU batches."""
    settings = stage.settings
    seed = recorder.cfg.seed
    sample_batch = make_batch(stage, settings.sample_batch_size, seed)
    train_batch = make_batch(stage, settings.train_batch_size, seed + 1)

    def iteration():
        sampling_pass(stage, sample_batch, stage.lrm)
        lpo_update(stage, train_batch)
    recorder.measure_memory("lpo_iteration", iteration)


def bench_pixel_parts(recorder, stage, pixel, batch):
    """The pixel reward's parts, on the K children of --batch_size prompts."""
    cfg = recorder.cfg
    channels = latent_channels(stage.pipe)
    shape = (cfg.batch_size * cfg.num_children, channels, stage.latent_size, stage.latent_size)
    children = torch.randn(shape, generator=batch.generator, device=stage.device)
    text = pixel.encode_text([p for p in batch.prompts for _ in range(cfg.num_children)])
    with torch.no_grad(), stage.autocast:
        x0 = pixel.x0(children, T_PREV, text)
        images = pixel.decode(x0)
        recorder.measure("x0_pred", lambda: pixel.x0(children, T_PREV, text))
        recorder.measure("vae_decode", lambda: pixel.decode(x0))
        embedding = text["cond"]["emb"]
        recorder.measure("image_reward", lambda: pixel.reward(images, embedding))


def bench_lrm(recorder, name):
    """Phases 6-7 on lrm.py's resident set."""
    cfg = recorder.cfg
    pairs = cfg.lrm_batch_size or LRM_PAIRS_PER_GPU[name]
    recorder.results["lrm_pairs"] = pairs
    stage = load_lrm_stage(name, cfg, recorder.device)
    micro_batch = lrm_micro_batch(stage, pairs)
    recorder.results["lrm_micro_batch"] = micro_batch
    batch = make_pairs(stage, pairs, cfg.seed)
    recorder.measure_memory("lrm_step", lambda: lrm_train_step(stage, batch, micro_batch))
    # lrm.py validates with the training state resident (weights, AdamW moments)
    recorder.results["lrm_validation_pairs"] = cfg.validation_batch_size
    validation = make_pairs(stage, cfg.validation_batch_size, cfg.seed + 1)
    recorder.measure_memory("lrm_validation", lambda: lrm_validation_batch(stage, validation))


def bench_mpcf(recorder, name):
    """Phase 8 on mpcf.py's resident set: its three scorers."""
    device = recorder.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tiny = name == "tiny"
    scorers = mpcf_scorers(tiny, device, dtype, recorder.cfg.vqa)
    pairs = recorder.cfg.mpcf_batch_size
    recorder.results["mpcf_pairs"] = pairs
    images = random_images(2 * pairs, 64 if tiny else 512, recorder.cfg.seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(2 * pairs)]
    recorder.measure_memory("mpcf_score", lambda: mpcf_batch(scorers, images, captions))


def bench_eval(recorder, name):
    """Phase 9 on sample.py's resident set: the pipeline."""
    cfg = recorder.cfg
    device = recorder.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(name, device, dtype)
    resolution = cfg.resolution or default_resolution(pipe)
    settings = sample_settings(name)
    images = cfg.eval_batch_size or settings.batch_size
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(images)]
    recorder.results["eval_images"] = len(prompts)

    def sample_batch():
        return eval_batch(pipe, prompts, resolution, cfg.seed, settings)
    recorder.measure_memory("eval_sample", sample_batch)


def bench_model(name, cfg, device, log):
    """Every phase of one model, a stage at a time: each stage's networks are freed on return."""
    torch.manual_seed(cfg.seed)
    recorder = Recorder(name, cfg, device, log)
    stages = [bench_lrm, bench_mpcf, bench_eval] * cfg.stages + [bench_lpo]
    for bench_stage in stages:
        if bench_stage is bench_mpcf and name not in ("sd15", "tiny"):
            continue   # MPCF does not depend on the base: measured once, in the sd15 / tiny column
        bench_stage(recorder, name)
        free_memory(device)
    return recorder.results


# ----------------------------------------------------------------------------- report
ROWS = [("1 LPO step, K children [s]", "lpo_step_s"),
        ("    denoise: CFG denoiser + step [s]", "lpo_step_sample_s"),
        ("    LRM scores of the K children [s]", "lpo_step_score_s"),
        ("2 pixel step, K children [s]", "pixel_step_s"),
        ("    denoise: CFG denoiser + step [s]", "pixel_step_sample_s"),
        ("    pixel reward of the K children [s]", "pixel_step_score_s"),
        ("      x0 prediction (CFG denoiser) [s]", "x0_pred_s"),
        ("      VAE decode [s]", "vae_decode_s"),
        ("      ViT-H image reward [s]", "image_reward_s"),
        ("  ratio pixel / latent, per step", "ratio_step"),
        ("3 LPO update [s]", "lpo_update_s"),
        ("  ratio pixel / latent, per step + update", "ratio_iteration"),
        ("4 Diffusion-DPO step, full denoiser [s]", "dpo_update_s"),
        ("  ratio DPO step / LPO update", "ratio_dpo"),
        ("  peak memory of the DPO step [GB]", "dpo_update_peak_gb"),
        ("5 LPO iteration peak memory [GB]", "lpo_iteration_peak_gb"),
        ("    reserved by the allocator [GB]", "lpo_iteration_reserved_gb"),
        ("    CPU: peak resident set [GB]", "lpo_iteration_rss_gb"),
        ("    at sample batch x K / train batch", "iteration_batches"),
        ("    one sampling pass + one update [s]", "lpo_iteration_s")]
STAGE_ROWS = [("6 LRM training step [s]", "lrm_step",
               [("    at pairs per GPU", "lrm_pairs"),
                ("    in micro-batches of (lrm.py's choice)", "lrm_micro_batch")]),
              ("7 LRM validation batch, 5 t [s]", "lrm_validation",
               [("    at pairs", "lrm_validation_pairs")]),
              ("8 MPCF scoring batch [s]", "mpcf_score", [("    at pairs", "mpcf_pairs")]),
              ("9 eval sampling batch [s]", "eval_sample", [("    at images", "eval_images")])]
for title, phase, extra_rows in STAGE_ROWS:
    ROWS.append((title, phase + "_s"))
    ROWS.append(("    peak memory [GB]", phase + "_peak_gb"))
    ROWS.append(("    reserved by the allocator [GB]", phase + "_reserved_gb"))
    ROWS.append(("    CPU: peak resident set [GB]", phase + "_rss_gb"))
    ROWS.extend(extra_rows)


def cell(value):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(results, env):
    settings = env["settings"]
    head = (f"{env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | "
            f"{env['date']} | median of {settings['repeats']} after {settings['warmup']} | "
            f"batch {settings['batch_size']} | LRM {settings['lrm_dtype']} | "
            f"attn {settings['attn']} | grad_ckpt {settings['grad_ckpt']} | "
            f"compile {settings['compile']}")
    columns = "".join(f"{name} {r['resolution']}px".rjust(16) for name, r in results.items())
    lines = [head, "phase".ljust(44) + columns]
    for label, key in ROWS:
        values = "".join(cell(r.get(key)).rjust(16) for r in results.values())
        lines.append(label.ljust(44) + values)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --estimate
class FusedAttention(torch.autograd.Function):
    """Attention that saves what fused kernels (flash, memory-efficient) save: q, k, v, output."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = SDPA(query, key, value)
        ctx.save_for_backward(query, key, value, output)
        return output

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


SDPA = F.scaled_dot_product_attention


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    return FusedAttention.apply(query, key, value)


def saved_bytes(fn, modules):
    """Bytes autograd saves for backward while fn() runs (weights not counted: they are there
    anyway), each storage once; attention counted as fused kernels save it."""
    weights = {id(p) for module in modules for p in module.parameters()}
    saved = {}

    def pack(tensor):
        if id(tensor) not in weights:
            base = tensor if tensor._base is None else tensor._base
            saved[id(base)] = base.numel() * base.element_size()
        return tensor
    F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            kept = fn()   # kept alive until counted: ids stay unique
    finally:
        F.scaled_dot_product_attention = SDPA
    del kept
    return sum(saved.values())


def tensor_bytes(tree):
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, (tuple, list)):
        return sum(map(tensor_bytes, tree))
    if isinstance(tree, dict):
        return sum(map(tensor_bytes, tree.values()))
    return sum(map(tensor_bytes, getattr(tree, "__dict__", {}).values()))


@torch.no_grad()
def working_bytes(fn, modules):
    """Inference: the largest input + output of one layer (leaf module) while fn() runs."""
    largest = [0]

    def hook(module, inputs, output):
        largest[0] = max(largest[0], tensor_bytes(inputs) + tensor_bytes(output))
    handles = []
    for module in modules:
        for layer in module.modules():
            if not list(layer.children()):
                handles.append(layer.register_forward_hook(hook))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def count(module):
    return sum(p.numel() for p in module.parameters())


def count_trained(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def meta_latents(pipe, rows, resolution, dtype):
    """`rows` latents of the pipeline at `resolution` on the meta device.  (rows, C, h, w)"""
    latent_size = resolution // pipe.vae_scale_factor
    shape = (rows, latent_channels(pipe), latent_size, latent_size)
    return torch.zeros(shape, device="meta", dtype=dtype)


def meta_conditioning(pipe, rows, dtype):
    """encode_for_cfg's conditioning of `rows` prompts as zeros on the meta device: U-Net: 77
    CLIP states (SDXL: + pooled text and time_ids); SD3: 77 CLIP + T5's tokens (the pipeline's
    256) of the joint width, and the pooled projections."""
    config = denoiser(pipe).config
    if denoiser_name(pipe) == "transformer":
        tokens = 77 + t5_length(pipe.tokenizer_3)
        states = torch.zeros(rows, tokens, config.joint_attention_dim, device="meta", dtype=dtype)
        pooled = torch.zeros(rows, config.pooled_projection_dim, device="meta", dtype=dtype)
        return dict(encoder_hidden_states=states, pooled_projections=pooled)
    width = config.cross_attention_dim
    cond = dict(encoder_hidden_states=torch.zeros(rows, 77, width, device="meta", dtype=dtype))
    if config.addition_embed_type == "text_time":
        text_embeds = torch.zeros(rows, 1280, device="meta", dtype=dtype)
        time_ids = torch.zeros(rows, 6, device="meta", dtype=dtype)
        cond["added_cond_kwargs"] = dict(text_embeds=text_embeds, time_ids=time_ids)
    return cond


def meta_inputs(pipe, rows, resolution, dtype):
    """Denoiser inputs for `rows` latents on the meta device: latents, timesteps, conditioning."""
    t = torch.full((rows,), T, device="meta")
    return meta_latents(pipe, rows, resolution, dtype), t, meta_conditioning(pipe, rows, dtype)


def denoise(pipe, x, t, cond):
    """One denoiser call, as lpo.guided_prediction makes it (the timestep by name)."""
    return denoiser(pipe)(x, timestep=t, **cond).sample


def estimate_row(stage, batch, weights, trained, activations, autocast_copies=False):
    """One table row: stage_bytes split into weights, training state and activations."""
    total = stage_bytes(weights, trained, activations, autocast_copies)
    weight_bytes = sum(count * size for count, size in weights)
    marks = ["yes" if ok else "no" for ok in fits(total)]
    return dict(stage=stage, batch=batch, parameters=sum(count for count, _ in weights),
                weights_gb=weight_bytes / 1e9, activations_gb=activations / 1e9,
                train_state_gb=(total - weight_bytes - activations) / 1e9, total_gb=total / 1e9,
                marks=marks)


def micro_batch_marks(fixed, per_pair, pairs):
    """Per GPU size: "yes" (all pairs in one pass), "micro N" (lrm.py's gradient accumulation
    in micro-batches of N pairs fits), or "no"."""
    marks = []
    for size in GPU_SIZES_GB:
        room = USABLE_SHARE * size * 2**30 - fixed
        divisors = [d for d in range(1, pairs + 1) if pairs % d == 0 and d * per_pair <= room]
        if not divisors:
            marks.append("no")
        elif divisors[-1] == pairs:
            marks.append("yes")
        else:
            marks.append(f"micro {divisors[-1]}")
    return marks


def estimate_lrm(name, pipe, resolution):
    """LRM training step and validation batch of lrm.py at the paper's per-GPU batch."""
    pairs = LRM_PAIRS_PER_GPU[name]
    lrm = latent_reward_model(pipe, resolution, copy_networks=False)
    settings = lrm_script.PRESETS[name]
    if settings.get("grad_ckpt"):
        lrm.denoiser.enable_gradient_checkpointing()
    lrm.to(torch.bfloat16)   # bf16 autocast: activations in bf16
    vae_batch = settings.get("vae_batch_size", lrm_script.Config.vae_batch_size)
    pixels = torch.zeros(vae_batch, 3, resolution, resolution, device="meta")
    vae_bytes = working_bytes(lambda: pipe.vae.encode(pixels), [pipe.vae])

    def score(rows):
        x = meta_latents(pipe, rows, resolution, torch.bfloat16)
        captions = [CAPTIONS[0]] * rows
        return lrm.score(x, torch.full((rows,), T, device="meta"), prompts=captions)
    activations = saved_bytes(lambda: score(2 * pairs), [lrm])
    weights = [(count(lrm), 4), (count(pipe.vae), 4)]
    trained = count_trained(lrm)
    step = estimate_row("LRM training step", f"{pairs} pairs", weights, trained,
                        activations + vae_bytes, autocast_copies=True)
    # lrm.py accumulates gradients over micro-batches when the whole share does not fit
    fixed = stage_bytes(weights, trained, vae_bytes, autocast_copies=True)
    step["marks"] = micro_batch_marks(fixed, activations / pairs, pairs)
    validation_work = working_bytes(lambda: score(2 * VALIDATION_PAIRS), [lrm])
    validation = estimate_row("LRM validation batch", f"{VALIDATION_PAIRS} pairs", weights,
                              trained, validation_work + vae_bytes)
    return [step, validation]


def estimate_lpo(name, pipe, resolution):
    """One LPO iteration at lpo.py's per-GPU preset: the sampling pass or the update, whichever
    needs more, on top of the resident set."""
    settings = {**asdict(lpo.Config()), **lpo.PRESETS[name]}
    samples = settings["sample_batch_size"]
    pairs = settings["train_batch_size"]
    children = samples * settings["num_children"]
    lrm = latent_reward_model(pipe, resolution, copy_networks=True).for_scoring()
    lrm.to(torch.float16)
    pipe.to(torch.bfloat16)
    policy = denoiser(pipe)
    lora = add_lora(policy, settings["lora_rank"], 0, settings["grad_ckpt"])
    for parameter in lora:
        parameter.data = parameter.data.to(torch.bfloat16)   # autocast: bf16 activations
    x, t, cond = meta_inputs(pipe, 2 * samples, resolution, torch.bfloat16)
    sampling = working_bytes(lambda: denoise(pipe, x, t, cond), [policy])
    kids = meta_latents(pipe, children, resolution, torch.float16)
    t_kids = torch.full((children,), T, device="meta")
    scoring = working_bytes(lambda: lrm.score(kids, t_kids, prompts=[""] * children), [lrm])
    x, t, cond = meta_inputs(pipe, 2 * pairs, resolution, torch.bfloat16)
    update = saved_bytes(lambda: denoise(pipe, x, t, cond), [policy])
    trained = sum(p.numel() for p in lora)
    encoders = sum(map(count, text_encoders(pipe)))
    # frozen weights bf16, the LoRA fp32, text encoders bf16, the LRM fp16 (with its own copy of
    # the text encoders, as lpo.py loads it)
    weights = [(count(policy) - trained, 2), (trained, 4), (encoders, 2), (count(lrm), 2)]
    batches = f"{samples}x{settings['num_children']} / {pairs}"
    activations = max(sampling, scoring, update)
    return [estimate_row("LPO iteration", batches, weights, trained, activations)]


def estimate_eval(name, pipe, resolution):
    """One sample.py batch in fp16: the larger of a CFG denoiser pass and the VAE decode."""
    images = eval_batch_size(name)
    pipe.to(torch.float16)
    x, t, cond = meta_inputs(pipe, 2 * images, resolution, torch.float16)
    denoising = working_bytes(lambda: denoise(pipe, x, t, cond), [denoiser(pipe)])
    latents = x[:images]
    decode = working_bytes(lambda: pipe.vae.decode(latents), [pipe.vae])
    modules = [denoiser(pipe), pipe.vae] + text_encoders(pipe)
    weights = [(sum(map(count, modules)), 2)]
    activations = max(denoising, decode)
    return [estimate_row("eval sampling batch", f"{images} images", weights, 0, activations)]


def estimate_mpcf():
    """mpcf.py's three scorers in fp16 on 2 x 32 images at 224 px (image towers' activations)."""
    scorers = mpcf_scorers(False, "meta", torch.float16, with_vqa=True)
    vision, _, head = scorers["aesthetic"]
    clip = scorers["clip"][0]
    vqa = scorers["vqa"][0]
    pixels = torch.zeros(2 * MPCF_PAIRS, 3, 224, 224, device="meta", dtype=torch.float16)
    towers = (vision, clip.vision_model, vqa.vision_model)
    activations = max(working_bytes(lambda: tower(pixel_values=pixels), [tower])
                      for tower in towers)
    weights = [(count(vision) + count(clip) + count(vqa), 2), (count(head), 4)]
    row = estimate_row("MPCF scoring batch", f"{MPCF_PAIRS} pairs", weights, 0, activations)
    return dict(row, model="any", resolution=224)


def memory_estimate(models):
    """Rows (stage, model, px, per-GPU batch, parameters, weights GB, gradients + AdamW GB,
    activations GB, total GB, fits 24 / 40 / 80 GB) for sd15 / sdxl / sd3, all on the meta
    device."""
    rows = []
    for name in models:
        for builder in (estimate_lrm, estimate_lpo, estimate_eval):
            # each estimate gets fresh networks (it casts them and adds a LoRA)
            pipe = full_size(name, "meta")
            resolution = default_resolution(pipe)
            for row in builder(name, pipe, resolution):
                rows.append(dict(row, model=name, resolution=resolution))
    rows.append(estimate_mpcf())
    return rows


def markdown_estimate(rows):
    lines = ["Computed, not measured (bench.py --estimate): parameters x bytes of the published",
             "architectures, + fp32 gradients and AdamW moments of what is trained (+ bf16",
             "autocast copies), + activations counted on the meta device (training: saved for",
             "backward; inference: the largest layer's input + output). Fits: total under",
             f"{USABLE_SHARE:.0%} of the GPU; \"micro N\": fits with lrm.py's gradient",
             "accumulation in micro-batches of N pairs.",
             "",
             "| stage | model | px | per-GPU batch | parameters | weights GB | grads + AdamW GB |"
             " activations GB | total GB | 24 GB | 40 GB | 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        marks = " | ".join(row["marks"])
        lines.append(f"| {row['stage']} | {row['model']} | {row['resolution']} | {row['batch']} |"
                     f" {row['parameters'] / 1e9:.3f}B | {row['weights_gb']:.1f} |"
                     f" {row['train_state_gb']:.1f} | {row['activations_gb']:.1f} |"
                     f" {row['total_gb']:.1f} | {marks} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def environment(cfg, device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}"
    return dict(device=name, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                diffusers=diffusers.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda, settings=asdict(cfg))


def comparable(env):
    """What must match for --resume to add a model to the same table."""
    settings = {k: v for k, v in env["settings"].items() if k not in ("model", "resume")}
    return env["device"], settings


def run_estimate(cfg):
    models = [name for name in cfg.model.split(",") if name in FULL_SIZE] or list(FULL_SIZE)
    text = markdown_estimate(memory_estimate(models))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "memory_estimate.md"), "w") as md_file:
        md_file.write(text + "\n")
    print(text)
    return text


def main(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("it measures one GPU; run it with python, not torchrun")
    threads = torch.get_num_threads()   # restored at the end: main() may run inside another program
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.estimate:
            return run_estimate(cfg)
        return run_bench(cfg)
    finally:
        torch.set_num_threads(threads)


def read_results(path, resume):
    """The bench.json to add to (--resume), or {}; refuses to write over one without --resume."""
    if not os.path.exists(path):
        return {}
    if not resume:
        fail(f"{path} exists: add to it with --resume, or pass another --out")
    try:
        with open(path) as json_file:
            return json.load(json_file)
    except (OSError, ValueError) as error:
        fail(f"{path} is unreadable ({type(error).__name__}): delete it, or pass another --out")


def run_bench(cfg):
    device = torch.device(cfg.device)
    if device.type == "cuda":   # "cuda" -> "cuda:N": set_device and the memory counters want it
        index = torch.cuda.current_device() if device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    path = os.path.join(cfg.out, "bench.json")
    env = environment(cfg, device)
    old = read_results(path, cfg.resume)
    if old and comparable(old["environment"]) != comparable(env):   # one table, one setting
        fail(f"--resume: {path} was measured on another device or with other settings; "
             "pass another --out")
    prepare_run_folder(cfg.out, resume=True)   # create it, drop a killed write's *.tmp
    names = cfg.model.split(",")
    results = {k: v for k, v in old.get("results", {}).items() if k in names}
    log_path = os.path.join(cfg.out, "bench.jsonl")

    def log(row):
        log_jsonl(log_path, dict(time=time.time(), device=env["device"], **row))
    for name in tqdm(names, desc="bench", disable=not sys.stderr.isatty()):
        if name not in results:
            results[name] = bench_model(name, cfg, device, log)
            report = dict(environment=env, results=results, table=table(results, env))
            write_text(path, json.dumps(report, indent=2))
    print(table(results, env))
    if device.type == "cpu":
        print("(CPU: times and ratios say nothing about a GPU; memory rows are the process's RSS)")
    print(f"bench.py: results in {cfg.out}")
    return results


if __name__ == "__main__":
    main(get_config())
