"""The Latent Reward Model (LRM): a diffusion model's own denoiser (U-Net or MMDiT) and text
encoder(s) scoring *noisy latents* against a prompt (arXiv 2502.01051v3, Sec. "Latent Reward
Model"). Training: lrm.py.
    lrm = LatentRewardModel.from_pretrained("runs/lrm-sd15", base="sd15")  # refuses another VAE
    s = lrm.score(latents, t, text=lrm.encode_text(prompts))  # latents as the pipeline's -> (B,)
S(prompt, x_t, t) = exp(logit_scale) cos(V, T): V projects the pooled outputs of the U-Net's down
stages and mid block at x_t, t (the mid one enhanced by VFE: CFG on the feature, g = 7.5); T is
the prompt's pooled text feature (SD1.5: CLIP-L's EOS state through a 768 x 768 projection; SDXL:
text_encoder_2's text_embeds). Widths: SD1.5 4800 -> 768, SDXL 3520 -> 1280. SD3 (the paper's
MMDiT version): V projects the mean image token after the first N joint blocks (the paper's
"layer 18" of SD3-Medium's 24, read as its first 18 blocks; default round(0.75 x blocks)), with
VFE, 1536 -> 2048; T = the pipeline's pooled projections (768 + 1280), no text projection.
Units: latents as the pipeline's (z x scaling_factor; SD3 (z - shift_factor) x scaling_factor);
t the denoiser's own (U-Net: DDPM's integer t; SD3: sigma x 1000, a float).
Choices:
- The U-Net keeps its frozen up blocks (never run) so unet/ stays a stock diffusers folder;
  for_scoring() drops them (SDXL: 1.32B parameters), as the MMDiT's blocks N.., norm_out, proj_out.
- VFE's unconditional pass encodes "" on SDXL too (as the official LRM-XL; SDXL's CFG uses zeros).
- SD3's text encoders are frozen (paper) and not saved (T5-XXL is 9.5 GB in fp16): they and the
  tokenizers come from the base, as in the official release; SD1.5's and SDXL's train and are
  saved. T5 reads min(256, tokenizer_3.model_max_length) tokens, as the SD3 pipeline's default.
"""
import json
import os

import torch
import torch.nn.functional as F
import transformers
from diffusers import (AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel,
                       UNet2DConditionModel)
from torch.utils.checkpoint import checkpoint

from models import (BASES, DENOISERS, denoiser_subfolder, encode_prompt, resolve_model,
                    uncond_then_cond)
from runs import non_finite, write_safetensors


# ----------------------------------------------------------------------------- math
def vfe(mid_cond, mid_uncond, g):
    """Visual Feature Enhancement: CFG on the pooled mid feature, V = V_u + g (V_c - V_u)."""
    return mid_uncond + g * (mid_cond - mid_uncond)


def lrm_score(visual, text, logit_scale):
    """S(prompt, x_t, t) = exp(logit_scale) * cos(V, T), in fp32, V the projected visual feature,
    T the projected text feature.  visual, text: (B, D) -> (B,)"""
    visual = F.normalize(visual.float(), dim=-1)  # (B, D)
    text = F.normalize(text.float(), dim=-1)  # (B, D)
    return logit_scale.float().exp() * (visual * text).sum(-1)


def feature_widths(unet_config):
    """Channels of the pooled features: the last output of each down stage, then the mid block."""
    channels = list(unet_config["block_out_channels"])
    # SD1.5 320+640+1280+1280 + mid 1280 = 4800; SDXL 320+640+1280 + mid 1280 = 3520
    return channels + channels[-1:]


def head_sizes(denoiser, text_encoders):
    """(width of the pooled visual feature, of the text feature T): SD1.5 4800, 768; SDXL 3520,
    1280; SD3-Medium 1536 (the MMDiT's inner width), 2048 (the pooled projections)."""
    if isinstance(denoiser, SD3Transformer2DModel):
        config = denoiser.config
        return config.num_attention_heads * config.attention_head_dim, config.pooled_projection_dim
    text_config = text_encoders[-1].config
    dim = text_config.projection_dim if len(text_encoders) > 1 else text_config.hidden_size
    return sum(feature_widths(denoiser.config)), dim


