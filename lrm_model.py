"""The Latent Reward Model (LRM): a diffusion model's own U-Net and text encoder(s) scoring *noisy
latents* against a prompt (arXiv 2502.01051v3, Sec. "Latent Reward Model"). Training: lrm.py.
    lrm = LatentRewardModel.from_pretrained("runs/lrm-sd15", base="sd15")  # refuses another VAE
    # (also reads the official release's folders, casiatao/LRM, given base=)
    s = lrm.score(latents, t, text=lrm.encode_text(prompts))  # latents x scaling_factor -> (B,)
The score S(prompt, x_t, t) = exp(logit_scale) * cos(V, T): V projects the pooled outputs of the
down stages and the mid block of the U-Net at x_t, t (the mid one enhanced by VFE: CFG on the
feature, scale g = 7.5), T the prompt's pooled text feature (SD1.5: CLIP-L's EOS state through a
768 x 768 projection; SDXL: text_encoder_2's projected text_embeds). Widths: SD1.5 320 + 640 +
1280 + 1280 + mid 1280 = 4800 -> 768; SDXL 320 + 640 + 1280 + mid 1280 = 3520 -> 1280.
Choices:
- The U-Net keeps its (frozen) up blocks so unet/ stays a stock diffusers folder; they never run.
  for_scoring() drops them from a frozen LRM (half of SDXL's U-Net: 1.32B parameters, 2.6 GB fp16).
- VFE's unconditional pass encodes "" on SDXL too (as the official LRM-XL), though SDXL's own CFG
  uses zeros.
"""
import json
import os

import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {"tiny": "tiny/sd15", "tiny-xl": "tiny/sdxl",
          "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
          "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


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


# ----------------------------------------------------------------------------- models
def resolve_model(name):
    """--model name, local folder or hub id -> what from_pretrained takes; says what it tried."""
    path = MODELS.get(name, name)
    local = os.path.join(ROOT, path) if path.startswith("tiny/") else path
    if os.path.isdir(local):
        return local
    try:
        DiffusionPipeline.load_config(path)
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"
        raise ValueError(f"model {name!r}: no local folder {os.path.abspath(local)}, and hub id "
                         f"{path!r} failed ({reason})") from None
    return path


def load_text_encoders(path, classes, fallback=None):
    """{"text_encoder": "CLIPTextModel", ...} -> (encoders, tokenizers) from a folder or hub id.
    A subfolder that path lacks comes from fallback, the base pipeline: the official LRM saves no
    tokenizers, and no text encoders when they were frozen."""
    def folder_with(subfolder):
        if fallback is None or os.path.isdir(os.path.join(path, subfolder)):
            return path
        return fallback

    encoders = []
    tokenizers = []
    for name, class_name in classes.items():
        encoder_class = getattr(transformers, class_name)
        encoders.append(encoder_class.from_pretrained(folder_with(name), subfolder=name))
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizer_folder = folder_with(tokenizer_name)
        tokenizers.append(transformers.AutoTokenizer.from_pretrained(tokenizer_folder,
                                                                     subfolder=tokenizer_name))
    return encoders, tokenizers


def base_config(base, unet_config, g=7.5, resolution=None):
    """lrm_config.json's fields that come from the base pipeline: text encoders, resolution,
    latent space, and the base itself as a name that loads from any working directory: a preset's
    (tiny/... resolves against this repository), a hub id as given, a local folder absolute."""
    path = resolve_model(base)
    stored_base = MODELS.get(base, base)
    if not stored_base.startswith("tiny/") and os.path.isdir(path):
        stored_base = os.path.abspath(path)
    index = DiffusionPipeline.load_config(path)
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    classes = {}
    for name in ("text_encoder", "text_encoder_2"):
        if (index.get(name) or [None])[0]:
            classes[name] = index[name][1]
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return dict(base=stored_base, g=g, text_encoders=classes,
                resolution=resolution or unet_config["sample_size"] * vae_factor,
                latent_space=[vae["latent_channels"], vae["scaling_factor"],
                              vae.get("shift_factor")])


def encode_prompt(text_encoders, tokenizers, prompts, resolution):
    """SD1.5: last hidden state, pooled EOS state. SDXL: concat of both penultimate states, pooled =
    text_encoder_2's projected text_embeds, added conditions with time_ids = (H, W, 0, 0, H, W)."""
    xl = len(text_encoders) > 1
    states = []
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=xl)
        if xl:
            states.append(output.hidden_states[-2])  # (B, L, D_i)
            pooled = getattr(output, "text_embeds", None)  # (B, D_text), the last encoder's
        else:
            states.append(output.last_hidden_state)  # (B, L, D)
            pooled = output.pooler_output  # (B, D)
    added = None
    if xl:
        size = [resolution, resolution, 0, 0, resolution, resolution]
        time_ids = torch.tensor([size], device=pooled.device).to(pooled.dtype)  # (1, 6)
        added = dict(text_embeds=pooled, time_ids=time_ids.expand(len(prompts), 6))
    context = torch.cat(states, -1)  # (B, L, sum D_i)
    return {"encoder_hidden_states": context, "added_cond_kwargs": added, "pooled": pooled}


