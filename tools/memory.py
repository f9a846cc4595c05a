"""tools/memory.py: which stage fits a 24 / 40 / 80 GB GPU, computed without one: the published
architectures built on the meta device (no weights, no GPU, a minute of CPU) at each stage's
per-GPU settings.

A stage's bytes per GPU: the weights it holds (parameters x bytes each, as the stage holds them),
its train state, + activations, counted on the meta device at the real resolution and batch: for
a training step, the bytes autograd saves for backward (attention counted as fused kernels save
it: q, k, v and the output, never the attention matrix); for inference, the largest input +
output of one layer. "Fits": the total stays under 90% of the GPU (the CUDA context and the
allocator's cache take the rest); "micro N": it fits with lrm.py's gradient accumulation in
micro-batches of N pairs.
lrm.py's step on --world W ranks (FSDP2: one unit a down block, the mid block, a trained
text-encoder layer, a joint block the LRM runs, + the root for the rest; bf16 parameters, fp32
reductions): a rank holds 1/W of the trained parameters (fp32), of their fp32 gradients and of
AdamW's two fp32 moments, + the largest unit unsharded twice in bf16 (the one running, the one
prefetched) and its fp32 gradient once (reduce-scatter); the frozen parts it runs unsharded in bf16
(SD3's text encoders), the VAE in fp32; never the parts the LRM does not run (the U-Net's up
blocks and output convs, the MMDiT's blocks N.., norm_out, proj_out). W = 1: unsharded, each
trained parameter + its bf16 autocast copy. lpo.py's SD3 LRM shares the pipeline's frozen text
encoders (counted once); SD1.5's and SDXL's keep their own (trained) ones.
Computed, not measured: bench.py measures.

    python tools/memory.py                 # sd15, sdxl, sd3 (W = 8): docs/reference.md's table
    python tools/memory.py --model sdxl --world 1
"""
import os
import sys
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig,
                          CLIPVisionModelWithProjection, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, T5Config)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the stages
import bench  # noqa: E402
import lpo  # noqa: E402
import lrm  # noqa: E402
import sample  # noqa: E402
from bench import (T, default_resolution, denoiser, latent_reward_model,  # noqa: E402
                   load_pipeline, preset)
from models import add_lora, encode_for_cfg, text_encoders  # noqa: E402
from runs import command_line, fail, parse_config  # noqa: E402


@dataclass
class Config:
    model: str = "sd15,sdxl,sd3"  # comma list of the full-size models: sd15 | sdxl | sd3
    world: int = 8  # ranks lrm.py's training step is sharded over (FSDP2), in [1, inf); paper: 8


USABLE_SHARE = 0.9
GPU_SIZES_GB = (24, 40, 80)
PAIRS = 32  # lrm.pair_accuracy's validation batch and mpcf.py's scoring batch (real scorers)
# mpcf.py's scorers: openai/clip-vit-large-patch14's image tower, laion/CLIP-ViT-H-14's text
# tower (its image tower: bench.VIT_H), Salesforce/instructblip-flan-t5-xl's flan-t5-xl
VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768,
             hidden_act="quick_gelu")
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, hidden_act="gelu")
T5_XL = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def get_config(argv=None):
    argv = command_line(__file__, argv)
    cfg = parse_config(Config, asdict(Config()), __doc__, argv)
    if not set(cfg.model.split(",")) <= set(bench.FULL_SIZE):
        fail(f"--model {cfg.model!r}: a comma list of {', '.join(bench.FULL_SIZE)}")
    return cfg


# ----------------------------------------------------------------------------- counting
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


def fused_sdpa(query, key, value, *args, **kwargs):
    return FusedAttention.apply(query, key, value)


def saved_bytes(fn, modules):
    """Bytes autograd saves for backward while fn() runs, each storage once; the modules' weights
    are not counted (they are there anyway)."""
    weights = {id(p) for module in modules for p in module.parameters()}
    saved = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in weights:
            saved[id(base)] = base.numel() * base.element_size()
        return tensor
    F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            kept = fn()  # kept alive until counted: ids stay unique
    finally:
        F.scaled_dot_product_attention = SDPA
    del kept
    return sum(saved.values())