# ----------------------------------------------------------------------------- models
def load_text_encoders(path, classes, fallback=None):
    """{"text_encoder": "CLIPTextModel", ...} -> (encoders, tokenizers) from a folder or hub id.
    A subfolder that path lacks comes from fallback, the base pipeline: the official LRM saves no
    tokenizers, and no text encoders when they were frozen (as ours for SD3)."""
    def load(loader, subfolder):
        own = fallback is None or os.path.isdir(os.path.join(path, subfolder))
        return loader.from_pretrained(path if own else fallback, subfolder=subfolder)

    encoders = [load(getattr(transformers, kind), name) for name, kind in classes.items()]
    tokenizers = [load(transformers.AutoTokenizer, tokenizer_folder(name)) for name in classes]
    return encoders, tokenizers


def load_denoiser(path):
    """The denoiser of a pipeline or LRM folder (or hub id): its U-Net, or SD3's MMDiT."""
    subfolder = denoiser_subfolder(path)
    return DENOISERS[subfolder].from_pretrained(path, subfolder=subfolder)


def tokenizer_folder(text_encoder):
    """The tokenizer subfolder of a text encoder's: text_encoder_2 -> tokenizer_2."""
    return text_encoder.replace("text_encoder", "tokenizer")


def latent_space(vae_config):
    """lrm_config.json's latent_space of a VAE: [latent channels, scaling, shift (SD3's)]."""
    return [vae_config["latent_channels"], vae_config["scaling_factor"],
            vae_config.get("shift_factor")]


def base_config(base, denoiser_config, g=7.5, resolution=None):
    """lrm_config.json's fields that come from the base pipeline: text encoders, resolution,
    latent space, and the base itself as a name that loads from any working directory: a preset's
    (tiny/... resolves against this repository), a hub id as given, a local folder absolute."""
    path = resolve_model(base)
    stored_base = BASES.get(base, base)
    if not stored_base.startswith("tiny/") and os.path.isdir(path):
        stored_base = os.path.abspath(path)
    index = DiffusionPipeline.load_config(path)
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    classes = {name: index[name][1] for name in names if (index.get(name) or [None])[0]}
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return dict(base=stored_base, g=g, text_encoders=classes,
                resolution=resolution or denoiser_config["sample_size"] * vae_factor,
                latent_space=latent_space(vae))


def tree_map(function, tree):
    """function on every tensor of a (nested) dict of them; None stays None."""
    if isinstance(tree, dict):
        return {key: tree_map(function, value) for key, value in tree.items()}
    return None if tree is None else function(tree)


def take_rows(tree, rows):
    """Rows `rows` (a (B,) index tensor) of every tensor in a (nested) dict of batch tensors."""
    return tree_map(lambda tensor: tensor[rows.to(tensor.device)], tree)


def cross_attention_kwargs(block, context):
    """The text context for a block that attends to it, nothing for one that does not."""
    if getattr(block, "has_cross_attention", False):
        return dict(encoder_hidden_states=context)
    return {}


def down_mid_features(unet, x, t, context, added_cond_kwargs):
    """Pooled features of a stock UNet2DConditionModel in its forward() order up to the mid block
    (time (+ SDXL's text_time) embedding, conv_in, down blocks, mid). x (B, C, h, w), t (B,)"""
    time_embedding = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))  # (B, 4C)
    # SDXL: + the pooled text and time_ids ("text_time"); SD1.5: nothing
    added_embedding = unet.get_aug_embed(emb=time_embedding, encoder_hidden_states=context,
                                         added_cond_kwargs=added_cond_kwargs)
    if added_embedding is not None:
        time_embedding = time_embedding + added_embedding
    if unet.time_embed_act is not None:
        time_embedding = unet.time_embed_act(time_embedding)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=context,
                                                 added_cond_kwargs=added_cond_kwargs)
    hidden = unet.conv_in(x)
    features = []
    for block in unet.down_blocks:
        hidden, residuals = block(hidden_states=hidden, temb=time_embedding,
                                  **cross_attention_kwargs(block, context))
        # the stage's last output, before its downsampler
        features.append(residuals[len(block.resnets) - 1].mean((2, 3)))  # (B, C_i)
    # (B, C_mid, h', w')
    mid = unet.mid_block(hidden, time_embedding, **cross_attention_kwargs(unet.mid_block, context))
    return features + [mid.mean((2, 3))]  # + (B, C_mid)