def take_rows(tree, rows):
    """Rows `rows` (a (B,) index tensor) of every tensor in a (nested) dict of batch tensors;
    None stays None."""
    if isinstance(tree, dict):
        return {key: take_rows(value, rows) for key, value in tree.items()}
    if tree is None:
        return None
    return tree[rows.to(tree.device)]


def cross_attention_kwargs(block, context):
    """The text context for a block that attends to it, nothing for one that does not."""
    if getattr(block, "has_cross_attention", False):
        return dict(encoder_hidden_states=context)
    return {}


def down_mid_features(unet, x, t, context, added_cond_kwargs):
    """Pooled features of a stock UNet2DConditionModel in its forward() order, stopping at the mid
    block: time (+ SDXL text_time) embedding, conv_in, down blocks, mid block. Up blocks never
    run. x (B, C, h, w) latents, t (B,) timesteps, context (B, L, D) the text states."""
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
    mid_kwargs = cross_attention_kwargs(unet.mid_block, context)
    mid = unet.mid_block(hidden, time_embedding, **mid_kwargs)  # (B, C_mid, h', w')
    return features + [mid.mean((2, 3))]  # + (B, C_mid)


HEADS = ("visual_projection", "text_projection")


class LatentRewardModel(torch.nn.Module):
    def __init__(self, unet, text_encoders, tokenizers, config):
        super().__init__()
        self.unet = unet
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers
        xl = len(text_encoders) > 1
        text_config = text_encoders[-1].config
        # SDXL: 1280-d text_embeds; SD1.5: 768-d pooled EOS state
        dim = text_config.projection_dim if xl else text_config.hidden_size
        width = sum(feature_widths(unet.config))
        self.visual_projection = torch.nn.Linear(width, dim, bias=False)
        self.text_projection = None if xl else torch.nn.Linear(dim, dim, bias=False)
        for head in self.heads().values():
            torch.nn.init.normal_(head.weight, std=0.02)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # ln(1/0.07), as CLIP
        for module in (unet.up_blocks, unet.conv_norm_out, unet.conv_out):
            if module is not None:
                module.requires_grad_(False)  # never run: out of training
        self.config = {**config, "feature_width": width, "text_dim": dim}
        self.g = config["g"]
        self.resolution = config["resolution"]
        self.scoring_only = False

    def heads(self):
        """{name: Linear} of the projection heads this LRM has (SDXL has no text projection)."""
        return {name: getattr(self, name) for name in HEADS if getattr(self, name) is not None}

    def for_scoring(self):
        """Frozen and in eval mode, without the U-Net parts score() never runs (up blocks, output
        convs): the same scores in about half the memory, but no longer savable or trainable."""
        self.scoring_only = True
        self.unet.up_blocks = torch.nn.ModuleList()
        self.unet.conv_norm_out = None
        self.unet.conv_act = None
        self.unet.conv_out = None
        return self.requires_grad_(False).eval()

    @classmethod
    def from_base(cls, model_id_or_path, g=7.5, resolution=None, text_projection_init=None):
        path = resolve_model(model_id_or_path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        config = base_config(model_id_or_path, unet.config, g, resolution)
        lrm = cls(unet, *load_text_encoders(path, config["text_encoders"]), config)
        if text_projection_init and lrm.text_projection is not None:
            clip = transformers.CLIPTextModelWithProjection.from_pretrained(text_projection_init)
            lrm.text_projection.weight.data.copy_(clip.text_projection.weight)
        return lrm

    def save_pretrained(self, out_dir):
        """The official LRM layout (unet/, text_encoder*/, state_dict.pt), the tokenizers, and
        lrm_config.json written last: a folder with lrm_config.json is complete."""
        if self.scoring_only:
            raise ValueError("this LRM went through for_scoring() (no up blocks): save the full "
                             "model instead")
        self.unet.save_pretrained(os.path.join(out_dir, "unet"))
        parts = zip(self.config["text_encoders"], self.text_encoders, self.tokenizers)
        for name, encoder, tokenizer in parts:
            encoder.save_pretrained(os.path.join(out_dir, name))
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            tokenizer.save_pretrained(os.path.join(out_dir, tokenizer_name))
        heads = {name: head.state_dict() for name, head in self.heads().items()}
        heads["logit_scale"] = self.logit_scale.detach().cpu()
        torch.save(heads, os.path.join(out_dir, "state_dict.pt"))
        with open(os.path.join(out_dir, "lrm_config.json"), "w") as config_file:
            json.dump({**self.config, "g": self.g}, config_file, indent=2)

    @classmethod
    def from_pretrained(cls, lrm_dir, base=None, force=False):
        """An LRM folder of lrm.py, or of the official release (unet/, text_encoder*/ if trained,
        state_dict.pt; no config or tokenizers: those come from `base`, g = 7.5 as in its code).
        With `base`, refuse an LRM of another latent space unless force. Refuses non-finite
        weights (a diverged training run)."""
        official = not os.path.exists(os.path.join(lrm_dir, "lrm_config.json"))
        # save_pretrained always writes tokenizers, the release never does: a folder with them and
        # no lrm_config.json is a save cut short (lrm_config.json is written last)
        entries = os.listdir(lrm_dir) if os.path.isdir(lrm_dir) else []
        if official and any(name.startswith("tokenizer") for name in entries):
            raise ValueError(f"incomplete LRM folder (no lrm_config.json): {lrm_dir} (a save cut "
                             "short: continue its lrm.py run with --resume, or save it again)")
        has_heads = os.path.exists(os.path.join(lrm_dir, "state_dict.pt"))
        if official and (base is None or not has_heads):
            raise ValueError(f"{lrm_dir}: not an LRM folder (no lrm_config.json; the official "
                             "layout, unet/ and state_dict.pt, also needs base=)")
        if official:
            unet_config = UNet2DConditionModel.load_config(lrm_dir, subfolder="unet")
            config = base_config(base, unet_config)
        else:
            with open(os.path.join(lrm_dir, "lrm_config.json")) as config_file:
                config = json.load(config_file)
        if base is not None:  # (an official LRM's latent space is its base's: nothing to check)
            check_latent_space(lrm_dir, config, base, force)
        unet = UNet2DConditionModel.from_pretrained(lrm_dir, subfolder="unet")
        fallback = resolve_model(config["base"]) if official else None
        encoders = load_text_encoders(lrm_dir, config["text_encoders"], fallback)
        lrm = cls(unet, *encoders, config)
        state_path = os.path.join(lrm_dir, "state_dict.pt")
        heads = torch.load(state_path, map_location="cpu", weights_only=True)
        want = {name: head.weight.shape for name, head in lrm.heads().items()}
        have = {name: value["weight"].shape for name, value in heads.items() if name in HEADS}
        if want != have:
            raise ValueError(f"{lrm_dir}: its state_dict.pt heads do not fit an LRM over "
                             f"{config['base']} (another model family?)")
        for name, head in lrm.heads().items():
            head.load_state_dict(heads[name])
        lrm.logit_scale.data.fill_(float(heads["logit_scale"]))
        broken = [name for name, p in lrm.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise ValueError(f"{lrm_dir}: non-finite weights in {len(broken)} tensors (e.g. "
                             f"{broken[0]}): a diverged training run; train it again or use "
                             "another LRM")
        return lrm

    def encode_text(self, prompts):
        """Everything score() needs about the prompts (and "" for VFE): computed once, cacheable.
        Each distinct prompt is encoded once (callers repeat them: 2 images a pair, K children a
        parent)."""
        encoders = list(self.text_encoders)
        position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        rows = torch.tensor([position[prompt] for prompt in prompts])  # (B,) row of each prompt
        distinct = encode_prompt(encoders, self.tokenizers, list(position), self.resolution)
        uncond = None
        if self.g != 1:
            uncond = encode_prompt(encoders, self.tokenizers, [""], self.resolution)
        return {"cond": take_rows(distinct, rows), "uncond": uncond}

    def score(self, latents, timesteps, prompts=None, text=None):
        """latents (B, C, h, w) already times the VAE scaling factor, timesteps int or (B,)
        -> scores (B,)."""
        text = self.encode_text(prompts) if text is None else text
        cond = text["cond"]
        uncond = text["uncond"]
        batch_size = latents.shape[0]
        t = torch.as_tensor(timesteps, device=latents.device).long().expand(batch_size)  # (B,)
        x = latents.to(self.unet.dtype)
        context = cond["encoder_hidden_states"]  # (B, L, D)
        added = cond["added_cond_kwargs"]
        # VFE: one batched pass, the B conditional rows first, then the B with ""
        if uncond is not None:
            x = torch.cat([x, x])  # (2B, C, h, w)
            t = torch.cat([t, t])
            empty_context = uncond["encoder_hidden_states"].expand(batch_size, -1, -1)
            context = torch.cat([context, empty_context])  # (2B, L, D)
            if added is not None:
                empty_added = uncond["added_cond_kwargs"]
                added = {key: torch.cat([value, empty_added[key].expand(batch_size, -1)])
                         for key, value in added.items()}
        features = down_mid_features(self.unet, x, t, context, added)  # [(2B, C_i)]
        if uncond is not None:  # down-stage features from the conditional pass only, VFE on the mid
            mid = features[-1]  # (2B, C_mid)
            enhanced = vfe(mid[:batch_size], mid[batch_size:], self.g)  # (B, C_mid)
            features = [feature[:batch_size] for feature in features[:-1]] + [enhanced]
        pooled = torch.cat(features, -1).to(self.visual_projection.weight.dtype)  # (B, sum C_i)
        visual = self.visual_projection(pooled)  # (B, D)
        text_feature = cond["pooled"]  # (B, D)
        if self.text_projection is not None:
            text_feature = self.text_projection(text_feature.to(self.text_projection.weight.dtype))
        return lrm_score(visual, text_feature, self.logit_scale)


def check_latent_space(lrm_dir, config, base, force):
    """Refuse an LRM trained in another VAE's latent space than base's, unless force."""
    vae = AutoencoderKL.load_config(resolve_model(base), subfolder="vae")
    theirs = [vae["latent_channels"], vae["scaling_factor"], vae.get("shift_factor")]
    if theirs != config["latent_space"] and not force:
        raise ValueError(
            f"LRM {lrm_dir} was trained in the latent space of {config['base']} (latent "
            f"channels, scaling, shift = {config['latent_space']}) but base {base!r} has "
            f"{theirs}: an LRM does not transfer across VAEs (the paper's SD1.5 LRM fails on "
            "SDXL). force=True loads it anyway.")