def tensor_bytes(tree):
    """Bytes of the tensors in a (nested) tuple, list, dict or model output."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        tree = list(tree.values())
    if not isinstance(tree, (tuple, list)):
        tree = list(getattr(tree, "__dict__", {}).values())
    return sum(map(tensor_bytes, tree))


@torch.no_grad()
def working_bytes(fn, modules):
    """Inference: the largest input + output of one layer (leaf module) while fn() runs."""
    largest = [0]

    def hook(module, inputs, output):
        largest[0] = max(largest[0], tensor_bytes(inputs) + tensor_bytes(output))
    layers = [layer for module in modules for layer in module.modules()]
    handles = [layer.register_forward_hook(hook) for layer in layers if not list(layer.children())]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def count(modules, trained=False):
    """Parameters of the modules (trained: those that require a gradient only)."""
    return sum(p.numel() for module in modules for p in module.parameters()
               if p.requires_grad or not trained)


def latents(pipe, rows, resolution, dtype):
    """`rows` latents of the pipeline at `resolution` on the meta device. (rows, C, h, w)"""
    size = resolution // pipe.vae_scale_factor
    return torch.zeros(rows, pipe.vae.config.latent_channels, size, size, device="meta",
                       dtype=dtype)


def cfg_batch(pipe, prompts, resolution, dtype):
    """The denoiser's inputs for a CFG batch of `prompts` prompts: latents, t, conditioning."""
    t = torch.full((2 * prompts,), T, device="meta")
    cond = encode_for_cfg(pipe, [""] * prompts, resolution)  # [uncond; cond], 2B rows
    return latents(pipe, 2 * prompts, resolution, dtype), t, cond


def row(stage, batch, parameters, weights, state, activations, fixed=0, pairs=1):
    """A table row of one GPU's bytes: `weights` (of `parameters` parameters), `state` (gradients
    and AdamW's moments), activations (for `pairs` pairs) and `fixed` working bytes; per GPU size
    "yes", "micro N" (micro-batches of N of the pairs fit) or "no"."""
    marks = []
    for size in GPU_SIZES_GB:
        room = USABLE_SHARE * size * 2**30 - weights - state - fixed
        fit = [d for d in range(1, pairs + 1) if pairs % d == 0 and d * activations <= room * pairs]
        marks.append("no" if not fit else "yes" if fit[-1] == pairs else f"micro {fit[-1]}")
    return dict(stage=stage, batch=batch, parameters=parameters, weights_gb=weights / 1e9,
                train_state_gb=state / 1e9, marks=marks, activations_gb=(activations + fixed) / 1e9,
                total_gb=(weights + state + activations + fixed) / 1e9)


def held(weights):
    """(parameters, bytes) of weights [(parameters, bytes each)]."""
    return sum(n for n, _ in weights), sum(n * size for n, size in weights)


def fsdp_units(model):
    """Trained parameters each of lrm.py's FSDP2 units holds itself (the LRM's shard_units, inner
    ones first: a unit's nested units hold their own); last the rest (logit_scale, kept whole)."""
    claimed = set()
    units = []
    for unit in model.shard_units():
        own = [p for p in unit.parameters() if p.requires_grad and p not in claimed]
        claimed.update(own)
        units.append(sum(p.numel() for p in own))
    return units + [count([model], trained=True) - sum(units)]


def trained_bytes(trained, unit, world, backward=True):
    """One rank's bytes of `trained` parameters: (weights, train state). W = 1: fp32 + its bf16
    autocast copy (while a backward needs it), fp32 gradient + AdamW's two moments; W > 1: 1/W of
    those in fp32, + the largest unit (`unit` parameters) unsharded twice in bf16, and (backward)
    its unsharded fp32 gradient."""
    if world == 1:
        return (4 + 2 * backward) * trained, 12 * trained
    return 4 * trained / world + 2 * 2 * unit, 12 * trained / world + 4 * unit * backward