def mmdit_features(transformer, x, timestep, context, pooled, blocks):
    """Mean image token after the first `blocks` joint blocks of a stock SD3Transformer2DModel, in
    its forward() order (patch and position, time + pooled text and context embeddings, blocks).
    x (B, C, h, w), timestep (B,) sigma x 1000, context (B, L, D), pooled (B, P) -> (B, inner)"""
    hidden = transformer.pos_embed(x).contiguous()  # (B, h w / p^2, inner)
    time_text = transformer.time_text_embed(timestep, pooled)  # (B, inner)
    context = transformer.context_embedder(context)  # (B, L, inner)
    # gradient checkpointing lives in the transformer's forward loop, which this replaces
    recompute = torch.is_grad_enabled() and transformer.gradient_checkpointing
    for block in transformer.transformer_blocks[:blocks]:
        if recompute:
            context, hidden = checkpoint(block, hidden, context, time_text, use_reentrant=False)
        else:  # (hidden_states, encoder_hidden_states, temb)
            context, hidden = block(hidden, context, time_text)
    return hidden.mean(1)  # (B, inner)


def mmdit_blocks(subfolder, denoiser_config, lrm_blocks):
    """The MMDiT blocks an LRM runs: lrm_blocks, or for 0 round(0.75 x its blocks) (paper: 18 of
    SD3-Medium's 24); 0 for a U-Net LRM (subfolder "unet": it reads its down and mid blocks)."""
    if subfolder == "unet":
        if lrm_blocks:
            raise ValueError(f"lrm_blocks {lrm_blocks}: only an MMDiT (SD3) LRM has blocks to "
                             "choose; a U-Net LRM reads its down and mid blocks")
        return 0
    layers = denoiser_config["num_layers"]
    default = round(0.75 * layers)
    if not 0 <= lrm_blocks <= layers:
        raise ValueError(f"lrm_blocks {lrm_blocks}: the MMDiT has {layers} joint blocks (choose "
                         f"1..{layers}, or 0 for {default})")
    return lrm_blocks or default


HEADS = ("visual_projection", "text_projection")
# the denoiser's parts that score() never runs: its blocks from the LRM's N on (a U-Net's N is 0:
# all its up blocks), and its output layers
TAILS = {"unet": ("up_blocks", "conv_norm_out", "conv_act", "conv_out"),
         "transformer": ("transformer_blocks", "norm_out", "proj_out")}