# ----------------------------------------------------------------------------- the stages
def estimate_lrm(name, pipe, resolution, world=8):
    """lrm.py's training step at the paper's per-GPU batch on `world` ranks (bf16 activations) and
    its validation batch (lrm.pair_accuracy's 32 pairs, the training state resident)."""
    pairs = bench.LRM_PAIRS_PER_GPU[name]
    settings = preset(lrm, name)
    model = latent_reward_model(pipe, resolution, copy_networks=False)
    if settings.grad_ckpt:
        model.denoiser.enable_gradient_checkpointing()
    model.to(torch.bfloat16)  # autocast: bf16 activations
    pixels = torch.zeros(settings.vae_batch_size, 3, resolution, resolution, device="meta")
    vae = working_bytes(lambda: pipe.vae.encode(pixels), [pipe.vae])

    def score(images):
        x = latents(pipe, images, resolution, torch.bfloat16)
        return model.score(x, T, prompts=[""] * images)
    trained = count([model], trained=True)
    # frozen parts that run (SD3's text encoders) in bf16, the VAE in fp32; unused ones not held
    frozen = count([model]) - trained - count(model.unused_parts())
    parameters, weights = held([(frozen, 2), (count([pipe.vae]), 4)])
    unit = max(fsdp_units(model))
    step = saved_bytes(lambda: score(2 * pairs), [model])
    validation = working_bytes(lambda: score(2 * PAIRS), [model])
    rows = []
    for stage, batch, backward, activations, micro_pairs in (
            ("LRM training step", f"{pairs} pairs", True, step, pairs),
            ("LRM validation batch", f"{PAIRS} pairs", False, validation, 1)):
        own, state = trained_bytes(trained, unit, world, backward)
        rows.append(row(stage, batch, parameters + trained, weights + own, state, activations,
                        vae, micro_pairs))
    return rows


def estimate_lpo(name, pipe, resolution):
    """One LPO iteration at lpo.py's per-GPU preset: the sampling pass, the LRM's scoring or the
    update, whichever needs more, on top of what lpo.py holds: the frozen networks in bf16, the
    LoRA in fp32, the LRM in fp16 (SD1.5, SDXL: with its own text encoders; SD3: the pipeline's).
    Its ranks are data-parallel: each holds all of it."""
    settings = preset(lpo, name)
    children = settings.sample_batch_size * settings.num_children
    reward = latent_reward_model(pipe, resolution, copy_networks=True).for_scoring()
    reward.to(torch.float16)
    pipe.to(torch.bfloat16)
    policy = denoiser(pipe)
    lora = add_lora(policy, settings.lora_rank, 0, settings.grad_ckpt)
    for parameter in lora:
        parameter.data = parameter.data.to(torch.bfloat16)  # autocast: bf16 activations
    x, t, cond = cfg_batch(pipe, settings.sample_batch_size, resolution, torch.bfloat16)
    sampling = working_bytes(lambda: policy(x, timestep=t, **cond), [policy])
    kids = latents(pipe, children, resolution, torch.float16)
    scoring = working_bytes(lambda: reward.score(kids, T, prompts=[""] * children), [reward])
    x, t, cond = cfg_batch(pipe, settings.train_batch_size, resolution, torch.bfloat16)
    update = saved_bytes(lambda: policy(x, timestep=t, **cond).sample, [policy])
    trained = sum(p.numel() for p in lora)
    shared = 0 if reward.text_trained else count(reward.text_encoders)  # SD3: the pipeline's
    parameters, weights = held([(count([policy]) - trained, 2), (trained, 4),
                                (count(text_encoders(pipe)), 2), (count([reward]) - shared, 2)])
    batches = f"{settings.sample_batch_size}x{settings.num_children} / {settings.train_batch_size}"
    activations = max(sampling, scoring, update)
    return [row("LPO iteration", batches, parameters, weights, 12 * trained, activations)]