class LatentRewardModel(torch.nn.Module):
    def __init__(self, denoiser, text_encoders, tokenizers, config):
        super().__init__()
        sd3 = isinstance(denoiser, SD3Transformer2DModel)
        self.denoiser_name = "transformer" if sd3 else "unet"
        self.unet = self.transformer = None
        setattr(self, self.denoiser_name, denoiser)
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers
        self.blocks = mmdit_blocks(self.denoiser_name, denoiser.config, config.get("lrm_blocks", 0))
        width, dim = head_sizes(denoiser, text_encoders)
        self.visual_projection = torch.nn.Linear(width, dim, bias=False)
        # SD1.5 projects CLIP-L's pooled state; SDXL's text_embeds and SD3's pooled projections
        # are projected already
        single = len(text_encoders) == 1
        self.text_projection = torch.nn.Linear(dim, dim, bias=False) if single else None
        for head in self.heads().values():
            torch.nn.init.normal_(head.weight, std=0.02)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # ln(1/0.07), as CLIP
        for module in self.unused_parts():
            module.requires_grad_(False)  # never run: out of training
        self.text_trained = not sd3
        self.config = dict(config, feature_width=width, text_dim=dim)
        self.config.pop("lrm_blocks", None)  # a U-Net LRM has none; SD3's: its count, last
        if sd3:
            self.text_encoders.requires_grad_(False)  # paper: SD3's text encoders frozen
            self.config["lrm_blocks"] = self.blocks
        self.g = config["g"]
        self.resolution = config["resolution"]
        self.scoring_only = False

    @property
    def denoiser(self):
        """The U-Net (SD1.5, SDXL) or the MMDiT (SD3)."""
        return getattr(self, self.denoiser_name)

    def unused_parts(self):
        """The denoiser's modules that score() never runs (TAILS): U-Net: up blocks, output convs;
        MMDiT: blocks N.., norm_out, proj_out."""
        blocks, *outputs = (getattr(self.denoiser, name) for name in TAILS[self.denoiser_name])
        return [part for part in (blocks[self.blocks:], *outputs) if part is not None]

    def train(self, mode=True):
        """nn.Module.train, but frozen text encoders stay in eval mode: T5's dropout (0.1 in SD3's
        config) would otherwise perturb the text states at random."""
        super().train(mode)
        if not self.text_trained:
            self.text_encoders.eval()
        return self

    def heads(self):
        """{name: Linear} of the projection heads (SDXL has no text projection)."""
        return {name: getattr(self, name) for name in HEADS if getattr(self, name) is not None}

    def for_scoring(self):
        """Frozen, in eval mode, without unused_parts(): the same scores in about half the memory,
        but no longer savable or trainable."""
        self.scoring_only = True
        blocks, *outputs = TAILS[self.denoiser_name]
        setattr(self.denoiser, blocks, getattr(self.denoiser, blocks)[:self.blocks])
        for name in outputs:
            setattr(self.denoiser, name, None)
        return self.requires_grad_(False).eval()

    @classmethod
    def from_base(cls, model_id_or_path, g=7.5, resolution=None, text_projection_init=None,
                  lrm_blocks=0):
        """A fresh LRM (random heads) over a pipeline's denoiser and text encoders; lrm_blocks: an
        SD3 LRM's N (0: round(0.75 x blocks))."""
        path = resolve_model(model_id_or_path)
        denoiser = load_denoiser(path)
        config = base_config(model_id_or_path, denoiser.config, g, resolution)
        encoders = load_text_encoders(path, config["text_encoders"])
        lrm = cls(denoiser, *encoders, dict(config, lrm_blocks=lrm_blocks))
        if text_projection_init and lrm.text_projection is not None:
            clip = transformers.CLIPTextModelWithProjection.from_pretrained(text_projection_init)
            lrm.text_projection.weight.data.copy_(clip.text_projection.weight)
        return lrm

    def save_pretrained(self, out_dir, state=None):
        """The official LRM layout (unet/ or SD3's transformer/, trained text_encoder*/ and their
        tokenizers, state_dict.pt), lrm_config.json last: a folder with it is complete. state: the
        full state dict to write (lrm.py's, gathered from the ranks that shard it)."""
        if self.scoring_only:
            raise ValueError("this LRM went through for_scoring() (no up blocks): save the full "
                             "model instead")
        state = self.state_dict() if state is None else state
        save_model(self.denoiser, state, self.denoiser_name, out_dir)
        for i, name in enumerate(self.config["text_encoders"] if self.text_trained else []):
            save_model(self.text_encoders[i], state, f"text_encoders.{i}", out_dir, name)
            self.tokenizers[i].save_pretrained(os.path.join(out_dir, tokenizer_folder(name)))
        heads = {name: {"weight": state[f"{name}.weight"].cpu()} for name in self.heads()}
        torch.save(dict(heads, logit_scale=state["logit_scale"].cpu()),
                   os.path.join(out_dir, "state_dict.pt"))
        with open(os.path.join(out_dir, "lrm_config.json"), "w") as config_file:
            json.dump({**self.config, "g": self.g}, config_file, indent=2)

    @classmethod
    def from_pretrained(cls, lrm_dir, base=None, force=False):
        """An LRM folder of lrm.py, or of the official release (unet/, text_encoder*/ if trained,
        state_dict.pt; no config or tokenizers: those come from `base`, g = 7.5 as in its code).
        With `base`, refuse an LRM of another latent space unless force. Refuses non-finite
        weights (a diverged training run)."""
        config_path = os.path.join(lrm_dir, "lrm_config.json")
        official = not os.path.exists(config_path)
        if official:
            config = official_config(lrm_dir, base)
        else:
            with open(config_path) as config_file:
                config = json.load(config_file)
        if base is not None and not force:  # (an official LRM's latent space is its base's)
            theirs = latent_space(AutoencoderKL.load_config(resolve_model(base), subfolder="vae"))
            if theirs != config["latent_space"]:
                raise ValueError(
                    f"LRM {lrm_dir} was trained in the latent space of {config['base']} (latent "
                    f"channels, scaling, shift = {config['latent_space']}) but base {base!r} has "
                    f"{theirs}: an LRM does not transfer across VAEs (the paper's SD1.5 LRM fails "
                    "on SDXL). force=True loads it anyway.")
        denoiser = load_denoiser(lrm_dir)
        # the release's tokenizers and frozen encoders, and all of SD3's, are the base's
        from_base = official or isinstance(denoiser, SD3Transformer2DModel)
        fallback = resolve_model(config["base"]) if from_base else None
        lrm = cls(denoiser, *load_text_encoders(lrm_dir, config["text_encoders"], fallback), config)
        heads = torch.load(os.path.join(lrm_dir, "state_dict.pt"), map_location="cpu",
                           weights_only=True)
        shapes = {name: value["weight"].shape for name, value in heads.items() if name in HEADS}
        if shapes != {name: head.weight.shape for name, head in lrm.heads().items()}:
            raise ValueError(f"{lrm_dir}: its state_dict.pt heads do not fit an LRM over "
                             f"{config['base']} (another model family?)")
        for name, head in lrm.heads().items():
            head.load_state_dict(heads[name])
        lrm.logit_scale.data.fill_(float(heads["logit_scale"]))
        broken = non_finite(dict(lrm.named_parameters()), "weights")
        if broken:
            raise ValueError(f"{lrm_dir}: non-finite weights in {broken}: a diverged training run; "
                             "train it again or use another LRM")
        return lrm

    def shard_units(self):
        """The trained modules lrm.py shards (FSDP2), inner ones first, each called as a module:
        the U-Net's down / mid resnets, attentions, blocks and embeddings (MMDiT: the first N
        blocks, the embedders), trained text encoders' layers, then each; the heads."""
        model = self.denoiser
        if self.transformer is not None:
            units = [*model.transformer_blocks[:self.blocks], model.pos_embed,
                     model.time_text_embed, model.context_embedder]
        else:
            blocks = [*model.down_blocks, model.mid_block]
            units = [unit for block in blocks
                     for unit in [*block.resnets, *getattr(block, "attentions", [])]]
            units += blocks + [model.time_embedding, getattr(model, "add_embedding", None),
                               model.conv_in]
        encoders = [*self.text_encoders] if self.text_trained else []
        layers = [layer for encoder in encoders for layer in encoder.get_encoder().layers]
        return [unit for unit in units + layers + encoders + list(self.heads().values())
                if unit is not None]

    def encode_text(self, prompts):
        """Everything score() needs about the prompts (and "" for VFE), each distinct prompt
        encoded once (callers repeat them: 2 images a pair, K children a parent), in the
        denoiser's dtype (a pipeline sharing the text encoders may cast them)."""
        def encode(texts):
            encoded = encode_prompt(self.text_encoders, self.tokenizers, texts, self.resolution)
            return tree_map(lambda tensor: tensor.to(self.denoiser.dtype), encoded)
        distinct = list(dict.fromkeys(prompts))
        rows = torch.tensor([distinct.index(prompt) for prompt in prompts])  # (B,)
        return {"cond": take_rows(encode(distinct), rows),
                "uncond": encode([""]) if self.g != 1 else None}

    def features(self, x, t, cond):
        """The denoiser's pooled features [(B, C_i)] at x, t, the last one VFE's."""
        context = cond["encoder_hidden_states"]  # (B, L, D)
        if self.transformer is None:
            return down_mid_features(self.unet, x, t.long(), context, cond["added_cond_kwargs"])
        # SD3's t is sigma x 1000, a float: not rounded; pooled (B, D_pooled)
        return [mmdit_features(self.transformer, x, t.float(), context,
                               cond["pooled_projections"], self.blocks)]

    def score(self, latents, timesteps, prompts=None, text=None):
        """latents (B, C, h, w) as the pipeline's (scaled, SD3 also shifted), timesteps a number
        or (B,) in the denoiser's unit -> scores (B,)."""
        text = self.encode_text(prompts) if text is None else text
        cond = text["cond"]
        batch = len(latents)
        t = torch.as_tensor(timesteps, device=latents.device).expand(batch)  # (B,)
        x = latents.to(self.denoiser.dtype)
        if text["uncond"] is None:  # g = 1: V = V_c, no unconditional pass
            features = self.features(x, t, cond)
        else:  # VFE: one batched pass, the B rows with "" first, then the B conditional ones
            inputs = uncond_then_cond(text["uncond"], cond)
            *earlier, last = self.features(torch.cat([x, x]), torch.cat([t, t]), inputs)
            # [(2B, C_i)]: the earlier ones from the conditional pass only, VFE on the last
            features = [feature[batch:] for feature in earlier]
            features.append(vfe(last[batch:], last[:batch], self.g))  # (B, C_last)
        pooled = torch.cat(features, -1).to(self.visual_projection.weight.dtype)  # (B, sum C_i)
        text_feature = cond["pooled"]  # (B, D)
        if self.text_projection is not None:
            text_feature = self.text_projection(text_feature.to(self.text_projection.weight.dtype))
        return lrm_score(self.visual_projection(pooled), text_feature, self.logit_scale)


def save_model(model, state, prefix, out_dir, subfolder=None):
    """What save_pretrained writes (diffusers or transformers), from `model`'s config and the
    weights under `prefix.` in a state dict."""
    folder = os.path.join(out_dir, subfolder or prefix)
    os.makedirs(folder, exist_ok=True)
    weights = {key[len(prefix) + 1:]: value.detach().cpu().contiguous()
               for key, value in state.items() if key.startswith(prefix + ".")}
    diffusers = hasattr(model, "save_config")
    (model.save_config if diffusers else model.config.save_pretrained)(folder)
    name = "diffusion_pytorch_model" if diffusers else "model"
    write_safetensors(weights, os.path.join(folder, f"{name}.safetensors"))


def official_config(lrm_dir, base):
    """lrm_config.json's fields for a folder without one: the official release's layout (unet/,
    text_encoder*/ if trained, state_dict.pt), read with its base; refused if it is not that."""
    # save_pretrained always writes tokenizers (SD3: a transformer/), the release never does:
    # such a folder without lrm_config.json is a save cut short (lrm_config.json is last)
    entries = os.listdir(lrm_dir) if os.path.isdir(lrm_dir) else []
    if any(name.startswith(("tokenizer", "transformer")) for name in entries):
        raise ValueError(f"incomplete LRM folder (no lrm_config.json): {lrm_dir} (a save cut "
                         "short: continue its lrm.py run with --resume, or save it again)")
    if base is None or not os.path.exists(os.path.join(lrm_dir, "state_dict.pt")):
        raise ValueError(f"{lrm_dir}: not an LRM folder (no lrm_config.json; the official "
                         "layout, unet/ and state_dict.pt, also needs base=)")
    return base_config(base, UNet2DConditionModel.load_config(lrm_dir, subfolder="unet"))