def estimate_eval(name, pipe, resolution):
    """One sample.py batch in fp16: the larger of a CFG denoiser pass and the VAE decode."""
    images = preset(sample, name).batch_size
    pipe.to(torch.float16)
    network = denoiser(pipe)
    x, t, cond = cfg_batch(pipe, images, resolution, torch.float16)
    denoising = working_bytes(lambda: network(x, timestep=t, **cond), [network])
    decoding = working_bytes(lambda: pipe.vae.decode(x[:images]), [pipe.vae])
    parameters = count([network, pipe.vae] + text_encoders(pipe))
    activations = max(denoising, decoding)
    return [row("eval sampling batch", f"{images} images", parameters, 2 * parameters, 0,
                activations)]


def mpcf_scorers(device):
    """mpcf.py's scorers at their published sizes: the aesthetic predictor (CLIP ViT-L/14 image
    tower, LAION's MLP head without activations), CLIP ViT-H/14, InstructBLIP flan-t5-xl."""
    text = CLIPTextConfig(**CLIP_H_TEXT, **bench.TOKEN_IDS).to_dict()
    with torch.device(device):
        aesthetic = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L))
        widths = (768, 1024, 128, 64, 16, 1)
        head = torch.nn.Sequential(*map(torch.nn.Linear, widths[:-1], widths[1:]))
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=bench.VIT_H,
                                    projection_dim=1024))
        t5 = T5Config(**T5_XL, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        vqa = InstructBlipForConditionalGeneration(InstructBlipConfig(text_config=t5.to_dict()))
    return aesthetic, head, clip, vqa


def estimate_mpcf():
    """mpcf.py's three scorers in fp16 on 2 x 32 images at 224 px (the image towers')."""
    aesthetic, head, clip, vqa = mpcf_scorers("meta")
    pixels = torch.zeros(2 * PAIRS, 3, 224, 224, device="meta", dtype=torch.float16)
    towers = [aesthetic.half(), clip.half().vision_model, vqa.half().vision_model]
    activations = max(working_bytes(lambda: tower(pixel_values=pixels), [tower])
                      for tower in towers)
    parameters, weights = held([(count([aesthetic, clip, vqa]), 2), (count([head]), 4)])
    return row("MPCF scoring batch", f"{PAIRS} pairs", parameters, weights, 0, activations)


# ----------------------------------------------------------------------------- the table
def estimate(models, world=8):
    """The rows of every stage of the models (fresh meta networks for each: an estimate casts
    them and adds a LoRA), lrm.py's on `world` ranks, then MPCF's, which does not depend on the
    model."""
    rows = []
    for name in models:
        for builder in (partial(estimate_lrm, world=world), estimate_lpo, estimate_eval):
            pipe = load_pipeline(name, "meta")
            resolution = default_resolution(pipe)
            rows += [dict(r, model=name, px=resolution) for r in builder(name, pipe, resolution)]
    return rows + [dict(estimate_mpcf(), model="any", px=224)]


def markdown(rows, world=8):
    """The table of the rows, as docs/reference.md shows it."""
    sharding = f"lrm.py's step sharded over {world} ranks (FSDP2)" if world > 1 else "unsharded"
    lines = [f"Computed, not measured (python tools/memory.py --world {world}): per GPU, "
             f"{sharding}; see its docstring.", "",
             "| stage | model | px | per-GPU batch | parameters | weights GB | grads + AdamW GB |"
             " activations GB | total GB | 24 GB | 40 GB | 80 GB |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['model']} | {r['px']} | {r['batch']} |"
                     f" {r['parameters'] / 1e9:.3f}B | {r['weights_gb']:.1f} |"
                     f" {r['train_state_gb']:.1f} | {r['activations_gb']:.1f} |"
                     f" {r['total_gb']:.1f} | {' | '.join(r['marks'])} |")
    return "\n".join(lines)


def main(cfg):
    text = markdown(estimate(cfg.model.split(","), cfg.world), cfg.world)
    print(text)
    return text


if __name__ == "__main__":
    main(get_config())
