"""All tests: CPU only, no network, on the embedded tiny world (python -m pytest -q test_all.py)."""
import os

# the same suite on any machine: CPU (a GPU runner would try cuda:1 in the 2-rank tests), the hub
# offline (read by huggingface_hub at import), both before torch / diffusers are imported; every
# subprocess inherits them
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"

import atexit
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       StableDiffusion3Pipeline, UNet2DConditionModel)
from PIL import Image
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel,
                          CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast)

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
torch.set_num_threads(1)
# one scratch folder for the inputs made at collection (bad-input files), removed at exit
SCRATCH = tempfile.mkdtemp(prefix="lpo-minimal-tests-")
atexit.register(shutil.rmtree, SCRATCH, True)  # the tiny networks' ops are too small to split across threads

import bench  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
from tools import memory  # noqa: E402
import eval as ev  # noqa: E402
import lpo  # noqa: E402
import lrm as L  # noqa: E402
import lrm_model as M  # noqa: E402
import models  # noqa: E402
import mpcf  # noqa: E402
import runs  # noqa: E402
import sample  # noqa: E402
from mpcf import STRATEGIES, get_config, main, mpcf_keep, pair_gaps  # noqa: E402
from tiny import make_world  # noqa: E402
from tiny.make_world import images_to_tensor  # noqa: E402
from tiny.world import (CAPTIONS, COLORS, RES, SHAPES, draw, from_jpeg,  # noqa: E402
                        human_labels, judge_scores, random_drawing, to_jpeg)


# ============================================================================ fixtures
# (shared by the stage sections below; module-scoped ones are built once per run)
@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory):
    """The first 160 tiny-world train rows with one unreadable image (row 3) and one unlabelled row (5)."""
    from datasets import load_dataset
    ds = load_dataset("tiny/pickapic", split="train")
    ds = ds.select(range(min(160, len(ds)))).to_pandas()
    ds.loc[3, "jpg_1"] = b"\xff\xd8 broken"
    ds.loc[5, ["has_label", "label_0", "label_1"]] = [False, 0.0, 0.0]
    path = str(tmp_path_factory.mktemp("w") / "train.parquet")
    ds.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tiny_real_scorers(tmp_path_factory):
    """Random tiny CLIP-L stand-in (projection 768), CLIP, BLIP-2-T5 and InstructBLIP-T5, saved
    to folders and read back by the same from_pretrained calls as the real checkpoints."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor, T5Config)
    d = tmp_path_factory.mktemp("scorers")
    tok = lambda: CLIPTokenizer.from_pretrained("tiny/sd15/tokenizer")  # noqa: E731
    t = tok()
    torch.manual_seed(0)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
    improc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vis, projection_dim=768)).save_pretrained(d / "aes")
    improc.save_pretrained(d / "aes")
    os.makedirs(d / "head")
    torch.save(LaionMLP().state_dict(), d / "head" / "sac+logos+ava1-l14-linearMSE.pth")
    txt = dict(vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
               pad_token_id=t.pad_token_id)
    CLIPModel(CLIPConfig(text_config=txt, vision_config=vis, projection_dim=16)).save_pretrained(d / "clip")
    CLIPProcessor(image_processor=improc, tokenizer=t).save_pretrained(d / "clip")
    bimg = BlipImageProcessor(size={"height": 32, "width": 32})
    for name in ("blip2", "instructblip"):
        proc = Blip2Processor(image_processor=bimg, tokenizer=tok(), num_query_tokens=4) if name == "blip2" else \
            InstructBlipProcessor(image_processor=bimg, tokenizer=tok(), qformer_tokenizer=tok(), num_query_tokens=4)
        v = len(proc.tokenizer)  # + the <image> token the processor added
        t5 = T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).to_dict()
        qf = dict(vocab_size=v, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  encoder_hidden_size=32)
        kw = dict(vision_config=vis, qformer_config=qf, text_config=t5, num_query_tokens=4,
                  image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"))
        model = Blip2ForConditionalGeneration(Blip2Config(**kw)) if name == "blip2" else \
            InstructBlipForConditionalGeneration(InstructBlipConfig(**kw))
        model.save_pretrained(d / name)
        proc.save_pretrained(d / name)
    return d


@pytest.fixture(scope="module")
def fresh_lrm(tmp_path_factory):
    """An untrained LRM on each tiny base: enough for the code paths (not for learning)."""
    from lrm_model import LatentRewardModel
    out = {}
    for name, base in (("sd", "tiny/sd15"), ("xl", "tiny/sdxl")):
        torch.manual_seed(0)
        out[name] = str(tmp_path_factory.mktemp(f"lrm-{name}"))
        LatentRewardModel.from_base(base).save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def lora_dir(tmp):
    """A LoRA as lpo.py makes and saves one (peft adapter, lpo.save_lora), with non-zero B."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from lpo import save_lora
    pipe = StableDiffusionPipeline.from_pretrained("tiny/sd15")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:   # peft starts B at zero: an untrained LoRA changes nothing
                p.normal_(0, 0.3)
    out = str(tmp / "lora")
    os.makedirs(out)
    save_lora(pipe, pipe.unet, out)
    return out


@pytest.fixture(scope="module")
def lrm_dir(tmp):
    from lrm_model import LatentRewardModel
    torch.manual_seed(0)
    out = str(tmp / "lrm")
    LatentRewardModel.from_base("tiny").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp):
    """A random CLIP (+ processor, + aesthetic MLP .pth) built from config and saved to disk, so the
    scorers go through the same from_pretrained / torch.load code as PickScore, CLIP-H and LAION's."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tok = AutoTokenizer.from_pretrained("tiny/sd15/tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tok), max_position_embeddings=16,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16,
                        logit_scale_init_value=3.0)
    torch.manual_seed(0)
    path = str(tmp / "clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    dims = [16, 1024, 128, 64, 16, 1]   # LAION's MLP shape on a 16-d embedding
    sd = {}
    for i, k in enumerate((0, 2, 4, 6, 7)):
        sd[f"layers.{k}.weight"] = torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5
        sd[f"layers.{k}.bias"] = torch.randn(dims[i + 1]) * 0.1
    torch.save(sd, str(tmp / "aesthetic.pth"))
    return path, str(tmp / "aesthetic.pth")


@pytest.fixture(scope="module")
def round_trip(tmp, lora_dir, lrm_dir, tiny_clip):
    """eval.py in its main mode: sample base and base + LoRA (sample.py), score, report."""
    out = str(tmp / "rt")
    ev.main(ev.get_config(["--lora", lora_dir, *eval_argv(out, lrm_dir, tiny_clip)]))
    return out


@pytest.fixture(scope="module")
def tiny():
    """Both tiny worlds with what the phases need (K = 2 children), and a batch of 2 prompts."""
    # sample / train batch 0: lpo.py's own per-GPU batches
    argv = ["--tiny", "--num_children", "2", "--sample_batch_size", "0", "--train_batch_size", "0"]
    cfg = bench.get_config(argv)
    out = {}
    for name in ("tiny", "tiny-xl"):
        torch.manual_seed(0)
        stage = bench.load_lpo_stage(name, cfg, CPU)
        out[name] = (stage, bench.make_batch(stage, 2, seed=1), bench.PixelReward(stage))
    return out


# ============================================================================ tiny world
def test_tiny_world_loads_through_hub_code_paths():
    from datasets import load_dataset
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    sd = DiffusionPipeline.from_pretrained("tiny/sd15")
    xl = DiffusionPipeline.from_pretrained("tiny/sdxl")
    assert isinstance(sd, StableDiffusionPipeline) and isinstance(xl, StableDiffusionXLPipeline)
    assert sd.unet.dtype == torch.float32 and xl.unet.config.addition_embed_type == "text_time"
    assert sd.vae.config.scaling_factor != 0.18215  # measured for this VAE
    # each caption word is one token of the world's own CLIP tokenizer
    ids = sd.tokenizer("a purple triangle").input_ids
    assert ids[0] == sd.tokenizer.bos_token_id and ids[-1] == sd.tokenizer.eos_token_id and len(ids) == 5
    ds = load_dataset("tiny/pickapic")
    cols = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "num_example_per_prompt", "has_label", "are_different"}
    assert set(ds) == {"train", "validation_unique", "test_unique"}
    assert cols <= set(ds["train"].column_names)
    row = ds["train"][0]
    assert from_jpeg(row["jpg_0"]).size == (32, 32)
    lab = np.array(ds["train"]["label_0"]) + np.array(ds["train"]["label_1"])
    has = np.array(ds["train"]["has_label"])
    assert np.allclose(lab[has], 1.0)  # labelled rows are distributions over the pair
    with open("tiny/world.json") as f:
        info = json.load(f)
    print("\nworld:", info)


def test_tiny_pipeline_generates_pictures_of_shapes():
    from diffusers import DiffusionPipeline
    sd = DiffusionPipeline.from_pretrained("tiny/sd15")
    sd.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(i) for i in range(30)]
    caps = [CAPTIONS[i % 15] for i in range(30)]
    images = sd(caps, num_inference_steps=20, guidance_scale=5.0, generator=g).images
    assert images[0].size == (32, 32)
    match = judge_scores(images, caps)["match"].mean()
    with open("tiny/world.json") as f:
        info = json.load(f)
    if not info["quick"]:  # the shipped base: often, not always, right (room for LPO)
        assert 0.4 <= match <= 0.95, match


def test_judge_reads_shapes_and_prefers_alignment_then_looks():
    for c in COLORS:
        for s in SHAPES:
            img = draw(c, s, 16, 16, 16)
            scores = judge_scores([img] * 2, [f"a {c} {s}", "a green square" if c != "green" else "a red circle"])
            assert scores["match"].tolist() == [1.0, 0.0], (c, s)
            assert scores["vqa"][0] > 0.8 > 0.1 > scores["vqa"][1]
            assert scores["clip"][0] > scores["clip"][1] and scores["human"][0] > scores["human"][1]
    # looks: a mid-sized centred shape beats a tiny one in a corner, both matching
    good, poor = draw("red", "circle", 17, 16, 16), draw("red", "circle", 8, 6, 6)
    s = judge_scores([good, poor], ["a red circle"] * 2)
    assert s["aesthetic"][0] > s["aesthetic"][1] + 1.0 and s["human"][0] > s["human"][1]
    # alignment beats looks: a poor right picture beats a good wrong one
    wrong = draw("blue", "circle", 17, 16, 16)
    s = judge_scores([poor, wrong], ["a red circle"] * 2)
    assert s["human"][0] > s["human"][1]
    # an empty picture matches nothing; JPEG round trip keeps the reading
    blank = draw("red", "circle", 0, -10, -10)
    assert judge_scores([blank], ["a red circle"])["match"][0] == 0.0
    assert judge_scores([from_jpeg(to_jpeg(good))], ["a red circle"])["match"][0] == 1.0


def test_human_labels_ties_and_noise_rate():
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=20_000)
    h1 = h0 + rng.choice([-1.0, 1.0, 0.01], size=h0.shape)
    l0, l1 = human_labels(h0, h1, rng)
    tie = np.abs(h0 - h1) < 0.05
    assert np.all(l0[tie] == 0.5) and np.allclose(l0 + l1, 1.0)
    agree = (l0[~tie] == 1.0) == (h0[~tie] > h1[~tie])
    assert abs((1 - agree.mean()) - 0.10) < 0.01  # 10% of decisive labels flipped


def test_make_world_script_runs_and_is_deterministic(tmp_path):
    from tiny import make_world
    rng = np.random.default_rng(0)
    imgs = [make_world.random_drawing(rng)[0] for _ in range(16)]
    a, _ = make_world.train_vae(imgs, steps=2, bs=4, seed=1)
    b, _ = make_world.train_vae(imgs, steps=2, bs=4, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    out = tmp_path / "world"
    r = subprocess.run([sys.executable, "tiny/make_world.py", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from datasets import load_dataset
    from diffusers import DiffusionPipeline
    assert len(load_dataset(str(out / "pickapic"))["train"]) == 48
    DiffusionPipeline.from_pretrained(str(out / "sdxl"))


# ============================================================================ lrm.py: the Latent Reward Model
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _run_args(out, *extra):
    return ["--model", "tiny", "--out", str(out), "--workers", "0", *map(str, extra)]


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_score_runs_down_and_mid_only_and_matches_stock_unet(model):
    torch.manual_seed(0)
    lrm = M.LatentRewardModel.from_base(model)
    unet = lrm.unet
    calls = []
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.append(n))
             for n, m in [("up", b) for b in unet.up_blocks] + [("conv_out", unet.conv_out)]]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 501, 951])
    s = lrm.score(x, t, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    assert calls == [], "up blocks / conv_out must never run in score()"
    for h in hooks:
        h.remove()
    # width: sum of the pooled channels, derived from the config
    widths = [c for c in unet.config.block_out_channels] + [unet.config.block_out_channels[-1]]
    assert lrm.visual_projection.in_features == sum(widths) == sum(M.feature_widths(unet.config))
    # oracle: the stock UNet2DConditionModel.forward, observed through hooks on its own blocks
    text = models.encode_prompt(list(lrm.text_encoders), lrm.tokenizers, PROMPTS, lrm.resolution)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[1][len(m.resnets) - 1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.no_grad():
        unet(x, t, text["encoder_hidden_states"], added_cond_kwargs=text["added_cond_kwargs"])
        ours = M.down_mid_features(unet, x, t, text["encoder_hidden_states"], text["added_cond_kwargs"])
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in ours] == widths
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b.mean((2, 3)), rtol=1e-5, atol=1e-6)


SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("unet_kw,latent,width,proj", [(SD15_UNET, 64, 4800, 768), (SDXL_UNET, 128, 3520, 1280)])
def test_real_sd15_and_sdxl_widths_on_meta_device(unet_kw, latent, width, proj):
    xl = unet_kw is SDXL_UNET
    with torch.device("meta"):   # real configs, no weights, no memory
        unet = UNet2DConditionModel(**unet_kw)
        encs = [CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12))]
        if xl:
            encs.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280,
                                                                   num_hidden_layers=1, num_attention_heads=20)))
        lrm = M.LatentRewardModel(unet, encs, [None] * len(encs), dict(base="x", g=7.5, resolution=8 * latent))
        x, ctx = torch.randn(1, 4, latent, latent), torch.randn(1, 77, 2048 if xl else 768)
        added = dict(text_embeds=torch.randn(1, 1280), time_ids=torch.randn(1, 6)) if xl else None
        feats = M.down_mid_features(unet, x, torch.tensor([1]), ctx, added)
    assert sum(f.shape[1] for f in feats) == width == lrm.config["feature_width"]
    assert tuple(lrm.visual_projection.weight.shape) == (proj, width)
    assert (lrm.text_projection is None) == xl
    # for_scoring() keeps what down_mid_features runs and frees the rest: over half of each real U-Net
    n = lambda: sum(p.numel() for p in unet.parameters())   # noqa: E731
    before = n()
    lrm.for_scoring()
    with torch.device("meta"):
        again = M.down_mid_features(unet, x, torch.tensor([1]), ctx, added)
    assert [f.shape for f in again] == [f.shape for f in feats] and n() < 0.52 * before


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_encode_text_encodes_each_distinct_prompt_once(model):
    lrm = M.LatentRewardModel.from_pretrained({"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]).eval()
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle", "a green triangle", "a blue square"]
    seen = []
    hooks = [e.register_forward_hook(lambda m, i, o: seen.append(len(i[0]))) for e in lrm.text_encoders]
    with torch.no_grad():
        got = lrm.encode_text(prompts)
        for h in hooks:
            h.remove()
        want = models.encode_prompt(list(lrm.text_encoders), lrm.tokenizers, prompts, lrm.resolution)   # one row each
    assert seen == [3] * len(lrm.text_encoders) + [1] * len(lrm.text_encoders)   # 3 distinct, then "" for VFE
    torch.testing.assert_close(got["cond"], want)


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_for_scoring_same_scores_less_memory_not_savable(model, tmp_path):
    lrm = M.LatentRewardModel.from_pretrained({"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]).eval()
    x, t = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 251, 751, 951])
    up = sum(p.numel() for m in (lrm.unet.up_blocks, lrm.unet.conv_norm_out, lrm.unet.conv_out) for p in m.parameters())
    total = sum(p.numel() for p in lrm.parameters())
    with torch.no_grad():
        want = lrm.score(x, t, PROMPTS + PROMPTS[:1])
        got = lrm.for_scoring().score(x, t, PROMPTS + PROMPTS[:1])
    torch.testing.assert_close(got, want)   # the same ops (fp32 reassociation aside)
    assert sum(p.numel() for p in lrm.parameters()) == total - up and up > 0
    assert not any(p.requires_grad for p in lrm.parameters()) and not lrm.training
    with pytest.raises(ValueError, match="for_scoring"):
        lrm.save_pretrained(str(tmp_path))
    assert not os.listdir(tmp_path)   # refused before writing anything


# ----------------------------------------------------------------------------- math against hand values
def test_vfe_hand_values():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(M.vfe(c, u, 7.5), torch.tensor([8.5, -14.0]))
    assert torch.allclose(M.vfe(c, u, 1.0), c)          # g = 1 disables VFE
    assert torch.allclose(M.vfe(c, u, 0.0), u)


def test_pair_loss_hand_values_ties_and_weights():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    l0, l1 = torch.tensor([1.0, 0.5, 0.0, 0.5]), torch.tensor([0.0, 0.5, 1.0, 0.5])
    w = torch.tensor([1.0, 0.5, 0.25, 0.25])
    # per-pair NLL by hand: -log sigmoid(2); tie at equal scores log 2; -log sigmoid(2); tie at gap 1
    nll = [0.1269280110, 0.6931471806, 0.1269280110, 0.5 * (0.3132616875 + 1.3132616875)]
    expect = sum(wi * n for wi, n in zip([1.0, 0.5, 0.25, 0.25], nll)) / 2.0
    got = L.pair_loss(s0, s1, l0, l1, w)
    assert math.isclose(got.item(), expect, rel_tol=1e-6)
    assert math.isclose(L.pair_loss(s0, s1, l0, l1, 10 * w).item(), expect, rel_tol=1e-6)  # normalised
    # unequal weights matter: uniform weights give the plain mean instead
    assert math.isclose(L.pair_loss(s0, s1, l0, l1, torch.ones(4)).item(), sum(nll) / 4, rel_tol=1e-6)
    # gradient pushes the winner up: d loss / d s0[0] < 0
    s0g = s0.clone().requires_grad_()
    L.pair_loss(s0g, s1, l0, l1, w).backward()
    assert s0g.grad[0] < 0 and s0g.grad[1] == 0


# ----------------------------------------------------------------------------- save / load / bad input
def test_save_load_round_trip_and_latent_space_refusal(tmp_path):
    for model in ("tiny", "tiny-xl"):
        torch.manual_seed(1)
        lrm = M.LatentRewardModel.from_base(model)
        with torch.no_grad():
            lrm.logit_scale.fill_(3.0)
            for p in lrm.unet.down_blocks.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x = torch.randn(3, 4, 8, 8)
        lrm.save_pretrained(tmp_path / model)
        back = M.LatentRewardModel.from_pretrained(str(tmp_path / model), base=model)
        with torch.no_grad():
            torch.testing.assert_close(back.score(x, 251, PROMPTS), lrm.score(x, 251, PROMPTS))
        assert back.config["base"] == models.BASES[model] and back.g == 7.5
    # a base with another latent space (here: another VAE scaling factor) is refused unless forced
    other = tmp_path / "other_base"
    shutil.copytree(os.path.join(ROOT, "tiny/sd15"), other)
    vae_cfg = json.load(open(other / "vae/config.json"))
    vae_cfg["scaling_factor"] = 0.13025
    json.dump(vae_cfg, open(other / "vae/config.json", "w"))
    with pytest.raises(ValueError, match="latent space"):
        M.LatentRewardModel.from_pretrained(str(tmp_path / "tiny"), base=str(other))
    assert M.LatentRewardModel.from_pretrained(str(tmp_path / "tiny"), base=str(other), force=True) is not None


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_official_release_layout_loads_with_its_base(model, tmp_path):
    """The official LRM folder (Kwai-Kolors/LPO's save(): unet/, text_encoder*/ only when trained,
    state_dict.pt = the heads' state dicts + logit_scale as a tensor; no config, no tokenizers) scores
    like the same weights in our layout; a text encoder it lacks (frozen in training) is the base's."""
    src = {"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]
    ours, off = M.LatentRewardModel.from_pretrained(src).eval(), tmp_path / "official"
    encs = list(ours.config["text_encoders"])
    for sub in ["unet"] + encs:
        shutil.copytree(os.path.join(src, sub), off / sub)
    heads = torch.load(os.path.join(src, "state_dict.pt"), weights_only=True)
    torch.save({**heads, "logit_scale": torch.tensor(heads["logit_scale"])}, off / "state_dict.pt")
    with pytest.raises(ValueError, match="needs base="):
        M.LatentRewardModel.from_pretrained(str(off))
    with pytest.raises(ValueError, match="heads do not fit"):   # an SD1.5 LRM over SDXL, or the reverse
        M.LatentRewardModel.from_pretrained(str(off), base={"tiny": "tiny-xl", "tiny-xl": "tiny"}[model])
    x, t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 501, 951])
    got = M.LatentRewardModel.from_pretrained(str(off), base=model).eval()
    assert got.config["base"] == models.BASES[model] and got.g == 7.5 and got.resolution == ours.resolution == 32
    with torch.no_grad():
        torch.testing.assert_close(got.score(x, t, PROMPTS), ours.score(x, t, PROMPTS))
    shutil.rmtree(off / encs[-1])                                   # as if that encoder had been frozen
    got = M.LatentRewardModel.from_pretrained(str(off), base=model)
    base = getattr(__import__("transformers"), ours.config["text_encoders"][encs[-1]]).from_pretrained(
        models.resolve_model(model), subfolder=encs[-1])
    for a, b, c in zip(got.text_encoders[-1].parameters(), base.parameters(), ours.text_encoders[-1].parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(b, c) for b, c in zip(base.parameters(), ours.text_encoders[-1].parameters()))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no local folder .*nowhere"):
        models.resolve_model("/nowhere/model")
    import datasets
    ds = datasets.load_dataset(os.path.join(ROOT, "tiny/pickapic"), split="train").select(range(16))
    os.makedirs(tmp_path / "nolabel"), os.makedirs(tmp_path / "broken")
    ds.remove_columns("label_1").to_parquet(str(tmp_path / "nolabel" / "train-0.parquet"))
    with pytest.raises(ValueError, match="label_1.*nolabel|nolabel.*label_1"):
        L.load_pairs(str(tmp_path / "nolabel"), "train")
    # --keep: mpcf.py's row indices (JSON list or a table with an `index` column), then drop
    # unlabelled pairs and identical images
    flags = ds.map(lambda ex, i: {"has_label": i != 3, "are_different": i != 5}, with_indices=True)
    os.makedirs(tmp_path / "flags")
    flags.to_parquet(str(tmp_path / "flags" / "train-0.parquet"))
    json.dump([1, 3, 5, 7, 9], open(tmp_path / "keep.json", "w"))
    open(tmp_path / "keep.csv", "w").write("index,gap\n9,0.1\n7,0.2\n1,0.3\n")
    kept = L.load_pairs(str(tmp_path / "flags"), "train", str(tmp_path / "keep.json"))
    assert kept["caption"] == [flags[i]["caption"] for i in (1, 7, 9)]
    assert L.load_pairs(str(tmp_path / "flags"), "train", str(tmp_path / "keep.csv"))["jpg_0"] == kept["jpg_0"]
    assert len(L.load_pairs(str(tmp_path / "flags"), "train")) == 14
    # an undecodable image: the pair is kept with weight 0 and flagged
    broken = ds.map(lambda ex, i: {"jpg_0": b"not a jpeg" if i < 4 else ex["jpg_0"],
                                   "has_label": True, "are_different": True}, with_indices=True)
    item = L.Pairs(broken, 32, (4, 8, 8), [1, 51], 0)[(0, 0)]
    assert item["bad"] and item["weight"] == 0 and item["px"].shape == (2, 3, 32, 32)
    good = L.Pairs(broken, 32, (4, 8, 8), [1, 51], 0)[(0, 5)]
    assert not good["bad"] and good["weight"] > 0
    # ... and casts no vote in pair_accuracy: flipping the bad pairs' labels changes nothing
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    flip = lambda w: broken.map(lambda ex, i: {"label_0": float(w) if i < 4 else ex["label_0"],   # noqa: E731
                                               "label_1": float(1 - w) if i < 4 else ex["label_1"]}, with_indices=True)
    assert L.pair_accuracy(lrm, flip(1), [1, 501]) == L.pair_accuracy(lrm, flip(0), [1, 501])
    # 4 of 16 pairs bad (> 1%): the run stops with a clear message
    for split in ("train", "validation_unique", "test_unique"):
        broken.to_parquet(str(tmp_path / "broken" / f"{split}-0.parquet"))
    data = str(tmp_path / "broken")
    with open(tmp_path / "broken" / "README.md", "w") as f:
        f.write("---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
            f"  - split: {s}\n    path: {s}-*.parquet\n" for s in ("train", "validation_unique", "test_unique")) + "---\n")
    with pytest.raises(SystemExit, match="undecodable"):
        L.main(L.get_config(_run_args(tmp_path / "run", "--data", data, "--max_train_steps", 4,
                                      "--train_batch_size", 8)))


# ----------------------------------------------------------------------------- training
def _state(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def _trained(out, base="tiny"):
    """An lrm.py checkpoint's parameter vector as {name: tensor}: exactly the LRM's trained
    parameters (frozen text encoders left out), in AdamW's order (lrm.make_optimizer)."""
    lrm = M.LatentRewardModel.from_base(base)
    params = runs.trained(L.make_optimizer(lrm, L.Config())[1])
    vector = _state(out)["lora"]
    assert vector.numel() == sum(param.numel() for param in params)
    torch.nn.utils.vector_to_parameters(vector, params)
    names = {id(param): name for name, param in lrm.named_parameters()}
    return {names[id(param)]: param.detach() for param in params}


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    args = ("--max_train_steps", 4, "--train_batch_size", 8, "--save_every", 2, "--eval_every", 4,
            "--eval_max_pairs", 2, "--eval_timesteps", "1,951")
    L.main(L.get_config(_run_args(tmp_path / "a", *args)))
    real_log = L.log_jsonl

    def crash_at_step_3(path, rec):   # dies after step 3's update, before its (step 4) checkpoint
        real_log(path, rec)
        if rec.get("step") == 3 and "loss" in rec:
            raise KeyboardInterrupt
    monkeypatch.setattr(L, "log_jsonl", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        L.main(L.get_config(_run_args(tmp_path / "b", *args)))
    assert _state(tmp_path / "b")["step"] == 2
    monkeypatch.setattr(L, "log_jsonl", real_log)
    L.main(L.get_config(_run_args(tmp_path / "b", *args, "--resume")))
    assert _state(tmp_path / "a")["step"] == _state(tmp_path / "b")["step"] == 4
    a, b = _trained(tmp_path / "a"), _trained(tmp_path / "b")
    _assert_same_tensors(a, b)
    fresh = M.LatentRewardModel.from_base("tiny").state_dict()
    assert not torch.equal(a["visual_projection.weight"], fresh["visual_projection.weight"])  # it trained


@pytest.mark.parametrize("model", ["tiny", "tiny-xl", "tiny-sd3"])
def test_shard_units_hold_what_trains_and_nothing_frozen(model):
    """lrm.py shards the LRM's shard_units: together every trained weight but logit_scale (kept
    whole on every rank), none frozen (up blocks, SD3's text encoders and blocks N..)."""
    lrm = M.LatentRewardModel.from_base(model)
    covered = {p for unit in lrm.shard_units() for p in unit.parameters()}
    trained = {p for p in lrm.parameters() if p.requires_grad}
    assert trained - covered == {lrm.logit_scale} and all(p.requires_grad for p in covered)


def test_two_processes_equal_one_process_with_double_batch(tmp_path, capsys):
    """2 ranks sharding the LRM (FSDP2) train as 1 process with the whole batch, each holding half
    the trained state; killed and resumed on 2 ranks bitwise; resumed on 1 process it reshards."""
    common = ("--max_train_steps", 3, "--train_batch_size", 8, "--eval_every", 100, "--save_every", 2,
              "--eval_max_pairs", 2, "--eval_timesteps", 1, "--warmup", 1, "--lr", 1e-4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "lrm.py", *_run_args(tmp_path / "two", *common)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    L.main(L.get_config(_run_args(tmp_path / "one", *common)))   # in this process (one thread)
    held = [float(re.search(r"trained state ([\d.]+) MiB a process", out)[1]) for out in (run.stdout, capsys.readouterr().out)]
    assert "2 process(es), sharded," in run.stdout and abs(held[0] - held[1] / 2) < 0.01 * held[1], held
    two, one = _trained(tmp_path / "two"), _trained(tmp_path / "one")
    init = M.LatentRewardModel.from_base("tiny").state_dict()
    # Adam turns float noise in near-zero gradients (e.g. CLIP's k_proj bias) into updates up to ~lr,
    # so compare each tensor within a fraction of lr and the total difference against the total update
    diff = sum((two[k] - v).abs().sum().item() for k, v in one.items())
    moved = sum((v - init[k]).abs().sum().item() for k, v in one.items())
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=3e-5, msg=k)
    assert moved > 1.0 and diff < 1e-3 * moved, (diff, moved)
    logs = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line] for d in ("two", "one")]
    for r2, r1 in zip(*logs):   # global loss and pre-clip gradient norm: catches a gradient scaled by world size
        assert math.isclose(r2["loss"], r1["loss"], rel_tol=1e-6) and math.isclose(r2["grad_norm"], r1["grad_norm"], rel_tol=1e-4)
    # killed at step 3 (after the step-2 checkpoint), both ranks; resumed on 2 ranks: bitwise the same
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "lrm.py"]
    killed = subprocess.run(launch + _run_args(tmp_path / "killed", *common), cwd=ROOT, capture_output=True,
                            env={**env, "LPO_KILL_AT": "step 3"})
    assert killed.returncode != 0 and _state(tmp_path / "killed")["step"] == 2
    shutil.copytree(tmp_path / "killed", tmp_path / "moved")
    subprocess.run(launch + _run_args(tmp_path / "killed", *common, "--resume"), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    assert torch.equal(_state(tmp_path / "killed")["lora"], _state(tmp_path / "two")["lora"])
    _assert_same_tensors(_lrm_weights(tmp_path / "killed"), _lrm_weights(tmp_path / "two"))
    # the step-2 checkpoint of 2 sharded ranks, resumed on 1 process: whole tensors, the same rows
    L.main(L.get_config(_run_args(tmp_path / "moved", *common, "--resume")))
    for k, v in _trained(tmp_path / "moved").items():
        torch.testing.assert_close(v, one[k], rtol=0, atol=3e-5, msg=k)


def test_noise_awareness_in_the_tiny_world(tmp_path):
    """An LRM trained on the tiny pairs beats chance clearly at t=1 and still at mid noise; the
    untrained LRM (the control) does not. (TINY_WORLD=DIR runs it on another built world.)"""
    world = os.environ.get("TINY_WORLD", os.path.join(ROOT, "tiny"))
    cfg = L.get_config(_run_args(tmp_path / "lrm", "--base", f"{world}/sd15", "--data", f"{world}/pickapic",
                                 "--train_batch_size", 16, "--max_train_steps", 120, "--warmup", 10,
                                 "--eval_every", 1000,
                                 "--eval_timesteps", "1,251,501,751,951"))
    L.transformers.utils.logging.disable_progress_bar()
    untrained = M.LatentRewardModel.from_base(cfg.base)
    ts = [int(t) for t in cfg.eval_timesteps.split(",")]
    pairs = [L.load_pairs(cfg.data, s) for s in ("validation_unique", "test_unique")]
    n = [sum(a != b for a, b in zip(p["label_0"], p["label_1"])) for p in pairs]

    def mean(table):
        return {t: sum(n_i * table[i][t] for i, n_i in enumerate(n)) / sum(n) for t in ts}
    control = mean([L.pair_accuracy(untrained, p, ts[::2])["decisive"] | {t: 0.0 for t in ts[1::2]}
                    for p in pairs])
    table = L.main(cfg)
    acc = mean([table["validation_unique"]["decisive"], table["test_unique"]["decisive"]])
    print("\n t   | trained | untrained\n" + "\n".join(f"{t:4d} | {acc[t]:.3f}   | {control[t]:.3f}" for t in ts[::2]))
    assert acc[1] > 0.63 and acc[1] > control[1] + 0.08     # clearly above chance (~300 decisive pairs)
    assert acc[501] > 0.58 and acc[951] < acc[1]             # still above chance at mid noise, fading by t=951


# ----------------------------------------------------------------------------- lrm.py: resume, bad input, logged numbers
LRM_TINY_RUN = ("--max_train_steps", 4, "--train_batch_size", 4, "--save_every", 2, "--eval_every", 2,
                "--eval_max_pairs", 4, "--eval_timesteps", "1,951", "--warmup", 2)


def _lrm_weights(folder):
    """Every tensor of an LRM folder (U-Net, text encoder, heads), loaded the way lpo.py does."""
    return M.LatentRewardModel.from_pretrained(str(folder)).state_dict()


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _run_killed(args, point):
    """L.main in a forked child that SIGKILLs itself at `point`; -> the child's exit code."""
    import multiprocessing

    def child():
        os.environ["LPO_KILL_AT"] = point
        L.main(L.get_config(args))
        os._exit(0)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    return process.exitcode


LRM_KILL_POINTS = ["step 1", "before best/", "mid best/", "after best/", "before ckpt",
                   "mid ckpt.pt", "after ckpt", "step 3", "step 4", "before final LRM",
                   "mid final LRM", "after final LRM", "final table"]


def test_lrm_kill_anywhere_then_resume_is_bitwise_identical(tmp_path, capsys):
    """SIGKILL at every write boundary of a 4-step run (checkpoints and validations at 2 and 4),
    then --resume: the final LRM, best/ and the checkpoint equal an uninterrupted run's bit for bit."""
    L.main(L.get_config(_run_args(tmp_path / "whole", *LRM_TINY_RUN)))
    want = _lrm_weights(tmp_path / "whole")
    want_best = _lrm_weights(tmp_path / "whole" / "best")
    survived = []
    for i, point in enumerate(LRM_KILL_POINTS):
        out = tmp_path / f"killed{i}"
        args = _run_args(out, *LRM_TINY_RUN)
        assert _run_killed(args, point) == -9, point   # it died where told
        L.main(L.get_config(args + ["--resume"]))
        _assert_same_tensors(_lrm_weights(out), want)
        _assert_same_tensors(_lrm_weights(out / "best"), want_best)
        assert torch.equal(_state(out)["lora"], _state(tmp_path / "whole")["lora"]), point
        assert not [name for name in os.listdir(out) if name.endswith(".tmp")], point
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], point   # no repeated rows
        survived.append(point)
    print(f"\nkill-anywhere resume: {len(survived)}/{len(LRM_KILL_POINTS)} points bitwise identical")


def test_checkpoint_is_written_last_and_covers_the_final_lrm(tmp_path, monkeypatch):
    """The order of writes at the last step: best/, the final LRM, then ckpt.pt."""
    order = []
    real_publish, real_save = L.publish_lrm, runs.atomic_torch_save

    def publish(lrm, folder, staging, name, state):
        order.append(name)
        real_publish(lrm, folder, staging, name, state)

    def save(obj, path):
        order.append(os.path.basename(path))
        real_save(obj, path)
    monkeypatch.setattr(L, "publish_lrm", publish)
    monkeypatch.setattr(runs, "atomic_torch_save", save)
    L.main(L.get_config(_run_args(tmp_path / "run", *LRM_TINY_RUN)))
    assert order[-2:] == ["final LRM", "ckpt.pt"] and order[0] == "best/"
    assert order.index("ckpt.pt") > order.index("best/")
    # a finished run resumed writes its final LRM again, from the checkpoint
    os.remove(tmp_path / "run" / "state_dict.pt")
    L.main(L.get_config(_run_args(tmp_path / "run", *LRM_TINY_RUN, "--resume")))
    final, trained = _lrm_weights(tmp_path / "run"), _trained(tmp_path / "run")
    _assert_same_tensors({k: final[k] for k in trained}, trained)


def test_rerun_refused_and_resume_checks_settings(tmp_path, capsys):
    run = tmp_path / "run"
    L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--max_train_steps", 2)))
    before = _tree_hash(run)
    refusals = [([], "already holds a run"),                                  # no --resume
                (["--resume", "--seed", "1", "--train_batch_size", "2"], "seed 0 -> 1"),
                (["--resume", "--base", "tiny/sdxl", "--data", "tiny/pickapic"], "base '' -> 'tiny/sdxl'"),
                (["--resume", "--vfe_scale", "1.0"], "vfe_scale"),
                (["--resume", "--max_train_steps", "1"], "past --max_train_steps"),
                (["--resume", "--max_train_steps", "1"], "pass --max_train_steps >= 2, or another --out")]
    for extra, words in refusals:
        with pytest.raises(SystemExit) as exit_info:
            L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--max_train_steps", 2, *extra)))
        message = str(exit_info.value.code)
        assert message.startswith("lrm.py: error:") and "\n" not in message and words in message, message
        assert _tree_hash(run) == before, extra
    with pytest.raises(SystemExit, match="train_batch_size 4 -> 2"):   # each difference listed
        L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--resume", "--seed", "1", "--train_batch_size", 2)))
    # lr, max_train_steps, warmup, eval_every, save_every may change: applied and logged
    capsys.readouterr()
    L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--resume", "--max_train_steps", 3, "--lr", 5e-4,
                                  "--warmup", 1, "--grad_ckpt")))   # --grad_ckpt: how, not what
    assert "resuming at step 3 with {'lr': [0.001, 0.0005]" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    changed = {"lr": [1e-3, 5e-4], "max_train_steps": [2, 3], "warmup": [2, 1], "grad_ckpt": [False, True]}
    assert {"resume": {"next_step": 3, "changed": changed}, "step": 2} in rows
    step3 = [r for r in rows if r.get("step") == 3 and "loss" in r][0]
    # the new schedule at optimizer step 2: past the warm-up (max(1, 2) = 2), decaying over 3 - 2
    assert math.isclose(step3["lr"], 5e-4 * (3 - 2) / (3 - 2), rel_tol=1e-12)
    # a truncated checkpoint: one line naming it
    state = run / "ckpt.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="ckpt.pt is damaged"):
        L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--resume")))


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real_loss = L.pair_loss
    calls = {"n": 0, "nan_at": 2}

    def loss_turning_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == calls["nan_at"] else loss
    monkeypatch.setattr(L, "pair_loss", loss_turning_nan)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        L.main(L.get_config(_run_args(out, *LRM_TINY_RUN, "--save_every", 1)))
    message = str(exit_info.value.code)
    assert "non-finite" in message and "step 2" in message and "last good checkpoint" in message, message
    assert "--resume" in message and "--lr" in message and "\n" not in message
    state = _state(out)
    assert state["step"] == 1 and torch.isfinite(state["lora"]).all()
    assert not os.path.exists(out / "lrm_config.json")     # no final LRM
    # NaN at the first step: nothing to keep, and the message says so
    calls.update(n=0, nan_at=1)
    with pytest.raises(SystemExit, match="before any checkpoint"):
        L.main(L.get_config(_run_args(tmp_path / "first", *LRM_TINY_RUN)))
    assert not os.path.exists(tmp_path / "first" / "ckpt.pt")
    # huge lr: NaN for real; never an all-NaN LRM on disk
    monkeypatch.setattr(L, "pair_loss", real_loss)
    with pytest.raises(SystemExit, match="non-finite"):
        L.main(L.get_config(_run_args(tmp_path / "huge", *LRM_TINY_RUN, "--lr", 1e30, "--warmup", 0)))
    # and an LRM with non-finite weights is refused at load (lpo.py relies on it)
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    with torch.no_grad():
        lrm.visual_projection.weight[0, 0] = float("nan")
    lrm.save_pretrained(str(tmp_path / "nan_lrm"))
    with pytest.raises(ValueError, match="non-finite"):
        M.LatentRewardModel.from_pretrained(str(tmp_path / "nan_lrm"))


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runs, "atomic_torch_save", full)
    with pytest.raises(SystemExit, match=r"cannot write .*ckpt.pt \(No space left on device\)"):
        L.main(L.get_config(_run_args(tmp_path / "a", *LRM_TINY_RUN)))
    monkeypatch.setattr(M.LatentRewardModel, "save_pretrained", full)
    with pytest.raises(SystemExit, match=r"cannot write .*best \(No space left on device\)"):
        L.main(L.get_config(_run_args(tmp_path / "b", *LRM_TINY_RUN)))


def _pairs_with_bad_images(folder, n_rows, bad_rows):
    """A Pick-a-Pic-schema folder of split files (train.parquet, ...) with undecodable images."""
    train = pd.read_parquet(os.path.join(ROOT, "tiny/pickapic/data/train-00000-of-00001.parquet"))
    labelled = train["label_0"] + train["label_1"] > 0   # (data.pair_flags: labels summing to 0 are no preference)
    train = train[labelled].iloc[:n_rows].reset_index(drop=True)
    train["has_label"] = True
    train["are_different"] = True
    for row in bad_rows:
        train.at[row, "jpg_0"] = b"not a jpeg"
    os.makedirs(folder, exist_ok=True)
    train.to_parquet(os.path.join(folder, "train.parquet"))
    for split in ("validation_unique", "test_unique"):
        train.iloc[:8].to_parquet(os.path.join(folder, f"{split}.parquet"))
    return str(folder)


def test_undecodable_images_are_judged_on_the_whole_data(tmp_path, capsys):
    """2 bad pairs in 200 (1%, not more) that a running ratio meets first: the run ends normally
    and prints the count; the old running-ratio stop fired after 5 steps (2 of the 100 seen)."""
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))   # epoch 0's shuffle
    data = _pairs_with_bad_images(tmp_path / "pairs", 200, [int(order[0]), int(order[1])])
    L.main(L.get_config(_run_args(tmp_path / "run", "--data", data, "--max_train_steps", 10,
                                  "--train_batch_size", 20, "--eval_every", 10, "--eval_max_pairs", 2,
                                  "--eval_timesteps", 1)))
    assert "pairs skipped for an undecodable image: 2 of 200" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert rows[0]["bad_pairs"] == 2 and rows[-1]["bad_pairs"] == 2


def test_split_files_by_name_and_base_needs_data(tmp_path):
    data = _pairs_with_bad_images(tmp_path / "pairs", 40, [])
    assert [len(L.load_pairs(data, s)) for s in ("train", "validation_unique", "test_unique")] == [40, 8, 8]
    with pytest.raises(ValueError, match="no readable split 'nope'"):
        L.load_pairs(data, "nope")
    with pytest.raises(SystemExit, match="--base .*pass --data"):
        L.get_config(["--model", "tiny", "--base", "tiny/sdxl"])
    assert L.get_config(["--model", "tiny", "--base", "tiny/sdxl", "--data", data]).keep == ""
    assert L.get_config(["--model", "tiny", "--base", "tiny/sd15"]).data == "tiny/pickapic"
    # --resolution: 0 is the pipeline's own (sample_size x VAE factor); refused unless a multiple of
    # VAE factor x U-Net downsampling (tiny: 4 x 2)
    tiny_base = models.resolve_model("tiny")
    assert models.geometry(tiny_base, 0)[0] == 32 and models.geometry(tiny_base, 64)[0] == 64
    with pytest.raises(SystemExit, match="multiple of 8"):
        models.geometry(tiny_base, 36)
    # a pipeline folder as --model: the paper's settings, its own folder name for the run
    cfg = L.get_config(["--model", "tiny/sd15", "--data", data])
    assert (cfg.max_train_steps, cfg.lr, cfg.out) == (4000, 1e-5, "runs/lrm-sd15")


def test_tiny_preset_is_the_shipped_recipe(tmp_path):
    """python lrm.py --model tiny makes tiny/lrm's recipe: 400 steps x 32 pairs of MPCF strategy 2's
    kept rows (shipped as tiny/pickapic/mpcf_keep.json: what `mpcf.py --model tiny` writes), one
    thread."""
    cfg = L.get_config(["--model", "tiny"])
    assert (cfg.max_train_steps, cfg.train_batch_size, cfg.lr, cfg.threads) == (400, 32, 1e-3, 1)
    assert cfg.keep == "tiny/pickapic/mpcf_keep.json" and cfg.data == "tiny/pickapic"
    main(get_config(["--model", "tiny", "--out", str(tmp_path / "mpcf")]))
    assert json.load(open(tmp_path / "mpcf" / "keep.json")) == json.load(open(os.path.join(ROOT, cfg.keep)))
    assert len(L.load_pairs(cfg.data, "train", cfg.keep)) == 877 + 39
    shipped = json.load(open("tiny/lrm/lrm_config.json"))
    assert shipped["base"] == models.BASES["tiny"] and shipped["resolution"] == 32 and shipped["g"] == cfg.vfe_scale


def test_learning_rate_is_deepspeed_warmup_decay_with_log_warmup():
    cfg = L.Config(lr=1e-3, warmup=20, max_train_steps=400)
    want = {0: 0.0, 1: 1e-3 * math.log(2) / math.log(20), 9: 1e-3 * math.log(10) / math.log(20),
            19: 1e-3, 20: 1e-3, 210: 0.5e-3, 399: 1e-3 / 380, 400: 0.0}
    for step, lr in want.items():
        assert math.isclose(L.learning_rate(step, cfg), lr, rel_tol=1e-12, abs_tol=1e-18), step
    assert L.learning_rate(1, L.Config(lr=1.0, warmup=0, max_train_steps=10)) == 1.0   # W = max(0, 2)



def test_pair_loss_of_zero_weights_and_the_first_decay_step():
    """A global batch whose pairs all weigh 0 (undecodable) has loss 0, not 0 / 0; after a 2-step
    warm-up with T = W + 1, the one decay step runs at the full rate (T - step) / (T - W) = 1."""
    zeros = torch.zeros(3)
    assert L.pair_loss(torch.ones(3), zeros, torch.ones(3), zeros, zeros).item() == 0.0
    cfg = L.Config(lr=1.0, warmup=2, max_train_steps=3)
    assert L.learning_rate(2, cfg) == 1.0 and L.learning_rate(3, cfg) == 0.0


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_unet_score_is_vfe_on_the_mid_feature_by_hand(model):
    """S = exp(logit_scale) cos(P [down features of the prompt's pass; V_u + g (V_c - V_u) of the mid
    feature], T): the down-stage features come from the conditional pass only, VFE acts on the mid
    block's alone (paper: Visual Feature Enhancement), g = 7.5."""
    torch.manual_seed(0)
    lrm = M.LatentRewardModel.from_base(model).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 501, 951])
    with torch.no_grad():
        text = lrm.encode_text(PROMPTS)
        cond, uncond = text["cond"], text["uncond"]
        rows = torch.zeros(3, dtype=torch.long)   # the one row of "" for each of the 3 latents
        feats = [M.down_mid_features(lrm.unet, x, t, part["encoder_hidden_states"],
                                     part["added_cond_kwargs"])
                 for part in (cond, M.take_rows(uncond, rows))]
        mid = feats[1][-1] + 7.5 * (feats[0][-1] - feats[1][-1])
        visual = lrm.visual_projection(torch.cat(feats[0][:-1] + [mid], -1))
        text_feature = cond["pooled"] if lrm.text_projection is None else lrm.text_projection(cond["pooled"])
        want = lrm.logit_scale.exp() * torch.nn.functional.cosine_similarity(visual, text_feature, dim=-1)
        torch.testing.assert_close(lrm.score(x, t, PROMPTS), want, rtol=1e-5, atol=1e-5)

def _tiny_batch(n_pairs, seed=0):
    pairs = L.load_pairs("tiny/pickapic", "train").select(range(n_pairs))
    data = L.Pairs(pairs, 32, (4, 8, 8), [1, 251, 501, 951], seed)
    return torch.utils.data.default_collate([data[(0, row)] for row in range(n_pairs)])



def test_pair_latents_add_the_pairs_own_noise_not_the_vaes():
    """Each image's VAE sample and its added noise are two independent draws (eps[:, :, 0] and
    eps[:, :, 1]): the same draw for both would correlate x_t with the encoding's sample."""
    from diffusers import AutoencoderKL
    batch = _tiny_batch(3)
    vae = AutoencoderKL.from_pretrained("tiny/sd15", subfolder="vae")
    latents, noise = L.pair_latents(vae, batch, CPU)
    eps = batch["eps"].flatten(0, 1)   # (2b, VAE | noise, C, h, w)
    assert torch.equal(noise, eps[:, 1]) and not torch.equal(eps[:, 0], eps[:, 1])
    with torch.no_grad():
        dist = vae.encode(batch["px"].flatten(0, 1)).latent_dist
    torch.testing.assert_close(latents, (dist.mean + dist.std * eps[:, 0]) * vae.config.scaling_factor,
                               rtol=1e-4, atol=1e-4)

def test_micro_batches_give_the_full_batch_loss_and_gradient():
    from diffusers import AutoencoderKL, DDPMScheduler
    vae = AutoencoderKL.from_pretrained("tiny/sd15", subfolder="vae").requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained("tiny/sd15", subfolder="scheduler")
    batch = _tiny_batch(8)
    batch["weight"] = torch.tensor([1.0, 0.5, 0.25, 1.0, 0.0, 1.0, 0.5, 1.0])   # unequal, one bad
    results = []
    for micro in (8, 2, 4):
        torch.manual_seed(0)
        lrm = M.LatentRewardModel.from_base("tiny")
        loss, scores, labels, weights = L.train_step(lrm, vae, noise_scheduler, batch, micro, torch.device("cpu"))
        grads = {n: p.grad.clone() for n, p in lrm.named_parameters() if p.grad is not None}
        results.append((loss, grads))
        # the loss is the global-batch-weighted Bradley-Terry loss of the scores it returns
        assert math.isclose(loss, L.pair_loss(scores[:, 0], scores[:, 1], labels[:, 0], labels[:, 1],
                                              weights).item(), rel_tol=1e-5)
    (full_loss, full_grads), *parts = results
    for loss, grads in parts:
        assert math.isclose(loss, full_loss, rel_tol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_vae_memory_is_bounded_by_its_chunk_not_the_batch():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("tiny/sd15", subfolder="vae").requires_grad_(False)
    seen = []
    hook = vae.encoder.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    batch = _tiny_batch(6)
    chunked, _ = L.pair_latents(vae, batch, torch.device("cpu"), vae_batch_size=4)
    assert seen == [4, 4, 4] and chunked.shape == (12, 4, 8, 8)
    seen.clear()
    whole, _ = L.pair_latents(vae, batch, torch.device("cpu"), vae_batch_size=100)
    assert seen == [12]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    seen.clear()
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    L.pair_accuracy(lrm, L.load_pairs("tiny/pickapic", "validation_unique"), [1], vae, batch_size=32,
                    max_pairs=40, vae_batch_size=3)
    assert max(seen) == 3 and sum(seen) == 80
    seen.clear()
    L.train_step(lrm, vae, L.DDPMScheduler.from_pretrained("tiny/sd15", subfolder="scheduler"), batch, 6,
                 torch.device("cpu"), vae_batch_size=5)
    hook.remove()
    assert seen == [5, 5, 2]


def test_accuracy_both_ways_by_hand_and_from_captured_scores(monkeypatch):
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    l0, l1 = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0]), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0])
    # right, wrong, a tie with equal scores (0), a tie (0.5), wrong
    assert L.pair_credit(s0, s1, l0, l1).tolist() == [1.0, 0.0, 0.0, 0.5, 0.0]
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    captured = []
    real_score = M.LatentRewardModel.score

    def score(self, latents, timesteps, prompts=None, text=None):
        assert not torch.is_autocast_enabled("cpu")   # bf16 autocast on a GPU only: fp32 here
        out = real_score(self, latents, timesteps, prompts=prompts, text=text)
        captured.append((int(timesteps[0]), out.detach().float().clone()))
        return out
    monkeypatch.setattr(M.LatentRewardModel, "score", score)
    pairs = L.load_pairs("tiny/pickapic", "validation_unique").select(range(48))
    got = L.pair_accuracy(lrm, pairs, [1, 951], batch_size=20)
    label_0, label_1 = torch.tensor(pairs["label_0"]), torch.tensor(pairs["label_1"])
    for t in (1, 951):
        scores = torch.cat([s for tt, s in captured if tt == t])      # (2N,) pairs adjacent
        a, b = scores[0::2], scores[1::2]
        decisive = label_0 != label_1
        right = [(x > y) == (p > q) for x, y, p, q in zip(a, b, label_0, label_1)]
        assert 0 < sum(~decisive) < len(pairs)   # both kinds present
        n_right = int(sum(r for r, d in zip(right, decisive) if d))
        assert math.isclose(got["decisive"][t], n_right / int(decisive.sum()), rel_tol=1e-9)
        credit = [float(p) if x > y else float(q) if x < y else 0.0 for x, y, p, q in zip(a, b, label_0, label_1)]
        assert math.isclose(got["ties_half"][t], sum(credit) / len(pairs), rel_tol=1e-9)
    # edge splits: one decisive pair (0 or 1 both ways), ties only (no decisive pair: 0, each tie
    # 0.5), an undecodable image (no vote, the rest counted)
    decisive_rows = [i for i in range(48) if pairs["label_0"][i] != pairs["label_1"][i]]
    tie_rows = [i for i in range(48) if pairs["label_0"][i] == pairs["label_1"][i]]
    one = L.pair_accuracy(lrm, pairs.select(decisive_rows[:1]), [1])
    assert one["decisive"][1] in (0.0, 1.0) and one["ties_half"][1] == one["decisive"][1]
    ties = L.pair_accuracy(lrm, pairs.select(tie_rows[:2]), [1])
    assert ties == {"decisive": {1: 0.0}, "ties_half": {1: 0.5}}
    from datasets import Dataset
    table = pairs.select(decisive_rows[:4]).to_pandas()
    table.loc[0, "jpg_1"] = b"\xff\xd8 broken"
    broken = L.pair_accuracy(lrm, Dataset.from_pandas(table), [1])
    assert all(0 <= value[1] <= 1 and value[1] * 3 % 1 == 0 for value in broken.values()), broken
    table.loc[:, "jpg_0"] = b"\xff\xd8 broken"   # no decodable pair at all: 0, not 0 / 0
    nothing = L.pair_accuracy(lrm, Dataset.from_pandas(table), [1])
    assert nothing == {"decisive": {1: 0.0}, "ties_half": {1: 0.0}}


def test_logged_numbers_match_independent_computations(tmp_path, monkeypatch):
    """loss, acc, lr, grad_norm, logit_scale, bad_pairs and the validation accuracies in
    metrics.jsonl, recomputed from the scores, rows and gradients captured during the run."""
    captured = {"train": [], "eval": [], "rows": [], "grads": []}
    real_score, real_item, real_from_base = M.LatentRewardModel.score, L.Pairs.__getitem__, L.LatentRewardModel.from_base

    def score(self, latents, timesteps, prompts=None, text=None):
        out = real_score(self, latents, timesteps, prompts=prompts, text=text)
        key = "train" if prompts is not None else "eval"
        captured[key].append((timesteps.clone(), out.detach().float().clone()))
        return out

    def item(self, key):
        captured["rows"].append((self, key))
        return real_item(self, key)

    def from_base(*args, **kwargs):
        lrm = real_from_base(*args, **kwargs)
        for p in lrm.parameters():
            if p.requires_grad:
                p.register_hook(lambda grad: captured["grads"].append(grad.detach().clone()))
        return lrm
    monkeypatch.setattr(M.LatentRewardModel, "score", score)
    monkeypatch.setattr(L.Pairs, "__getitem__", item)
    monkeypatch.setattr(L.LatentRewardModel, "from_base", from_base)
    clock = {"now": 0.0}

    def perf_counter():   # 10 s a reading: the start, then one reading per logged step
        clock["now"] += 10.0
        return clock["now"]
    monkeypatch.setattr(L, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter)}))
    n_params = sum(p.requires_grad for p in M.LatentRewardModel.from_base("tiny").parameters())
    out = tmp_path / "run"
    cfg = L.get_config(_run_args(out, "--max_train_steps", 3, "--train_batch_size", 8, "--eval_every", 3,
                                 "--eval_max_pairs", 12, "--eval_timesteps", "1,501", "--warmup", 2))
    L.main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    train_pairs = L.load_pairs(cfg.data, "train", cfg.keep)
    train_keys = [key for dataset, key in captured["rows"] if dataset.pairs is not None and
                  len(dataset.pairs) == len(train_pairs)][:24]
    for step, row in enumerate(train_rows):
        _, scores = captured["train"][step]
        s = scores.view(-1, 2)
        examples = [train_pairs[r] for _, r in train_keys[8 * step:8 * step + 8]]
        l0 = torch.tensor([e["label_0"] for e in examples])
        l1 = torch.tensor([e["label_1"] for e in examples])
        w = torch.tensor([1.0 / e["num_example_per_prompt"] for e in examples])
        margin = s[:, 0] - s[:, 1]
        nll = -(l0 * torch.nn.functional.logsigmoid(margin) + l1 * torch.nn.functional.logsigmoid(-margin))
        assert math.isclose(row["loss"], float((w * nll).sum() / w.sum()), rel_tol=1e-5), step
        decisive = l0 != l1
        right = ((s[:, 0] > s[:, 1]) == (l0 > l1))[decisive]
        assert math.isclose(row["acc"], right.float().mean().item(), rel_tol=1e-6)
        want_lr = 0.0 if step == 0 else 1e-3 * (1.0 if step >= 2 else math.log(step + 1) / math.log(2))
        if step >= 2:
            want_lr = 1e-3 * (3 - step) / (3 - 2)
        assert math.isclose(row["lr"], want_lr, rel_tol=1e-12, abs_tol=1e-18), step
        grads = captured["grads"][n_params * step:n_params * (step + 1)]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        assert math.isclose(row["grad_norm"], norm, rel_tol=1e-5), step
        assert row["bad_pairs"] == 0
        # pairs this run trained / seconds since its start: 8 (step + 1) pairs in 10 (step + 1) s
        assert math.isclose(row["pairs_per_s"], 0.8, rel_tol=1e-12), step
    final = _trained(out)
    assert train_rows[-1]["logit_scale"] == final["logit_scale"].item()
    # validation: the first 12 pairs of the split, at t = 1 and 501
    val_pairs = L.load_pairs(cfg.data, "validation_unique").select(range(12))
    val_row = [r for r in rows if "val_acc@1" in r][0]
    label_0, label_1 = torch.tensor(val_pairs["label_0"]), torch.tensor(val_pairs["label_1"])
    for t in (1, 501):
        scores = torch.cat([s for ts, s in captured["eval"][:2] if int(ts[0]) == t])
        a, b = scores[0::2], scores[1::2]
        decisive = label_0 != label_1
        right = ((a > b) == (label_0 > label_1))[decisive].float().mean().item()
        credit = ((a > b).float() * label_0 + (a < b).float() * label_1).mean().item()
        assert math.isclose(val_row[f"val_acc@{t}"], right, rel_tol=1e-6)
        assert math.isclose(val_row[f"val_acc_ties_half@{t}"], credit, rel_tol=1e-6)


def _lrm_bad_files():
    """Files for the bad-input catalogue: a keep list out of range, a damaged checkpoint, a split
    with a label column of strings, a data folder without its held-out splits."""
    folder = tempfile.mkdtemp(prefix="lrm-bad-", dir=SCRATCH)
    json.dump([0, 5, 99999], open(os.path.join(folder, "keep_out_of_range.json"), "w"))
    json.dump({"rows": [1, 2]}, open(os.path.join(folder, "keep_not_a_list.json"), "w"))
    os.makedirs(os.path.join(folder, "damaged"))
    open(os.path.join(folder, "damaged", "ckpt.pt"), "wb").write(b"PK\x03\x04 cut short")
    train = pd.read_parquet(os.path.join(ROOT, "tiny/pickapic/data/train-00000-of-00001.parquet")).iloc[:40]
    os.makedirs(os.path.join(folder, "strings"))
    for split in ("train", "validation_unique", "test_unique"):
        train.assign(label_0=train["label_0"].astype(str)).to_parquet(
            os.path.join(folder, "strings", f"{split}.parquet"))
    os.makedirs(os.path.join(folder, "train_only"))
    train.to_parquet(os.path.join(folder, "train_only", "train.parquet"))
    shutil.copytree(os.path.join(ROOT, "tiny/sd15"), os.path.join(folder, "no_scheduler"),
                    ignore=shutil.ignore_patterns("scheduler"))
    return folder


_LRM_BAD = _lrm_bad_files()
BAD_INPUTS = globals().get("BAD_INPUTS", [])
BAD_INPUTS += [
    ("lrm", ["--model", "nope"], "model"),
    ("lrm", ["--vfe_scale", "nan", "--out", "{tmp}"], "vfe_scale"),  # not the NaN guard's "lower --lr"
    ("lrm", ["--grad_clip", "-1", "--out", "{tmp}"], "grad_clip"),  # not gradient ascent
    ("lrm", ["--lr", "inf", "--out", "{tmp}"], "lr"),
    ("lrm", ["--out", "{run}"], "--resume"),
    ("lrm", ["--resolution", "33", "--out", "{tmp}"], "resolution"),
    ("lrm", ["--resolution", "-8", "--out", "{tmp}"], "resolution"),
    ("lrm", ["--model", "tiny", "--base", "tiny/sdxl", "--out", "{tmp}"], "data"),
    ("lrm", ["--data", "{tmp}", "--out", "{tmp}"], "split"),
    ("lrm", ["--data", f"{_LRM_BAD}/train_only", "--out", "{tmp}"], "validation_unique"),
    ("lrm", ["--data", f"{_LRM_BAD}/strings", "--out", "{tmp}"], "label_0"),
    ("lrm", ["--keep", f"{_LRM_BAD}/keep_out_of_range.json", "--out", "{tmp}"], "99999"),
    ("lrm", ["--keep", f"{_LRM_BAD}/keep_not_a_list.json", "--out", "{tmp}"], "keep"),
    ("lrm", ["--keep", "{tmp}/missing.json", "--out", "{tmp}"], "keep"),
    ("lrm", ["--resume", "--out", f"{_LRM_BAD}/damaged"], "damaged"),
    ("lrm", ["--train_batch_size", "5000", "--out", "{tmp}"], "train_batch_size"),
    ("lrm", ["--micro_batch_size", "5", "--out", "{tmp}"], "micro_batch_size"),
    ("lrm", ["--eval_timesteps", "1,x", "--out", "{tmp}"], "eval_timesteps"),
    ("lrm", ["--max_train_steps", "0", "--out", "{tmp}"], "max_train_steps"),
]
BAD_INPUTS += [
    ("lrm", ["--text_projection_init", "{tmp}/no-clip", "--out", "{tmp}"], "text_projection_init"),
    ("lrm", ["--base", f"{_LRM_BAD}/no_scheduler", "--data", "tiny/pickapic", "--out", "{tmp}"], "scheduler"),
]


# ----------------------------------------------------------------------------- lrm.py: half-published folders, mmap resume, micro-batch over ranks, paths, logged acc
def test_half_published_lrm_folder_is_refused_not_read_as_the_official_layout(tmp_path):
    """A publish killed before lrm_config.json leaves unet/, text_encoder/, tokenizer/ and
    state_dict.pt: not the release's layout (it has no tokenizers), so refused, base= or not."""
    half = tmp_path / "half"
    shutil.copytree(os.path.join(ROOT, "tiny/lrm"), half)
    os.remove(half / "lrm_config.json")
    for base in ("tiny", None):
        with pytest.raises(ValueError) as error_info:
            M.LatentRewardModel.from_pretrained(str(half), base=base)
        message = str(error_info.value)
        assert message.startswith("incomplete LRM folder (no lrm_config.json)") and "\n" not in message
    shutil.rmtree(half / "tokenizer")   # the release's layout: loads with its base
    assert M.LatentRewardModel.from_pretrained(str(half), base="tiny").config["base"] == "tiny/sd15"


def test_resume_maps_the_checkpoint_and_drops_it_before_training(tmp_path, monkeypatch):
    """--resume reads ckpt.pt memory-mapped and keeps no reference to it while training
    (SDXL's is ~30 GB a rank); the checkpoint holds no unused RNG state."""
    import weakref
    run = tmp_path / "run"
    L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--max_train_steps", 2)))
    assert "rng" not in _state(run)
    real_load, real_step = torch.load, L.train_step
    seen = {}

    class Loaded(dict):   # a dict that a weak reference can watch
        pass

    def load(path, *args, **kwargs):
        loaded = real_load(path, *args, **kwargs)
        if str(path).endswith("ckpt.pt"):
            seen["mmap"] = kwargs.get("mmap")
            loaded = Loaded(loaded)
            seen["state"] = weakref.ref(loaded)
        return loaded

    def step(*args, **kwargs):
        seen.setdefault("alive_while_training", seen["state"]() is not None)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(L, "train_step", step)
    L.main(L.get_config(_run_args(run, *LRM_TINY_RUN, "--max_train_steps", 3, "--resume")))
    assert seen["mmap"] is True and seen["alive_while_training"] is False
    assert _state(run)["step"] == 3


def test_lrm_of_a_relative_base_folder_loads_from_another_directory(tmp_path, monkeypatch):
    """lrm_config.json names a local base by its absolute path (tiny/... and hub ids as given)."""
    shutil.copytree(os.path.join(ROOT, "tiny/sd15"), tmp_path / "my-sd15")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    L.main(L.get_config(["--model", "my-sd15", "--data", os.path.join(ROOT, "tiny/pickapic"), "--out", str(run),
                         "--workers", "0", "--threads", "1", "--max_train_steps", "1", "--train_batch_size", "4",
                         "--eval_max_pairs", "2", "--eval_timesteps", "1", "--warmup", "1"]))
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    lrm = M.LatentRewardModel.from_pretrained(str(run))
    assert lrm.config["base"] == os.path.realpath(tmp_path / "my-sd15")
    pairs = L.load_pairs(os.path.join(ROOT, "tiny/pickapic"), "validation_unique").select(range(2))
    assert set(L.pair_accuracy(lrm, pairs, [1])["decisive"]) == {1}   # reads the base's VAE
    assert M.base_config("tiny", {"sample_size": 8})["base"] == "tiny/sd15"


def test_logged_acc_leaves_out_undecodable_pairs_and_is_null_without_decisive_pairs():
    scores = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # right, wrong, wrong but undecodable (weight 0), a tie
    assert L.batch_accuracy(scores, labels, torch.tensor([1.0, 1.0, 0.0, 1.0])) == 0.5
    assert L.batch_accuracy(scores, labels, torch.tensor([1.0, 1.0, 1.0, 1.0])) == 1 / 3
    nothing = L.batch_accuracy(scores, labels, torch.tensor([0.0, 0.0, 0.0, 1.0]))   # no decodable decisive pair
    assert nothing is None and json.dumps({"acc": nothing}) == '{"acc": null}'
    assert L.batch_accuracy(scores[3:], labels[3:], torch.ones(1)) is None   # ties only


def test_one_line_errors_and_get_config_notes_the_dropped_keep(tmp_path, capsys):
    assert L.first_line(OSError("We couldn't connect.\nCheck your connection.")) == "We couldn't connect."
    assert L.first_line(OSError()) == "OSError"
    data = _pairs_with_bad_images(tmp_path / "pairs", 40, [])
    assert L.get_config(["--model", "tiny", "--data", data]).keep == ""
    assert "preset's --keep tiny/pickapic/mpcf_keep.json" in capsys.readouterr().err
    # pair_accuracy: named sums; a repeated t counts once
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    pairs = L.load_pairs("tiny/pickapic", "validation_unique").select(range(12))
    assert L.pair_accuracy(lrm, pairs, [1, 951, 1]) == L.pair_accuracy(lrm, pairs, [1, 951])


# ============================================================================ mpcf.py: Multi-Preference Consistent Filtering
E = 1e-9
# (G_A, G_C, G_V, is_tie) -> kept under strategy 1, 2, 3; every bound hit exactly and nudged inside
RULE_TABLE = [
    ((0.0, 0.1, 0.1, False), (False, True, True)),
    ((E, 0.1, 0.1, False), (True, True, True)),
    ((-0.5, 0.1, 0.1, False), (False, False, True)),
    ((-0.5 + E, 0.1, 0.1, False), (False, True, True)),
    ((-1.0, 0.1, 0.1, False), (False, False, False)),
    ((-1.0 + E, 0.1, 0.1, False), (False, False, True)),
    ((1.0, 0.0, 0.1, False), (False, False, False)),     # CLIP gap must be > 0
    ((1.0, 0.1, 0.0, False), (False, False, False)),     # VQA gap must be > 0
    ((1.0, E, E, False), (True, True, True)),
    ((1.0, -E, 0.1, False), (False, False, False)),
    ((math.nan, 0.1, 0.1, False), (False, False, False)),
    ((0.2, 0.0, 0.0, True), (False, False, False)),      # ties: |G_A| < 0.2, |G_C| < 0.03, |G_V| < 0.07
    ((-0.2, 0.0, 0.0, True), (False, False, False)),
    ((0.2 - E, 0.03 - E, 0.07 - E, True), (True, True, True)),
    ((-0.2 + E, -0.03 + E, -0.07 + E, True), (True, True, True)),
    ((0.0, 0.03, 0.0, True), (False, False, False)),
    ((0.0, -0.03, 0.0, True), (False, False, False)),
    ((0.0, 0.0, 0.07, True), (False, False, False)),
    ((0.0, 0.0, -0.07, True), (False, False, False)),
    ((5.0, 0.1, 0.1, True), (False, False, False)),      # a clear winner is no tie
    ((0.0, 0.0, 0.0, True), (True, True, True)),
    ((0.0, math.nan, 0.0, True), (False, False, False)),
]


def test_rule_boundaries_strict_both_ways():
    assert STRATEGIES[2] == (-0.5, 0.0, 0.0, 0.2, 0.03, 0.07)  # SPEC section 2, strategy 2
    assert STRATEGIES[1][0] == 0.0 and STRATEGIES[3][0] == -1.0
    ga, gc, gv, tie = (torch.tensor([r[0][k] for r in RULE_TABLE], dtype=torch.float64) for k in range(4))
    for s in (1, 2, 3):
        want = [r[1][s - 1] for r in RULE_TABLE]
        assert mpcf_keep(ga, gc, gv, tie.bool(), strategy=s).tolist() == want, s
    # numpy in, custom bounds: loosen everything
    got = mpcf_keep(np.array([-1.5, 0.5]), np.array([-0.5, 0.5]), np.array([-0.5, 0.5]), np.array([False, True]),
                    bounds=(-2, -1, -1, 1, 1, 1))
    assert got.tolist() == [True, True]
    # gaps: winner minus loser; ties image 0 minus image 1
    g = pair_gaps(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 5.0]),
                  torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]))
    assert g.tolist() == [-2.0, -1.0, -2.0]


def hand_dataset(path, n_bad=0):
    """10 Pick-a-Pic rows of drawn pictures; row 7 unlabelled, row 8 two identical images."""
    rows = []
    for i in range(10):
        a, b = draw("red", "circle", 17, 16, 16), draw("blue", "square", 10 + i, 12, 14)
        rows.append(dict(caption="a red circle", jpg_0=to_jpeg(a), jpg_1=to_jpeg(b if i != 8 else a),
                         label_0=[1.0, 0.0, 0.5][i % 3], label_1=[0.0, 1.0, 0.5][i % 3],
                         num_example_per_prompt=10, has_label=i != 7, are_different=i != 8))
    rows[7].update(label_0=0.0, label_1=0.0)
    for i in range(n_bad):
        rows[i]["jpg_1"] = b"not a jpeg"
    pd.DataFrame(rows).to_parquet(path)
    return rows


def test_kept_counts_on_hand_made_table(tmp_path, capsys):
    data = str(tmp_path / "pairs.parquet")
    hand_dataset(data)
    # precomputed gaps, row-aligned, no index column; row 9 unscored (NaN)
    gaps = pd.DataFrame({"aesthetic_gap": [0.1, -0.6, 0.1, -0.4, 1.0, 0.19, -0.9, 1.0, 0.0, math.nan],
                         "clip_gap": [0.01, 0.1, 0.02, 0.1, 0.1, -0.02, 0.1, 0.1, 0.0, 0.0],
                         "vqa_gap": [0.2, 0.2, 0.06, 0.1, -0.1, 0.0, 0.1, 0.1, 0.0, 0.0]})
    # rows: 0 win kept; 1 win dropped (G_A -0.6, kept by strategy 3); 2 tie kept; 3 win kept;
    # 4 win dropped (G_V < 0); 5 tie kept; 6 win dropped (G_A -0.9, kept by 3); 7 no label;
    # 8 identical; 9 unscored
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    out = str(tmp_path / "out")
    args = ["filter", "--data", data, "--gaps", str(tmp_path / "gaps.csv"), "--out", out]
    counts = main(get_config(args + ["--save-dataset", str(tmp_path / "kept")]))
    assert json.load(open(os.path.join(out, "keep.json"))) == [0, 2, 3, 5]
    assert counts == dict(win_lose=6, win_lose_kept=2, ties=2, ties_kept=2, no_label=1, identical=1, unscored=1)
    assert "kept 2 / 6 win-lose pairs, 2 / 2 ties" in capsys.readouterr().out
    from datasets import load_from_disk
    assert load_from_disk(str(tmp_path / "kept"))["label_0"] == [1.0, 0.5, 1.0, 0.5]
    assert main(get_config(args + ["--strategy", "3"]))["win_lose_kept"] == 4
    assert main(get_config(args + ["--strategy", "1"]))["win_lose_kept"] == 1
    assert main(get_config(args + ["--bounds=-9,-9,-9,0,0,0"]))["win_lose_kept"] == 5  # all but NaN
    # a gaps file of another length is refused; so is one whose index does not cover the split
    gaps.iloc[:9].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SystemExit, match="not row-aligned"):
        main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "short.csv"), "--out", out]))
    gaps.assign(index=np.arange(1, 11)).to_parquet(tmp_path / "shifted.parquet")
    with pytest.raises(SystemExit, match="not row-aligned"):
        main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "shifted.parquet"), "--out", out]))
    for bad in (["--strategy", "4"], ["--bounds", "1,2"], ["--model", "sd3"], ["--gaps", "/nope.csv"]):
        with pytest.raises(SystemExit):
            get_config(["filter", "--data", data] + bad)


def judge_gaps(ds):
    """Oracle: the tiny judge's three gaps, winner minus loser, computed row by row."""
    out = []
    for r in ds:
        try:
            im = [from_jpeg(r["jpg_0"]), from_jpeg(r["jpg_1"])]
        except Exception:
            out.append([math.nan] * 3)
            continue
        s = judge_scores(im, [r["caption"]] * 2)
        w, l_ = (1, 0) if r["label_1"] > r["label_0"] else (0, 1)
        out.append([s[k][w] - s[k][l_] for k in ("aesthetic", "clip", "vqa")])
    return np.array(out)


def test_score_filter_round_trip_and_resume(world_pairs, tmp_path, monkeypatch):
    from datasets import load_dataset
    base = ["--model", "tiny", "--data", world_pairs, "--batch-size", "8"]
    ref = str(tmp_path / "ref")
    main(get_config(base + ["--out", ref]))
    df = pd.read_csv(os.path.join(ref, "gaps.csv"))
    ds = load_dataset("parquet", data_files=world_pairs, split="train")
    want = judge_gaps(ds)
    assert len(df) == len(ds) and df["index"].tolist() == list(range(len(ds)))
    ok = df["status"] == "ok"
    np.testing.assert_allclose(df.loc[ok, list(mpcf.GAP_COLS)].to_numpy(), want[ok.to_numpy()], rtol=0, atol=1e-12)
    assert df["status"][3] == "unreadable" and df["status"][5] == "no_label"
    jpg = ds[0]["jpg_0"]   # datasets' Image(decode=False) rows are {"bytes": ...}: the same picture
    assert data.decode_image(jpg).size == (32, 32) and np.array_equal(np.array(data.decode_image({"bytes": jpg, "path": None})), np.array(data.decode_image(jpg)))
    tie = np.array(ds["label_0"]) == np.array(ds["label_1"])
    assert (df["different_flag"][ok] == (~tie[ok]).astype(int)).all()
    # filter read back from the files equals the rule applied by hand to the oracle gaps
    keep = json.load(open(os.path.join(ref, "keep.json")))
    hand = [i for i, (a, c, v) in enumerate(want) if ok[i] and ds[i]["are_different"] and (
        (abs(a) < 0.2 and abs(c) < 0.03 and abs(v) < 0.07) if tie[i] else (a > -0.5 and c > 0 and v > 0))]
    assert keep == hand and 0 < len(keep) < ok.sum()

    # interrupted run: the process dies in its 4th batch, and the last line is half written
    real, calls = mpcf.load_scorers, []

    class Killed(Exception):
        pass

    def dying(cfg, device):
        score = real(cfg, device)

        def wrapped(images, captions):
            calls.append(len(images))
            if len(calls) == 4 and not cfg.resume:
                raise Killed
            return score(images, captions)
        return wrapped
    monkeypatch.setattr(mpcf, "load_scorers", dying)
    out = str(tmp_path / "resumed")
    with pytest.raises(Killed):
        main(get_config(base + ["--out", out]))
    part = os.path.join(out, "gaps.part0.csv")
    assert len(open(part).read().splitlines()) == 1 + 3 * 8
    with open(part, "a") as f:
        f.write("60,1,0.12")  # killed mid-write
    with pytest.raises(SystemExit, match="--resume"):
        main(get_config(base + ["--out", out]))
    open(os.path.join(out, "gaps.part1.csv"), "w").close()   # a rank killed before its header reached the disk
    calls.clear()
    main(get_config(base + ["--out", out, "--resume"]))
    usable = np.array(ds["has_label"]) & np.array(ds["are_different"])
    assert sum(calls) == 2 * (usable.sum() - 3 * 8)  # only the rows not written yet
    assert open(os.path.join(out, "gaps.csv")).read() == open(os.path.join(ref, "gaps.csv")).read()
    assert open(os.path.join(out, "keep.json")).read() == open(os.path.join(ref, "keep.json")).read()

    # torchrun with two ranks shards the rows and merges to the same file
    monkeypatch.setattr(mpcf, "load_scorers", real)
    out2 = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "mpcf.py", "score", *base, "--out", out2], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out2)) == ["gaps.csv", "gaps.part0.csv", "gaps.part1.csv", "log.jsonl", "run.json"]
    assert open(os.path.join(out2, "gaps.csv")).read() == open(os.path.join(ref, "gaps.csv")).read()


# ----------------------------------------------------------------------------- real scorers, tiny random weights
class LaionMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head as its repository defines it (no activations)."""
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def oracle_pixels(images, mean, std):
    """CLIP preprocessing by hand for 32x32 inputs (resize and centre crop are the identity)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))  # (N, H, W, 3)
    return ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)                     # (N, 3, H, W)


def scorer_flags(d, vqa):
    """--model sd15: the real-scorer preset, pointed at the tiny folders (same loading code)."""
    return ["--model", "sd15", "--aesthetic-clip", str(d / "aes"), "--aesthetic-mlp", str(d / "head"),
            "--clip-model", str(d / "clip"), "--vqa-model", str(d / vqa)]


@torch.no_grad()
def test_real_scorer_code_paths_match_oracles(tiny_real_scorers, tmp_path, capsys):
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPModel, CLIPTokenizer,
                              CLIPVisionModelWithProjection)
    d = tiny_real_scorers
    images = [draw("red", "circle", 17, 16, 16), draw("blue", "square", 11, 10, 20),
              draw("green", "triangle", 20, 16, 16), draw("purple", "circle", 9, 24, 8)]
    caps = ["a red circle", "a blue square", "a red circle", "a yellow triangle on a big field"]  # padded
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    px = oracle_pixels(images, mean, std)
    # aesthetic: unit-normalised CLIP image embedding through the LAION head (its own class, eval)
    head = LaionMLP().eval()
    head.load_state_dict(torch.load(d / "head" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    emb = CLIPVisionModelWithProjection.from_pretrained(d / "aes")(pixel_values=px).image_embeds
    want_aes = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    # CLIP score: cosine of the projected pooled states, no logit scale
    clip, tok = CLIPModel.from_pretrained(d / "clip"), CLIPTokenizer.from_pretrained(d / "clip")
    enc = tok(caps, padding=True, return_tensors="pt")
    t = clip.text_projection(clip.text_model(**enc).pooler_output)
    v = clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)
    want_clip = torch.nn.functional.cosine_similarity(v, t, dim=-1)
    # VQA: one image at a time, forward pass with the first decoder step teacher-forced, P(first token of "Yes")
    q = 'Question: Does this figure show "{}"? Please answer yes or no. Answer:'
    for name in ("blip2", "instructblip"):
        proc, vlm = AutoProcessor.from_pretrained(d / name), AutoModelForImageTextToText.from_pretrained(d / name)
        yes = proc.tokenizer.convert_tokens_to_ids(proc.tokenizer.tokenize("Yes")[0])
        want_vqa = []
        for im, c in zip(images, caps):
            # padding=True only to get the same (non-truncating) text kwargs: one row pads nothing
            inp = proc(images=[im], text=[q.format(c)], return_tensors="pt", padding=True)
            logits = vlm(**inp, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[:, -1]
            want_vqa.append(logits.softmax(-1)[0, yes])
        score = mpcf.load_scorers(get_config(["score", *scorer_flags(d, name)]), torch.device("cpu"))
        got = score(images, caps)
        np.testing.assert_allclose(got["aesthetic"], want_aes.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["clip"], want_clip.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["vqa"], torch.stack(want_vqa).numpy(), rtol=1e-4, atol=1e-7)
    assert np.ptp(got["clip"]) > 1e-3 and np.ptp(got["aesthetic"]) > 1e-4  # the inputs do differ
    # the head loads from the file itself too; a folder with two heads is ambiguous
    single = mpcf.load_aesthetic_head(str(d / "head" / "sac+logos+ava1-l14-linearMSE.pth"))
    x = torch.randn(3, 768)
    torch.testing.assert_close(single(x), head(x))
    os.makedirs(tmp_path / "two")
    for n in ("a.pth", "b.pth"):
        torch.save(LaionMLP().state_dict(), tmp_path / "two" / n)
    with pytest.raises(ValueError, match="exactly one"):
        mpcf.load_aesthetic_head(str(tmp_path / "two"))

    # the score step with these scorers: gaps = winner minus loser, an unreadable pair counted
    data = str(tmp_path / "pairs.parquet")
    rows = hand_dataset(data, n_bad=1)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"1 of 8 pairs had an undecodable image \(more than 1%\)"):
        main(get_config(["all", "--data", data, "--out", out, "--batch-size", "3", *scorer_flags(d, "instructblip")]))
    df = pd.read_csv(os.path.join(out, "gaps.csv"))   # scored, written, then the data's rule stops the run
    assert df["status"].tolist() == ["unreadable"] + ["ok"] * 6 + ["no_label", "identical", "ok"]
    # the score step's printed and logged numbers, by hand: 10 rows, 8 usable, row 0 unreadable
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mpcf score")]
    import ast
    by_status = ast.literal_eval(printed[-1].split("rows by status ", 1)[1])
    assert by_status == {"ok": 7, "unreadable": 1, "no_label": 1, "identical": 1}, printed
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert {k: log[0][k] for k in ("step", "rank", "pairs", "unreadable")} == dict(step="score", rank=0, pairs=8,
                                                                                unreadable=1)
    for i in (1, 2, 9):  # `score` is the last set of the loop above: the same models
        s = score([from_jpeg(rows[i]["jpg_0"]), from_jpeg(rows[i]["jpg_1"])], [rows[i]["caption"]] * 2)
        w = 1 if rows[i]["label_1"] > rows[i]["label_0"] else 0
        want = [s[k][w] - s[k][1 - w] for k in ("aesthetic", "clip", "vqa")]
        np.testing.assert_allclose(df.loc[i, list(mpcf.GAP_COLS)].to_numpy(dtype=float), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- does filtering help an LRM?
def clean_held_out_pairs():
    """validation_unique + test_unique, each pair labelled by the judge's clean `human` score (no
    rater noise); pairs the judge calls a tie (|difference| < 0.05) and identical images left out.
    -> (images_0, images_1, captions, image 0 wins: bool (N,))"""
    from datasets import concatenate_datasets, load_dataset
    held = concatenate_datasets([load_dataset("tiny/pickapic", split=s) for s in ("validation_unique", "test_unique")])
    im0, im1, caps, win0 = [], [], [], []
    for r in held:
        a, b = from_jpeg(r["jpg_0"]), from_jpeg(r["jpg_1"])
        h = judge_scores([a, b], [r["caption"]] * 2)["human"]
        if r["are_different"] and abs(h[0] - h[1]) >= 0.05:
            im0.append(a), im1.append(b), caps.append(r["caption"]), win0.append(h[0] > h[1])
    return im0, im1, caps, torch.tensor(win0)


@torch.no_grad()
def judge_agreement(lrm, lat0, lat1, caps, win0):
    """Oracle accuracy: the LRM prefers the judge's winner, at t = 1 on noise-free VAE latents."""
    text = lrm.encode_text(caps)
    return ((lrm.score(lat0, 1, text=text) > lrm.score(lat1, 1, text=text)) == win0).float().mean().item()


def test_lrm_on_mpcf_pairs_agrees_with_the_judge_at_least_as_often(tmp_path):
    """Same init, seed, steps and noise; only the training pairs differ (MPCF strategy 2 or all)."""
    import lrm as L
    from diffusers import AutoencoderKL
    counts = main(get_config(["--model", "tiny", "--out", str(tmp_path / "mpcf")]))
    im0, im1, caps, win0 = clean_held_out_pairs()
    vae = AutoencoderKL.from_pretrained("tiny/sd15", subfolder="vae")
    with torch.no_grad():
        lat0, lat1 = ((vae.encode(oracle_pixels(ims, [0.5] * 3, [0.5] * 3)).latent_dist.mean  # [-1, 1] pixels
                       * vae.config.scaling_factor) for ims in (im0, im1))                   # (N, 4, 8, 8)
    torch.manual_seed(0)  # lrm.main seeds 0 before from_base: the control is both runs' starting point
    acc = {"untrained": judge_agreement(M.LatentRewardModel.from_base("tiny").eval(), lat0, lat1, caps, win0)}
    for name, extra in (("mpcf", ["--keep", str(tmp_path / "mpcf" / "keep.json")]), ("unfiltered", ["--keep", ""])):
        out = str(tmp_path / f"lrm-{name}")
        L.main(L.get_config(["--model", "tiny", "--out", out, "--workers", "0", "--max_train_steps", "30", "--train_batch_size", "32", "--warmup", "10",
                             "--eval_every", "100000", "--save_every", "100000", "--eval_timesteps", "1",
                             "--eval_max_pairs", "4", *extra]))
        acc[name] = judge_agreement(M.LatentRewardModel.from_pretrained(out).eval(), lat0, lat1, caps, win0)
    print(f"\nMPCF strategy 2 kept {counts['win_lose_kept']}/{counts['win_lose']} win-lose + {counts['ties_kept']}/"
          f"{counts['ties']} ties; LRM (30 steps x 32 pairs) agreement with the clean judge on {len(caps)} held-out "
          "pairs at t=1: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["mpcf"] > acc["untrained"] + 0.05 and acc["unfiltered"] > acc["untrained"] + 0.03  # both learned
    assert acc["mpcf"] > acc["unfiltered"] + 0.02   # MPCF helps (0.697 vs 0.640 on 383 pairs)


# ----------------------------------------------------------------------------- mpcf.py: logged numbers, refusals, kill and resume
def test_every_number_mpcf_prints_and_logs_matches_a_hand_count(tmp_path, capsys):
    """The filter's printed line and log row, on the hand-made table: every number by hand."""
    import re
    data = str(tmp_path / "pairs.parquet")
    hand_dataset(data)
    gaps = pd.DataFrame({"aesthetic_gap": [0.1, -0.6, 0.1, -0.4, 1.0, 0.19, -0.9, 1.0, 0.0, math.nan],
                         "clip_gap": [0.01, 0.1, 0.02, 0.1, 0.1, -0.02, 0.1, 0.1, 0.0, 0.0],
                         "vqa_gap": [0.2, 0.2, 0.06, 0.1, -0.1, 0.0, 0.1, 0.1, 0.0, 0.0]})
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    out = str(tmp_path / "out")
    main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "gaps.csv"), "--out", out]))
    # by hand: labels cycle win0 / win1 / tie; row 7 unlabelled, row 8 identical, row 9 NaN
    hand = dict(win_lose=6, win_lose_kept=2, ties=2, ties_kept=2, no_label=1, identical=1, unscored=1)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", printed.split(")", 1)[1].split("->")[0])]
    assert numbers == [2, 6, 2, 2, 4], printed   # kept / win-lose, kept / ties, rows kept
    tail = printed.split("dropped", 1)[1]
    assert [int(x) for x in re.findall(r"\d+", tail)] == [1, 1, 1], printed
    bounds = [float(x) for x in re.findall(r"-?\d+\.\d+", printed.split(":", 1)[0])]
    assert bounds == [-0.5, 0.0, 0.0, 0.2, 0.03, 0.07]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1] == dict(step="filter", bounds=bounds, **hand)


def test_mpcf_kill_anywhere_then_resume_gives_the_same_files(world_pairs, tmp_path):
    """SIGKILL at each write boundary of `mpcf.py all`; --resume ends with the same gaps.csv and
    keep.json bytes as an uninterrupted run, no orphan .tmp file, files 0644."""
    import stat
    base = ["--model", "tiny", "--data", world_pairs, "--batch_size", "32"]
    ref = str(tmp_path / "ref")
    main(get_config(base + ["--out", ref]))
    for point in ("scored batch 2", "mid gaps.csv", "mid keep.json"):
        out = str(tmp_path / point.replace(" ", "-"))
        env = dict(os.environ, OMP_NUM_THREADS="1", LPO_KILL_AT=point)
        run = subprocess.run([sys.executable, "mpcf.py", *base, "--out", out], capture_output=True,
                             text=True, timeout=120, env=env)
        assert run.returncode == -9, (point, run.returncode, run.stderr[-2000:])
        main(get_config(base + ["--out", out, "--resume"]))
        for name in ("gaps.csv", "keep.json"):
            assert open(os.path.join(out, name)).read() == open(os.path.join(ref, name)).read(), point
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")], point
        for name in os.listdir(out):
            assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name


def test_tiny_presets_use_one_thread(monkeypatch, tmp_path):
    """The quickstart must not need OMP_NUM_THREADS: the tiny presets set torch to one thread."""
    for module, extra in ((mpcf, []), (sample, []), (ev, ["--lora", "x"])):
        assert module.get_config(["--model", "tiny", *extra]).threads == 1
        assert module.get_config(["--model", "sd15", *extra]).threads == 0
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    data = str(tmp_path / "pairs.parquet")
    hand_dataset(data)
    pd.DataFrame({c: [0.5] * 10 for c in mpcf.GAP_COLS}).to_csv(tmp_path / "gaps.csv", index=False)
    main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "gaps.csv"), "--out", str(tmp_path / "m")]))
    assert calls == [1]


def test_mpcf_and_eval_share_one_definition_of_each_scorer():
    """One name, one meaning: eval's aesthetic and CLIP columns are MPCF's G_A and G_C scorers."""
    for name in ("clip_scorer", "load_aesthetic_head"):  # clip_scorer: aesthetic_score, clip_score
        assert getattr(ev, name) is getattr(mpcf, name)
    for name in ("aesthetic_score", "clip_score"):  # no second definition of either in eval.py
        assert getattr(ev, name, getattr(mpcf, name)) is getattr(mpcf, name)
    assert not hasattr(ev, "EvalConfig") and ev.Config is not sample.Config


def _made_once(name, make):
    """A folder of test inputs in this session's scratch folder, made by make(folder)."""
    target = os.path.join(SCRATCH, name)
    os.makedirs(target)
    make(target)
    return target


def _mpcf_bad_files(folder):
    """Files for mpcf's bad-input cases."""
    rows = hand_dataset(os.path.join(folder, "pairs.parquet"))
    pd.DataFrame(rows).assign(caption=list(range(10))).to_parquet(os.path.join(folder, "int_captions.parquet"))
    pd.DataFrame(rows).drop(columns=["label_1"]).to_parquet(os.path.join(folder, "no_label_1.parquet"))
    gaps = pd.DataFrame({c: [0.5] * 10 for c in mpcf.GAP_COLS})
    gaps.assign(index=np.arange(10) * 7).to_csv(os.path.join(folder, "index_out_of_range.csv"), index=False)
    gaps.assign(clip_gap="high").to_csv(os.path.join(folder, "text_gaps.csv"), index=False)
    gaps.assign(index=0).head(0).to_csv(os.path.join(folder, "empty_gaps.csv"), index=False)


_MPCF_BAD = _made_once("mpcf-bad-inputs-v2", _mpcf_bad_files)
BAD_INPUTS = globals().get("BAD_INPUTS", [])
BAD_INPUTS += [
    ("mpcf", ["--out", "{run}"], "--resume"),
    ("mpcf", ["score", "--out", "{run}"], "--resume"),
    ("mpcf", ["--model", "sd3"], "model"),
    ("mpcf", ["--strategy", "4", "--out", "{tmp}"], "strategy"),
    ("mpcf", ["--bounds", "1,2", "--out", "{tmp}"], "bounds"),
    ("mpcf", ["--batch_size", "0", "--out", "{tmp}"], "batch_size"),
    ("mpcf", ["--out", "/dev/null/out"], "cannot write"),
    ("mpcf", ["--data", "{pairs}", "--split", "nope", "--out", "{tmp}"], "split"),
    ("mpcf", ["--data", f"{_MPCF_BAD}/int_captions.parquet", "--out", "{tmp}"], "caption"),
    ("mpcf", ["--data", f"{_MPCF_BAD}/no_label_1.parquet", "--out", "{tmp}"], "label_1"),
    ("mpcf", ["filter", "--data", f"{_MPCF_BAD}/pairs.parquet", "--out", "{tmp}",
              "--gaps", f"{_MPCF_BAD}/index_out_of_range.csv"], "index"),
    ("mpcf", ["filter", "--data", f"{_MPCF_BAD}/pairs.parquet", "--out", "{tmp}",
              "--gaps", f"{_MPCF_BAD}/text_gaps.csv"], "numbers"),
    ("mpcf", ["filter", "--gaps", "{tmp}/missing.csv", "--out", "{tmp}"], "gaps"),
    ("mpcf", ["filter", "--data", f"{_MPCF_BAD}/pairs.parquet", "--out", "{tmp}",
              "--gaps", f"{_MPCF_BAD}/empty_gaps.csv"], "no rows"),
    # scoring writes OUT/gaps.csv: a given --gaps file (hours of scoring) is never overwritten
    ("mpcf", ["--gaps", f"{_MPCF_BAD}/text_gaps.csv", "--out", "{tmp}"], "filter"),
]


# ============================================================================ lpo.py: Latent Preference Optimization
def run_lpo(*argv):
    return lpo.main(lpo.get_config(list(argv)))


def schedule(steps, spacing="leading"):
    from diffusers import DDIMScheduler
    s = DDIMScheduler.from_pretrained("tiny/sd15", subfolder="scheduler", timestep_spacing=spacing)
    s.set_timesteps(steps)
    return s


# ----------------------------------------------------------------------------- lpo.py: math
@pytest.mark.parametrize("steps,spacing", [(20, "leading"), (10, "leading"), (50, "trailing")])
def test_ddim_step_matches_diffusers(steps, spacing):
    """ddim_step's Gaussian + the same noise == DDIMScheduler.step(eta=1) at every step."""
    s = schedule(steps, spacing)
    ts = s.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ts):
        x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ref = s.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        mean, std = lpo.ddim_step(eps, x, torch.full((3,), t), torch.full((3,), t_prev), s.alphas_cumprod, 1.0)
        torch.testing.assert_close(mean + std * noise, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(std.flatten(), s._get_variance(t, t_prev).sqrt().float())


def test_sigma_and_thresholds_reproduce_spec():
    s = schedule(20)
    ts = s.timesteps
    ts_prev = torch.cat([ts[1:], torch.tensor([-1])])
    sig = lpo.ddim_sigma(ts, ts_prev, s.alphas_cumprod, 1.0).flatten()
    assert ts[0] == 951 and ts[-1] == 1
    # SPEC 3: sigma 0.6444 (t=951), 0.6241, 0.6029, ..., 0.1673 (t=101), 0.0406 (t=51), 0.0206 (t=1)
    for t, want in ((951, 0.6444), (901, 0.6241), (851, 0.6029), (101, 0.1673), (51, 0.0406), (1, 0.0206)):
        assert abs(sig[ts.tolist().index(t)].item() - want) < 1e-4, t
    th = lpo.pair_thresholds(sig, 0.35, 0.5)
    assert abs(th[0] - 0.5) < 1e-9 and abs(th[-1] - 0.35) < 1e-9 and (th.diff() < 0).all()
    assert abs(2 * math.atanh(th[0]) - 1.0986) < 1e-3 and abs(2 * math.atanh(th[-1]) - 0.7310) < 1e-3
    for steps in (10, 50):  # any schedule: endpoints at th_max / th_min, linear in sigma in between
        s = schedule(steps)
        tp = torch.cat([s.timesteps[1:], torch.tensor([-1])])
        sig = lpo.ddim_sigma(s.timesteps, tp, s.alphas_cumprod, 1.0).flatten().double()
        th = lpo.pair_thresholds(sig, 0.45, 0.6)
        assert len(th) == steps and abs(th.max() - 0.6) < 1e-9 and abs(th.min() - 0.45) < 1e-9
        torch.testing.assert_close(th, 0.45 + (sig - sig.min()) / (sig.max() - sig.min()) * 0.15)


def test_step_logprob_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    std = torch.rand(5, 1, 1, 1, generator=g) + 0.05
    want = torch.distributions.Normal(mean, std).log_prob(x).mean((1, 2, 3))
    torch.testing.assert_close(lpo.step_logprob(x, mean, std), want)
    assert lpo.step_logprob(x.half(), mean.half(), std).dtype == torch.float32


def test_select_pairs_by_hand():
    scores = torch.tensor([[0.0, 2.0, 0.5, -1.0],    # gap 3.0
                           [0.1, 0.2, 0.3, 0.0],     # gap 0.3
                           [1.0, 1.0, 1.0, 1.0]])    # gap 0
    win, lose, ok = lpo.select_pairs(scores, 0.5)    # logit gap 2 atanh(0.5) = 1.0986
    assert win.tolist()[:2] == [1, 2] and lose.tolist()[:2] == [3, 3] and ok.tolist() == [True, False, False]
    _, _, ok = lpo.select_pairs(scores, torch.tensor(0.1))  # 2 atanh(0.1) = 0.2007
    assert ok.tolist() == [True, True, False]


def test_lpo_loss_by_hand_with_clamp():
    lw = torch.tensor([0.05, 0.30, 0.00], requires_grad=True)   # policy log-probs, winners
    ll = torch.tensor([0.00, 0.00, -0.50], requires_grad=True)  # losers
    rw, rl = torch.zeros(3), torch.zeros(3)                       # reference
    loss, st = lpo.lpo_loss(lw, ll, rw, rl, beta=10.0, clip_eps=0.1)
    # log r clamped to [log 0.9, log 1.1] = [-0.10536, 0.09531]
    m = [10 * 0.05, 10 * math.log(1.1), 10 * (0 - math.log(0.9))]
    want = sum(math.log1p(math.exp(-v)) for v in m) / 3
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    # pair 0 inside the band: dL/dlw = -beta sigmoid(-m) / 3; pair 1's winner and pair 2's loser are clamped
    assert abs(lw.grad[0].item() + 10 / (1 + math.exp(m[0])) / 3) < 1e-6
    assert lw.grad[1].item() == 0.0 and ll.grad[2].item() == 0.0
    assert ll.grad[1].item() != 0.0 and lw.grad[2].item() != 0.0
    assert st["acc"] == 1.0 and abs(st["clipfrac"] - 2 / 6) < 1e-6


def test_apply_update_clips_for_real_and_stops_on_nan():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])   # norm 50
    norm = lpo.apply_update([p], opt, torch.tensor(1.0), 1, 1.0)
    assert abs(norm - 50.0) < 1e-4 and abs(p.detach().norm().item() - 1.0) < 1e-5  # the step was clipped to 1
    before = p.detach().clone()
    p.grad = torch.ones(4)
    with pytest.raises(lpo.NonFiniteUpdate, match="non-finite"):   # main turns it into one line
        lpo.apply_update([p], opt, torch.tensor(float("nan")), 1, 1.0)
    assert torch.equal(p.detach(), before) and not issubclass(lpo.NonFiniteUpdate, SystemExit)


# ----------------------------------------------------------------------------- lpo.py: the method against independent oracles
@pytest.mark.parametrize("th", [0.1, 0.35, 0.5, 0.6])
def test_select_pairs_threshold_is_the_softmax_gap(th):
    """A pair is kept where softmax([s_w, s_l]) gives p_w - p_l > th (paper: the dynamic threshold on
    the preference probability), i.e. a logit gap above 2 atanh(th): gaps between atanh(th) and
    2 atanh(th) separate the two, and random groups are judged as the softmax oracle judges them."""
    half, full = math.atanh(th), 2 * math.atanh(th)
    gaps = torch.tensor([0.5 * half, 0.5 * (half + full), 0.99 * full, 1.01 * full, 2 * full])
    scores = torch.stack([torch.zeros(5), gaps, gaps / 3, torch.zeros(5)], 1) - 0.25  # (5, 4)
    win, lose, ok = lpo.select_pairs(scores, th)
    assert win.tolist() == [1] * 5 and ok.tolist() == [False, False, False, True, True]
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2000, 4, generator=g) * full / 2   # gaps around the threshold
    win, lose, ok = lpo.select_pairs(scores, torch.tensor(th))
    rows = torch.arange(2000)
    probs = torch.softmax(torch.stack([scores[rows, win], scores[rows, lose]], 1), 1)  # (N, 2)
    assert torch.equal(scores[rows, win], scores.max(1).values) and torch.equal(scores[rows, lose], scores.min(1).values)
    assert torch.equal(ok, probs[:, 0] - probs[:, 1] > th) and 0.2 < ok.float().mean() < 0.95


@pytest.mark.parametrize("base", ["tiny/sd15", "tiny/sdxl"])
def test_make_schedule_is_the_ddim_schedulers_grid(base):
    """make_schedule's timesteps are DDIMScheduler.set_timesteps' (SD configs: leading spacing,
    steps_offset 1, so 20 steps run t = 951, 901, ..., 1), each step goes to the next one (the last to
    a_0), and its sigma is the scheduler's eta = 1 std; thresholds run th_max -> th_min."""
    from diffusers import DDIMScheduler
    config = DDIMScheduler.load_config(base, subfolder="scheduler")
    for steps in (20, 10, 7):
        s = lpo.make_schedule(config, steps, 0.35, 0.5, "cpu")
        ref = DDIMScheduler.from_pretrained(base, subfolder="scheduler")
        ref.set_timesteps(steps)
        assert s.timesteps.tolist() == ref.timesteps.tolist()
        stride = 1000 // steps
        assert s.prev_timesteps.tolist() == [max(t - stride, -1) for t in ref.timesteps.tolist()]
        want = torch.stack([ref._get_variance(t, t - stride).sqrt() for t in ref.timesteps.tolist()])
        torch.testing.assert_close(s.sigmas.float(), want.float(), rtol=1e-5, atol=1e-6)
        assert abs(s.thresholds[0] - 0.5) < 1e-9 and abs(s.thresholds[-1] - 0.35) < 1e-9
    assert lpo.make_schedule(config, 20, 0.35, 0.5, "cpu").timesteps.tolist() == list(range(951, 0, -50))


def _lora_pipe(model, lora_scale=0.3):
    """The tiny pipeline of a preset (no VAE) with a LoRA whose B is non-zero, as after training."""
    cfg = lpo.get_config(["--model", model])
    cfg.resolution, latent = models.geometry(cfg.base, cfg.resolution)
    pipe = models.load_pipeline(cfg.base, torch.device("cpu"), torch.float32, vae=False)
    params = lpo.add_lora(pipe.unet, 4, 0, False)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_scale, generator=torch.Generator().manual_seed(len(name)))
    return cfg, pipe, params, latent


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_pair_logprobs_equal_two_denoiser_calls_mixed_at_the_guidance_scale(model):
    """pair_logprobs (the inputs of the LPO loss) against an oracle built apart: the uncond and cond
    halves of the CFG batch through separate U-Net calls, eps = eps_u + w (eps_c - eps_u), the mean
    from DDIMScheduler.step(eta=1) without noise and its std from the scheduler's variance, log N
    from torch.distributions (mean over C x H x W); the reference through a fresh base U-Net with
    no LoRA at all (not the adapters switched off)."""
    from types import SimpleNamespace
    from diffusers import DDIMScheduler, UNet2DConditionModel
    cfg, pipe, _, latent = _lora_pipe(model)
    steps, w = 10, 3.0
    schedule = lpo.make_schedule(pipe.scheduler.config, steps, 0.1, 0.2, "cpu", latent)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    cond = models.encode_for_cfg(pipe, prompts, cfg.resolution)
    g = torch.Generator().manual_seed(0)
    picks = [0, 4, 9]
    mb = dict(x_t=torch.randn(3, 4, latent, latent, generator=g), x_w=torch.randn(3, 4, latent, latent, generator=g),
              x_l=torch.randn(3, 4, latent, latent, generator=g), t=schedule.timesteps[picks],
              t_prev=schedule.prev_timesteps[picks])
    run_cfg = SimpleNamespace(guidance_scale=w, eta=1.0)
    got = lpo.pair_logprobs(pipe.unet, mb, cond, schedule, run_cfg)
    base_unet = UNet2DConditionModel.from_pretrained(cfg.base, subfolder="unet")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)

    def half(tree, part):   # rows of the uncond (0) or cond (1) half of the [uncond; cond] batch
        if isinstance(tree, dict):
            return {k: half(v, part) for k, v in tree.items()}
        return tree.chunk(2)[part]

    def oracle_logprobs(unet):
        out = []
        with torch.no_grad():
            e_u = unet(mb["x_t"], mb["t"], **half(cond, 0)).sample
            e_c = unet(mb["x_t"], mb["t"], **half(cond, 1)).sample
        eps = e_u + w * (e_c - e_u)
        for i, t in enumerate(mb["t"].tolist()):
            mean = scheduler.step(eps[i:i + 1], t, mb["x_t"][i:i + 1], eta=1.0,
                                  variance_noise=torch.zeros(1, 4, latent, latent)).prev_sample
            std = scheduler._get_variance(t, t - 1000 // steps).sqrt()
            normal = torch.distributions.Normal(mean[0], std)
            out.append([normal.log_prob(mb[k][i]).mean() for k in ("x_w", "x_l")])
        return torch.tensor(out)   # (3, 2)

    ref = oracle_logprobs(base_unet)
    torch.testing.assert_close(torch.stack(got[2:], 1), ref, rtol=1e-5, atol=1e-5)
    policy = oracle_logprobs(pipe.unet)
    torch.testing.assert_close(torch.stack(got[:2], 1).detach(), policy, rtol=1e-5, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-3   # the LoRA moves the policy: the two checks differ


class FakeLRM:
    """A stand-in LRM: seeded random scores for the B x K children it is shown; records its inputs."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = []

    def score(self, latents, t, text):
        scores = torch.randn(len(latents), generator=self.generator)
        self.calls.append(dict(latents=latents.clone(), t=t.clone(), scores=scores))
        return scores


def _sample_with_fake_lrm(pipe, latent, prompts, steps, eta, seed=0, lrm_t="child", thresholds=0.0,
                          negate=False, continuation="random"):
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_children=4, guidance_scale=5.0, eta=eta, lrm_t=lrm_t, negate_reward=negate,
                          continuation=continuation)
    schedule = lpo.make_schedule(pipe.scheduler.config, steps, 0.1, 0.2, "cpu", latent)
    schedule.thresholds = torch.full_like(schedule.thresholds, thresholds)   # keep every pair
    cond = models.encode_for_cfg(pipe, prompts, 32)
    lrm = FakeLRM(seed)
    text = dict(cond=torch.zeros(len(prompts), 1))
    generator = torch.Generator().manual_seed(seed)
    tuples, scores, _ = lpo.sample_tuples(pipe.unet, lrm, cond, text, torch.arange(len(prompts)), schedule, cfg,
                                          generator)
    return tuples, scores, lrm, schedule


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_sampling_chain_equals_the_stock_pipelines_latents(model):
    """sample_tuples' trajectory (CFG 5, DDIM, eta 0 so that the chain is deterministic) visits the
    latents of the stock diffusers pipeline with a DDIMScheduler, step by step, from the same initial
    noise: the grid, the guidance and the step are the pipeline's."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    base = "tiny/sd15" if model == "tiny" else "tiny/sdxl"
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    steps = 10
    _, _, lrm, schedule = _sample_with_fake_lrm(pipe, 8, prompts, steps, eta=0.0)
    x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))   # sample_tuples' first draw
    seen = []

    def record(_pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs
    pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=0.0, latents=x_start.clone(), output_type="latent",
         height=32, width=32, callback_on_step_end=record)
    assert len(lrm.calls) == len(seen) == steps
    for i, call in enumerate(lrm.calls):   # the LRM sees each step's K children: at eta 0, K copies of one latent
        kids = call["latents"].view(2, 4, 4, 8, 8)
        assert torch.equal(kids, kids[:, :1].expand_as(kids))
        torch.testing.assert_close(kids[:, 0], seen[i], rtol=1e-4, atol=1e-4)
    assert schedule.timesteps.tolist() == pipe.scheduler.timesteps.tolist()


def test_trajectory_continues_from_a_uniformly_random_child():
    """The paper continues each trajectory from a uniformly random child, not the best: over 32 prompts
    x 9 steps the continued child is the LRM's best about 1/K of the time, and each child index about
    1/K; the LRM is shown the children at their own noise level t_prev (or the parent's t with
    --lrm_t parent); winner and loser are the best and worst child."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("tiny/sd15")
    prompts = ["a red circle"] * 32
    tuples, _, lrm, schedule = _sample_with_fake_lrm(pipe, 8, prompts, 10, eta=1.0)
    chain = tuples["x_t"].view(10, 32, 4, 8, 8)
    best = 0
    index_counts = torch.zeros(4)
    for i, call in enumerate(lrm.calls[:-1]):
        kids = call["latents"].view(32, 4, -1)
        scores = call["scores"].view(32, 4)
        match = (kids - chain[i + 1].flatten(1)[:, None]).abs().amax(2) == 0   # (32, 4): which child went on
        assert match.sum(1).eq(1).all()
        picked = match.float().argmax(1)
        index_counts += torch.bincount(picked, minlength=4)
        best += (picked == scores.argmax(1)).sum().item()
        rows = torch.arange(32)
        torch.testing.assert_close(tuples["x_w"].view(10, 32, -1)[i], kids[rows, scores.argmax(1)])
        torch.testing.assert_close(tuples["x_l"].view(10, 32, -1)[i], kids[rows, scores.argmin(1)])
    n = 9 * 32
    assert 0.15 < best / n < 0.35, best / n                       # winner-continuation: 1.0
    assert ((index_counts / n - 0.25).abs() < 0.1).all(), index_counts
    t_prev = schedule.prev_timesteps.clamp(min=0).tolist()
    assert [call["t"].unique().tolist() for call in lrm.calls] == [[t] for t in t_prev]
    _, _, parent_lrm, _ = _sample_with_fake_lrm(pipe, 8, prompts[:2], 10, eta=1.0, lrm_t="parent")
    assert [call["t"].unique().tolist() for call in parent_lrm.calls] == [[t] for t in schedule.timesteps.tolist()]
    # --continuation best (the ablation's greedy chain): the next parent is always the winner
    greedy, _, _, _ = _sample_with_fake_lrm(pipe, 8, prompts[:4], 10, eta=1.0, continuation="best")
    torch.testing.assert_close(greedy["x_t"].view(10, 4, -1)[1:], greedy["x_w"].view(10, 4, -1)[:-1])


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pooled_update(rank, world, port, tuples, out):
    """Step 2 + step 3 of an LPO round (pool_tuples, train_on_pairs with SGD) on this rank's tuples;
    writes the LoRA after the update and the round's sums to out."""
    from types import SimpleNamespace
    import torch.distributed as tdist
    torch.set_num_threads(1)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg, pipe, params, latent = _lora_pipe("tiny", lora_scale=0.05)
    schedule = lpo.make_schedule(pipe.scheduler.config, 10, 0.1, 0.2, "cpu", latent)
    optimizer = torch.optim.SGD(params, lr=0.1)
    mine, count = lpo.pool_tuples(tuples, world, rank, seed=5, round_index=3)
    run_cfg = SimpleNamespace(train_batch_size=8, grad_accum=1, guidance_scale=5.0, eta=1.0, beta=2.0,
                              clip_eps=0.1, resolution=32)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    sums = lpo.train_on_pairs(pipe.unet, pipe, optimizer, mine, prompts, schedule, run_cfg, world)
    torch.save(dict(lora=torch.nn.utils.parameters_to_vector(params).detach(), sums=sums, count=count,
                    ids=mine["prompt_ids"].tolist()), out)
    if world > 1:
        tdist.destroy_process_group()


def test_two_ranks_train_like_one_process_on_the_pooled_pairs(tmp_path):
    """Two gloo ranks holding 5 and 3 pairs (counts differ) pool them, take equal shares of one shared
    permutation and average their gradients: the LoRA after the update equals one process trained on all
    8 pairs at once (a per-rank permutation, an unaveraged or a per-rank gradient would not)."""
    import multiprocessing
    g = torch.Generator().manual_seed(0)
    schedule_t = torch.tensor([951, 701, 451, 201, 51, 901, 501, 101])
    every = dict(x_t=torch.randn(8, 4, 8, 8, generator=g), x_w=torch.randn(8, 4, 8, 8, generator=g) * 0.6,
                 x_l=torch.randn(8, 4, 8, 8, generator=g) * 0.6, t=schedule_t, t_prev=(schedule_t - 100).clamp(min=-1),
                 prompt_ids=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    shards = [{k: v[:5] for k, v in every.items()}, {k: v[5:] for k, v in every.items()}]
    port = _free_port()
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_pooled_update, args=(r, 2, port, shards[r], str(tmp_path / f"r{r}.pt")))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    _pooled_update(0, 1, None, every, str(tmp_path / "one.pt"))
    r0, r1, one = (torch.load(tmp_path / f"{name}.pt") for name in ("r0", "r1", "one"))
    assert r0["count"] == r1["count"] == one["count"] == 8
    assert sorted(r0["ids"] + r1["ids"]) == sorted(one["ids"]) and r0["ids"] + r1["ids"] == one["ids"]
    assert one["sums"]["updates"] == r0["sums"]["updates"] == 1 and one["sums"]["grad_norm"] < 1   # no clipping
    torch.testing.assert_close(r0["lora"], r1["lora"], rtol=0, atol=0)
    torch.testing.assert_close(r0["lora"], one["lora"], rtol=1e-5, atol=1e-7)
    start = _lora_pipe("tiny", lora_scale=0.05)[2]
    assert (one["lora"] - torch.nn.utils.parameters_to_vector(start)).abs().max() > 1e-4   # it moved



def test_children_spread_as_the_step_and_the_negated_reward_picks_the_worst():
    """The K children of a step are mean + sigma_t z (their spread around their own mean has the
    variance sigma_t^2 (K - 1) / K of the schedule's eta = 1 std); with --negate_reward the winner is
    the child the LRM scores lowest, the loser the highest."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("tiny/sd15")
    _, _, lrm, schedule = _sample_with_fake_lrm(pipe, 8, ["a red circle"] * 16, 10, eta=1.0)
    for call, sigma in zip(lrm.calls, schedule.sigmas.tolist()):
        kids = call["latents"].view(16, 4, -1)
        spread = (kids - kids.mean(1, keepdim=True)).square().mean() / (sigma**2 * 3 / 4)
        assert abs(spread.item() - 1) < 0.05, spread
    tuples, _, lrm, _ = _sample_with_fake_lrm(pipe, 8, ["a red circle"] * 4, 10, eta=1.0, negate=True)
    rows = torch.arange(4)
    for i, call in enumerate(lrm.calls):
        kids = call["latents"].view(4, 4, -1)
        scores = call["scores"].view(4, 4)
        torch.testing.assert_close(tuples["x_w"].view(10, 4, -1)[i], kids[rows, scores.argmin(1)])
        torch.testing.assert_close(tuples["x_l"].view(10, 4, -1)[i], kids[rows, scores.argmax(1)])


def test_one_step_thresholds_and_the_pooling_seed():
    """A one-step schedule has one sigma: its threshold is th_min (not 0 / 0 = NaN); --seed picks the
    shared shuffle of the pooled pairs (the same seed the same order, another seed another)."""
    assert lpo.pair_thresholds([0.3], 0.35, 0.5).tolist() == [0.35]
    from diffusers import DDIMScheduler
    config = DDIMScheduler.load_config("tiny/sd15", subfolder="scheduler")
    assert torch.isfinite(lpo.make_schedule(config, 1, 0.35, 0.5, "cpu").thresholds).all()
    tuples = dict(t=torch.arange(50), x_t=torch.arange(50))
    first, _ = lpo.pool_tuples(tuples, 1, 0, seed=1, round_index=0)
    again, _ = lpo.pool_tuples(tuples, 1, 0, seed=1, round_index=0)
    other, _ = lpo.pool_tuples(tuples, 1, 0, seed=2, round_index=0)
    assert torch.equal(first["t"], again["t"]) and not torch.equal(first["t"], other["t"])
    assert sorted(first["t"].tolist()) == list(range(50)) and torch.equal(first["t"], first["x_t"])

# ----------------------------------------------------------------------------- lpo.py: models and data
def test_sdxl_encoding_uses_zero_uncond_and_real_time_ids():
    cfg = lpo.get_config(["--model", "tiny-xl"])
    cfg.resolution, latent = models.geometry(cfg.base, cfg.resolution)
    pipe = models.load_pipeline(cfg.base, torch.device("cpu"), torch.float32, vae=False)
    assert pipe.vae is None and latent == 8
    kw = models.encode_for_cfg(pipe, ["a red circle", "a blue square"], cfg.resolution)
    ctx, add = kw["encoder_hidden_states"], kw["added_cond_kwargs"]
    assert ctx.shape[0] == 4 and ctx[:2].abs().sum() == 0 and ctx[2:].abs().sum() > 0
    assert add["text_embeds"][:2].abs().sum() == 0 and add["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4
    cfg = lpo.get_config(["--model", "tiny"])
    pipe = models.load_pipeline(cfg.base, torch.device("cpu"), torch.float32, vae=False)
    kw = models.encode_for_cfg(pipe, ["a red circle"], 32)  # SD1.5: the uncond is the encoding of "" (not zeros)
    assert kw["encoder_hidden_states"][0].abs().sum() > 0 and "added_cond_kwargs" not in kw


def test_bad_inputs_fail_with_one_clear_line(tmp_path, fresh_lrm):
    def err(*argv):
        with pytest.raises(SystemExit) as e:
            run_lpo("--out", str(tmp_path / "o"), *argv)
        msg = str(e.value)
        assert msg.startswith("lpo.py: error:") and "\n" not in msg, msg
        return msg
    assert "no LRM" in err("--lrm", str(tmp_path / "missing"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no prompts" in err("--lrm", fresh_lrm["sd"], "--prompts", str(empty))
    from datasets import Dataset
    os.makedirs(tmp_path / "nocap")
    Dataset.from_dict({"words": ["a red circle"]}).to_parquet(str(tmp_path / "nocap" / "train.parquet"))
    assert "caption" in err("--lrm", fresh_lrm["sd"], "--prompts", str(tmp_path / "nocap"))
    # an LRM built on another latent space (SD's VAE scaling, not the tiny VAE's)
    other = tmp_path / "other_lrm"
    os.makedirs(other)
    c = json.load(open(os.path.join(fresh_lrm["sd"], "lrm_config.json")))
    c["latent_space"] = [4, 0.18215, None]
    json.dump(c, open(other / "lrm_config.json", "w"))
    assert "latent space" in err("--lrm", str(other))


# ----------------------------------------------------------------------------- lpo.py: the loop
SMALL = ["--max-rounds", "1", "--sample-batch-size", "4", "--num-prompts", "8", "--train-batch-size", "32", "--eval-samples", "0"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_equals_uninterrupted_and_lora_loads(tmp_path, fresh_lrm):
    """Bitwise on CPU: 2 rounds in one go == 1 round, stop, --resume, 1 more round."""
    common = ["--model", "tiny", "--lrm", fresh_lrm["sd"], "--sample-batch-size", "4", "--num-prompts", "8",
              "--train-batch-size", "16", "--th-min", "0", "--th-max", "0", "--eval-samples", "0", "--ckpt-every", "1", "--num-inference-steps", "10"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = run_lpo(*common, "--out", a, "--max-rounds", "2")
    run_lpo(*common, "--out", b, "--max-rounds", "1")
    rb = run_lpo(*common, "--out", b, "--max-rounds", "2", "--resume")
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert ra["step"] == rb["step"] == ca["step"] > 1 and cb["next_round"] == 2
    assert torch.equal(ca["lora"], cb["lora"])
    assert [r["loss"] for r in read_log(a) if "round" in r] == [r["loss"] for r in read_log(b) if "round" in r]
    # the saved LoRA (diffusers format) loads into the tiny pipeline and changes its output
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("tiny/sd15")
    pipe.set_progress_bar_config(disable=True)
    def generate():
        return pipe(["a red circle"] * 2, num_inference_steps=5, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    before = generate()
    pipe.load_lora_weights(b)
    after = generate()
    assert np.abs(after - before).max() > 1e-3


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, fresh_lrm, monkeypatch):
    common = ["--model", "tiny", "--lrm", fresh_lrm["sd"], "--out", str(tmp_path / "n"), *SMALL[2:], "--num-inference-steps", "5",
              "--th-min", "0", "--th-max", "0", "--ckpt-every", "1"]
    run_lpo(*common, "--max-rounds", "1")
    good = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    real_loss = lpo.lpo_loss

    def nan_loss(*args):   # a diverged step (--beta nan, --lr inf: now refused as options)
        loss, stats = real_loss(*args)
        return loss * math.nan, stats
    monkeypatch.setattr(lpo, "lpo_loss", nan_loss)
    with pytest.raises(SystemExit, match="non-finite"):
        run_lpo(*common, "--max-rounds", "2", "--resume")
    after = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    assert after["next_round"] == good["next_round"] == 1 and torch.equal(after["lora"], good["lora"])


def test_sdxl_one_iteration(tmp_path, fresh_lrm):
    out = str(tmp_path / "xl")
    r = run_lpo("--model", "tiny-xl", "--lrm", fresh_lrm["xl"], "--out", out, *SMALL, "--th-min", "0", "--th-max", "0",
                "--save-merged")
    rows = read_log(out)
    assert r["step"] >= 1 and rows[0]["tuples"] > 0 and np.isfinite(rows[0]["loss"])
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.path.exists(os.path.join(out, "unet", "config.json"))  # merged U-Net


def spawn(cmd):
    """A CPU subprocess in its own process group (so that a hang can be killed whole), one thread."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(p, timeout=240, error=None):
    """Wait for a spawned lpo.py; return its log rows. error: it must fail with this in stderr."""
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.communicate()
        raise AssertionError(f"timed out: {p.args}")
    if error:
        assert p.returncode != 0 and error in err, err[-3000:]
    else:
        assert p.returncode == 0, err[-3000:]
    return read_log(p.args[p.args.index("--out") + 1])


def torchrun(out, lrm, *extra, error=None):
    return finish(spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lpo.py",
                         "--model", "tiny", "--lrm", lrm, "--out", out, *SMALL, "--num-inference-steps", "10", *extra]),
                  timeout=120, error=error)


def test_two_processes_end_with_identical_lora(tmp_path, fresh_lrm):
    """Two ranks (gloo) end with one LoRA; issue 11: rank 0 killed mid-checkpoint takes the job down
    at once, and the 2-rank resume ends with the LoRA of the unbroken 2-rank run; a run that keeps
    no pair ends non-zero saying why, without a hang."""
    extra = ["--max-rounds", "2", "--ckpt-every", "1", "--th-min", "0", "--th-max", "0.05"]
    rows = torchrun(str(tmp_path / "ddp"), fresh_lrm["sd"], *extra)
    fp = rows[-1]["final"]["lora_fingerprint"]
    assert rows[0]["tuples"] > 0 and rows[-1]["final"]["step"] >= 1
    assert len(fp) == 2 and fp[0] == fp[1]   # identical LoRA weights on both ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lpo.py", "--model",
           "tiny", "--lrm", fresh_lrm["sd"], "--out", str(tmp_path / "cut"), *SMALL[2:], "--num-inference-steps",
           "10", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", LPO_KILL_AT="mid ckpt.pt")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        raise AssertionError("a killed rank left the job hanging")
    assert p.returncode != 0
    assert os.path.exists(tmp_path / "cut" / "ckpt.pt.tmp") and not os.path.exists(tmp_path / "cut" / "ckpt.pt")
    resumed = torchrun(str(tmp_path / "cut"), fresh_lrm["sd"], *extra, "--resume")
    assert resumed[-1]["final"]["lora_fingerprint"] == fp
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=False) for name in ("ddp", "cut"))
    assert torch.equal(a["lora"], b["lora"]) and a["world_size"] == b["world_size"] == 2
    # no pair clears the threshold: no training, no hang, a clean end that says why (non-zero, issue 11.3)
    rows = torchrun(str(tmp_path / "none"), fresh_lrm["sd"], "--th-min", "0.999999", "--th-max", "0.999999",
                    error="lpo.py: error: no update in 1 rounds")
    assert rows[0]["tuples"] == 0 and rows[-1]["final"]["step"] == 0


# ----------------------------------------------------------------------------- lpo.py: it learns (tiny world)
def test_lpo_raises_judge_win_rate_and_negated_reward_does_not(tmp_path):
    """The README's main command, shortened to 5 rounds: LPO with the shipped tiny LRM beats the base on
    held-out seeds; the same run with the LRM's scores negated does not (the signal flows through the LRM).
    The two runs go in parallel, one thread each."""
    short = ["--model", "tiny", "--num-prompts", "160", "--eval-samples", "150"]
    runs = {name: spawn([sys.executable, "lpo.py", *short, "--out", str(tmp_path / name), *extra])
            for name, extra in (("lpo", []), ("ctl", ["--negate-reward"]))}
    try:
        res = {name: finish(p)[-1]["final"] for name, p in runs.items()}
    finally:  # never leave a run behind
        for p in runs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
    r, c = res["lpo"], res["ctl"]
    print(f"\nLPO win-rate {r['win_rate']:.3f} [{r['win_low']:.3f}, {r['win_high']:.3f}], caption match "
          f"{r['match_base']:.3f} -> {r['match_tuned']:.3f}; negated control {c['win_rate']:.3f} "
          f"[{c['win_low']:.3f}, {c['win_high']:.3f}]")
    assert r["win_rate"] >= 0.6 and r["win_low"] > 0.5
    assert c["win_rate"] < 0.5
    rows = [x for x in read_log(str(tmp_path / "lpo")) if "round" in x]
    assert all(0 < x["kept_frac"] < 1 for x in rows) and rows[-1]["step"] > 0


# ----------------------------------------------------------------------------- lpo.py: resume, refusals, logged numbers, prompt files, merge
LPO_TINY_RUN = ["--model", "tiny", "--sample-batch-size", "4", "--num-prompts", "8", "--train-batch-size", "8",
            "--num-inference-steps", "4", "--eval-samples", "0"]


def lpo_folder_digest(folder):
    """{relative path: bytes} of every file under folder (to prove that a refusal changed nothing)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def lpo_error(*argv):
    """Run lpo in-process; it must stop with one line `lpo.py: error: ...`; returns the line."""
    with pytest.raises(SystemExit) as stop:
        run_lpo(*argv)
    message = str(stop.value)
    assert message.startswith("lpo.py: error:") and "\n" not in message, message
    return message


def test_every_logged_number_matches_an_independent_recomputation(tmp_path, monkeypatch):
    """Issue 11.7: each number of a log.jsonl row, recomputed with numpy from what the run's own
    functions saw (the LRM's scores, the kept tuples, the loss inputs, the update norms)."""
    seen = []   # one dict per round
    sample, loss, update = lpo.sample_tuples, lpo.lpo_loss, lpo.apply_update

    def sample_spy(*args):
        tuples, scores, seconds = sample(*args)
        seen.append(dict(scores=scores.double().numpy(), t=tuples["t"].numpy(), logps=[], norms=[]))
        return tuples, scores, seconds

    def loss_spy(*args):
        seen[-1]["logps"].append([a.detach().double().numpy() for a in args[:4]])
        return loss(*args)

    def update_spy(*args, **kwargs):
        seen[-1]["norms"].append(update(*args, **kwargs))
        return seen[-1]["norms"][-1]
    monkeypatch.setattr(lpo, "sample_tuples", sample_spy)
    monkeypatch.setattr(lpo, "lpo_loss", loss_spy)
    monkeypatch.setattr(lpo, "apply_update", update_spy)
    out = str(tmp_path / "log")
    run_lpo(*LPO_TINY_RUN, "--out", out, "--max-rounds", "2", "--lr", "3e-3", "--num-inference-steps", "10")
    rows = [row for row in read_log(out) if "round" in row]
    assert len(rows) == len(seen) == 2
    steps = 0
    for row, got in zip(rows, seen):
        scores = got["scores"]
        groups = scores.reshape(10, 4, 4)                          # (T, B, K)
        assert np.isclose(row["lrm_mean"], scores.mean(), rtol=1e-9, atol=1e-12)
        assert np.isclose(row["lrm_std"], scores.std(), rtol=1e-9)
        assert np.isclose(row["lrm_gap"], (groups.max(-1) - groups.min(-1)).mean(), rtol=1e-9)
        assert row["tuples"] == len(got["t"]) > 0 and row["kept_frac"] == len(got["t"]) / 40
        assert row["valid_per_bucket"] == np.bincount(np.minimum(got["t"] * 4 // 1000, 3), minlength=4).tolist()
        lw, ll, rw, rl = (np.concatenate(part) for part in zip(*got["logps"]))
        dw, dl = lw - rw, ll - rl
        low, high = math.log(0.9), math.log(1.1)
        margin = 500 * (np.clip(dw, low, high) - np.clip(dl, low, high))
        assert len(got["logps"]) > 1   # several micro-batches: the mean is over all of them
        assert np.isclose(row["loss"], np.logaddexp(0, -margin).mean(), rtol=1e-5)
        assert np.isclose(row["acc"], (dw > dl).mean(), rtol=1e-9)
        ratios = np.concatenate([dw, dl])
        assert np.isclose(row["clipfrac"], ((ratios < low) | (ratios > high)).mean(), rtol=1e-9)
        assert np.isclose(row["grad_norm"], np.mean(got["norms"]), rtol=1e-9)
        steps += len(got["norms"])
        assert row["step"] == steps and row["lr"] == 3e-3
    assert seen[1]["logps"] and any(np.abs(r[0] - r[2]).max() > 0 for r in seen[1]["logps"])


def test_rerun_and_resume_refusals_lr_change_log_tmp_and_file_mode(tmp_path, fresh_lrm, capsys):
    """Issues 11.2, 11.4, 11.6, 11.11: a rerun without --resume and a resume with settings that change
    the run's meaning are refused in one line (listing every difference) with nothing changed on
    disk; a changed lr is applied (not the optimizer state's) and logged; rows past the checkpoint
    and orphan .tmp files go; the LoRA file is 0644 like the rest; a truncated checkpoint is named."""
    out = tmp_path / "r"
    common = [*LPO_TINY_RUN, "--lrm", fresh_lrm["sd"], "--out", str(out), "--th-min", "0", "--th-max", "0",
              "--ckpt-every", "1"]
    run_lpo(*common, "--max-rounds", "1")
    before = lpo_folder_digest(out)
    assert "--resume" in lpo_error(*common, "--max-rounds", "1")
    message = lpo_error(*common, "--resume", "--lora-rank", "16", "--seed", "1", "--num_children", "3")
    assert all(part in message for part in ("lora_rank 8 -> 16", "seed 0 -> 1", "num_children 4 -> 3")), message
    assert lpo_folder_digest(out) == before
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    assert checkpoint["world_size"] == 1
    torch.save(dict(checkpoint, world_size=2), out / "ckpt.pt")
    assert "world_size 2 -> 1" in lpo_error(*common, "--resume")
    torch.save(checkpoint, out / "ckpt.pt")
    # what a kill leaves behind: a half-written file, a row past the checkpoint, a line cut short
    (out / "ckpt.pt.tmp").write_bytes(b"half")
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps(dict(round=7, step=99, loss=1.0)) + "\n" + '{"round": 8, "st')
    run_lpo(*common, "--resume", "--max-rounds", "2", "--lr", "5e-4")
    rows = read_log(out)
    assert [row["round"] for row in rows if "round" in row] == [0, 1]
    assert [row["lr"] for row in rows if "round" in row] == [1e-3, 5e-4]
    assert rows[1]["resume"]["changed"]["lr"] == [1e-3, 5e-4]
    assert torch.load(out / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("pytorch_lora_weights.safetensors", "ckpt.pt", "log.jsonl"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name
    # a truncated checkpoint: one line naming it
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[:len(data) // 2])
    assert "ckpt.pt is damaged" in lpo_error(*common, "--resume", "--max-rounds", "3")


def test_finished_run_resumed_rederives_its_lora_and_merged_unet(tmp_path, fresh_lrm):
    """Issue 11.1: the checkpoint is written last; a finished run resumed writes its final files
    again from the checkpoint, so that a stale LoRA (the old order's kill window) cannot survive."""
    out = tmp_path / "f"
    common = [*LPO_TINY_RUN, "--lrm", fresh_lrm["sd"], "--out", str(out), "--th-min", "0", "--th-max", "0",
              "--max-rounds", "1"]
    order = []
    real_replace = os.replace

    def replace_spy(source, target):
        order.append(os.path.basename(target))
        return real_replace(source, target)
    lpo.os.replace = replace_spy
    try:
        first = run_lpo(*common)
    finally:
        lpo.os.replace = real_replace
    assert order == ["pytorch_lora_weights.safetensors", "ckpt.pt"], order
    good = (out / "pytorch_lora_weights.safetensors").read_bytes()
    from safetensors.torch import load_file, save_file
    stale = {key: value * 0 for key, value in load_file(out / "pytorch_lora_weights.safetensors").items()}
    save_file(stale, out / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    result = run_lpo(*common, "--resume", "--save-merged")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == good and result["step"] == first["step"]
    assert os.path.exists(out / "unet" / "config.json")
    # killed while the merged U-Net is written: the resume replaces the half-written folder
    assert lpo_run_killed([*common, "--resume", "--save-merged"], "mid unet") == -9
    assert os.path.isdir(out / "unet.tmp")
    run_lpo(*common, "--resume", "--save-merged")
    assert not os.path.exists(out / "unet.tmp") and os.path.exists(out / "unet" / "config.json")


def lpo_make_nan_lrm(source, target):
    from lrm_model import LatentRewardModel
    lrm = LatentRewardModel.from_pretrained(source)
    with torch.no_grad():
        lrm.visual_projection.weight[0, 0] = float("nan")
    lrm.save_pretrained(target)


def test_nan_lrm_empty_runs_and_stuck_runs_are_told(tmp_path, fresh_lrm, capsys, monkeypatch):
    """Issues 11.3, 11.8, 11.11: an LRM with non-finite weights is refused at load; a run that keeps
    no pair says why (thresholds against the LRM's score gaps) and ends non-zero, after a warning
    with the figures; a run whose ratios all leave the clip band (--lr 100) is warned about; a
    non-finite update before any checkpoint does not promise one."""
    lpo_make_nan_lrm(fresh_lrm["sd"], str(tmp_path / "nan_lrm"))
    assert "non-finite weights" in lpo_error(*LPO_TINY_RUN, "--lrm", str(tmp_path / "nan_lrm"), "--out", str(tmp_path / "a"))
    three = [*LPO_TINY_RUN, "--lrm", fresh_lrm["sd"], "--num-prompts", "12", "--max-rounds", "3"]
    message = lpo_error(*three, "--out", str(tmp_path / "b"), "--th-min", "0.999999", "--th-max", "0.999999")
    assert "no update in 3 rounds" in message and "need 14.5" in message and "score gap averaged" in message
    warning = capsys.readouterr().err
    assert "warning: only 0.0% of the step groups kept a pair in the first 3 rounds" in warning
    assert read_log(tmp_path / "b")[-1]["final"]["step"] == 0
    run_lpo(*three, "--out", str(tmp_path / "c"), "--th-min", "0", "--th-max", "0", "--lr", "100")
    assert "left the clip band [0.9, 1.1] in two rounds running" in capsys.readouterr().err
    assert "--lr inf: need a finite number" in lpo_error(*three, "--out", str(tmp_path / "d"), "--lr", "inf")
    real_update = distributed.apply_update

    def diverging(params, optimizer, loss, world, max_norm=1.0):   # a step to an infinite weight
        norm = real_update(params, optimizer, loss, world, max_norm)
        params[0].data.fill_(math.inf)
        if not all(torch.isfinite(param).all() for param in params):
            raise distributed.NonFiniteUpdate("non-finite weights after an update")
        return norm
    monkeypatch.setattr(lpo, "apply_update", diverging)
    message = lpo_error(*three, "--out", str(tmp_path / "d"), "--th-min", "0", "--th-max", "0")
    assert "non-finite" in message and "before any checkpoint" in message and "--lr" in message


def test_prompt_files_official_format_and_seeded_uniform_sample(tmp_path, monkeypatch):
    """Issues 11.6 and 13.5: parquet / json / csv / txt prompt files; the official 4k_training_prompts.json
    (a list of {"caption", "trainset_idx"}) as is; distinct captions sampled uniformly with a seed
    (real presets), the tiny preset reading rows in order."""
    captions = [f"caption {i}" for i in range(50)] + ["caption 3", ""] * 5
    table = pd.DataFrame(dict(caption=captions, trainset_idx=range(len(captions))))
    paths = dict(parquet=tmp_path / "p.parquet", csv=tmp_path / "p.csv", json=tmp_path / "4k_training_prompts.json",
                 txt=tmp_path / "p.txt")
    table.to_parquet(paths["parquet"])
    table.to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps(table.to_dict("records")))   # the official layout
    paths["txt"].write_text("\n".join(captions) + "\n")
    rows = [c for c in captions if c]
    for kind, path in paths.items():
        assert lpo.load_prompts(str(path), "train", 100, unique=False) == rows, kind
        assert lpo.load_prompts(str(path), "train", 5) == rows[:5], kind
        drawn = lpo.load_prompts(str(path), "train", 20, seed=0)
        assert drawn == lpo.load_prompts(str(path), "train", 20, seed=0), kind
        assert len(set(drawn)) == 20 and set(drawn) <= set(rows) and drawn != rows[:20], kind
        assert drawn != lpo.load_prompts(str(path), "train", 20, seed=1), kind
        assert drawn == sorted(drawn, key=rows.index)   # kept in the order of the data
    # uniform over the 50 distinct captions: every caption drawn about equally often over many seeds
    counts = {c: 0 for c in dict.fromkeys(rows)}
    for seed in range(200):
        for c in lpo.load_prompts(str(paths["txt"]), "train", 10, seed=seed):
            counts[c] += 1
    assert min(counts.values()) > 20 and max(counts.values()) < 65   # expected 40 each
    # main: real presets sample with --seed; the tiny preset reads rows
    asked = []

    def spy(source, split, n, unique=True, seed=None, strip=False):
        asked.append((unique, seed, strip))
        raise SystemExit("stop")
    monkeypatch.setattr(lpo, "load_prompts", spy)
    for argv in (["--unique-prompts", "--seed", "3"], []):
        with pytest.raises(SystemExit, match="stop"):
            run_lpo(*LPO_TINY_RUN, "--out", str(tmp_path / f"o{len(asked)}"), *argv)
    assert asked == [(True, 3, True), (False, 0, True)]   # lpo.py trains on stripped captions
    assert lpo.get_config(["--model", "sd15"]).unique_prompts and not lpo.get_config(["--model", "tiny"]).unique_prompts


def test_resolution_threads_max_rounds_and_lrm_hint(tmp_path, fresh_lrm, capsys, monkeypatch):
    """Issues 11.6, 11.9, 11.10: --resolution 0 is the pipeline's own (sample_size x VAE factor),
    sizes the VAE cannot produce are refused; --max_rounds beyond the prompts says so; the tiny
    presets use one thread; the missing-LRM hint for a pipeline folder is a command lrm.py takes."""
    folder = os.path.join(ROOT, "tiny", "sd15")
    cfg = lpo.get_config(["--model", folder])
    assert cfg.resolution == 0 and models.geometry(cfg.base, cfg.resolution) == (32, 8)
    cfg.resolution = 64
    assert models.geometry(cfg.base, cfg.resolution) == (64, 16)
    for size in ("33", "36", "-8"):
        assert "resolution" in lpo_error(*LPO_TINY_RUN, "--out", str(tmp_path / "o"), "--resolution", size)
    message = lpo_error("--model", folder, "--lrm", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert f"python lrm.py --model {folder} --data" in message and "no LRM" in message
    assert lpo.get_config(["--model", "tiny"]).threads == lpo.get_config(["--model", "tiny-xl"]).threads == 1
    assert lpo.get_config(["--model", "sd15"]).threads == 0
    threads = []
    monkeypatch.setattr(lpo.torch, "set_num_threads", threads.append)
    run_lpo(*LPO_TINY_RUN, "--model", folder, "--lrm", fresh_lrm["sd"], "--out", str(tmp_path / "m"), "--threads", "1",
            "--prompts", os.path.join(ROOT, "tiny", "pickapic"),
            "--num-prompts", "4", "--epochs", "1", "--max-rounds", "5", "--th-min", "0", "--th-max", "0")
    assert threads == [1]
    err = capsys.readouterr().err
    assert "--max_rounds 5 but 4 prompts x 1 epochs" in err and "give 1 rounds: running 1" in err
    assert [row["round"] for row in read_log(tmp_path / "m") if "round" in row] == [0]


def test_merged_unet_is_fused_in_fp32(tmp_path):
    """Issue 13.3: --save_merged adds the LoRA delta to the base weights read again in fp32: with a
    bf16 training copy, its output equals base + LoRA in fp32; fusing into the bf16 copy does not."""
    from diffusers import UNet2DConditionModel
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 8, 32, generator=g)
    fp32 = UNet2DConditionModel.from_pretrained("tiny/sd15", subfolder="unet")
    params = lpo.add_lora(fp32, 4, 0, False)
    with torch.no_grad():
        for p in params:
            if p.abs().sum() == 0:     # lora_B: zero at init; a small trained delta
                p.copy_(1e-3 * torch.randn(p.shape, generator=g))
        base = fp32(x, t, ctx).sample    # (adapters on)
        fp32.disable_adapters()
        plain = fp32(x, t, ctx).sample
        fp32.enable_adapters()
    effect = (base - plain).abs().max()
    bf16 = UNet2DConditionModel.from_pretrained("tiny/sd15", subfolder="unet").to(torch.bfloat16)
    lpo.add_lora(bf16, 4, 0, False)
    with torch.no_grad():
        for p, q in zip([p for p in bf16.parameters() if p.requires_grad], params):
            p.copy_(q)
        merged = models.merged_denoiser("tiny/sd15", bf16)
        assert merged.dtype == torch.float32
        new_error = (merged(x, t, ctx).sample - base).abs().max()
        bf16.fuse_lora()            # the old --save-merged path
        old_error = (bf16(x.bfloat16(), t, ctx.bfloat16()).sample.float() - base).abs().max()
    assert new_error < 1e-3 * effect and old_error > 0.1 * effect, (new_error, old_error, effect)


def test_quickstart_judge_is_eval_win_rate_and_lpo_stands_alone():
    """Issue 12: the tiny world's judge win-rate (used by lpo.py's quickstart) equals eval.win_rate;
    lpo.py needs no eval.py to train."""
    from tiny.world import bootstrap_win_rate
    rng = np.random.default_rng(3)
    for n in (1, 5, 300):
        tuned, base = rng.integers(0, 4, n) / 2, rng.integers(0, 4, n) / 2   # with ties
        assert bootstrap_win_rate(tuned, base) == ev.win_rate(tuned, base)
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "lpo.py")).read())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "eval" not in imported and "SimpleNamespace" not in open(os.path.join(ROOT, "lpo.py")).read()


def lpo_run_killed(argv, point):
    """lpo.main in a forked child (no second import) that SIGKILLs itself at `point`; -> exit code."""
    import multiprocessing

    def child():
        os.environ["LPO_KILL_AT"] = point
        run_lpo(*argv)
        os._exit(0)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    return process.exitcode


LPO_KILL_POINTS = ["round 0", "before lora", "mid pytorch_lora_weights.safetensors", "after lora", "before ckpt",
               "mid ckpt.pt", "after ckpt", "round 1"]


def test_lpo_kill_anywhere_then_resume_is_bitwise(tmp_path):
    """Issue 11: SIGKILL at every write boundary of a 2-round run (checkpoint at its last round, so
    the final LoRA and checkpoint writes are the ones cut), then --resume: the final LoRA file and
    the checkpoint's LoRA equal an unbroken run's bitwise, and so do the logged rounds."""
    common = [*LPO_TINY_RUN, "--max-rounds", "2", "--ckpt-every", "100"]
    run_lpo(*common, "--out", str(tmp_path / "whole"))
    want = (tmp_path / "whole" / "pytorch_lora_weights.safetensors").read_bytes()
    want_ckpt = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    want_rows = [(r["round"], r["step"], r["tuples"], r["loss"]) for r in read_log(tmp_path / "whole") if "round" in r]
    same = 0
    for i, point in enumerate(LPO_KILL_POINTS):
        out = tmp_path / f"k{i}"
        assert lpo_run_killed([*common, "--out", str(out)], point) == -9, point   # it died where told
        run_lpo(*common, "--out", str(out), "--resume")
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        rows = [(r["round"], r["step"], r["tuples"], r["loss"]) for r in read_log(out) if "round" in r]
        assert (out / "pytorch_lora_weights.safetensors").read_bytes() == want, point
        assert torch.equal(ckpt["lora"], want_ckpt["lora"]) and ckpt["step"] == want_ckpt["step"], point
        assert rows == want_rows, point
        same += 1
    print(f"\nkill-anywhere resume: {same}/{len(LPO_KILL_POINTS)} bitwise equal")


# bad inputs of lpo.py, for the catalogue at the end of this file: each fails in one line before any
# heavy loading; "{tmp}" is a fresh empty folder, "{run}" an existing run folder
def lpo_make_bad_files():
    folder = tempfile.mkdtemp(prefix="lpo-bad-", dir=SCRATCH)
    with open(os.path.join(folder, "blank.txt"), "w") as blank:
        blank.write("\n  \n\n")
    pd.DataFrame(dict(words=["a red circle"])).to_parquet(os.path.join(folder, "nocaption.parquet"))
    os.makedirs(os.path.join(folder, "damaged"))
    with open(os.path.join(folder, "damaged", "ckpt.pt"), "wb") as damaged:
        damaged.write(b"PK\x03\x04 cut short")
    # pipelines (configs only) whose scheduler lpo.py refuses before reading a weight
    for name, change in (("short_schedule", dict(num_train_timesteps=100)),
                         ("v_prediction", dict(prediction_type="v_prediction"))):
        for part in ("unet", "vae"):
            os.makedirs(os.path.join(folder, name, part))
            shutil.copy(os.path.join(ROOT, "tiny", "sd15", part, "config.json"), os.path.join(folder, name, part))
        os.makedirs(os.path.join(folder, name, "scheduler"))
        config = json.load(open(os.path.join(ROOT, "tiny", "sd15", "scheduler", "scheduler_config.json")))
        json.dump(dict(config, **change), open(os.path.join(folder, name, "scheduler", "scheduler_config.json"), "w"))
    # LRM folders that cannot be read: a truncated state_dict.pt, no unet/
    shutil.copytree(os.path.join(ROOT, "tiny", "lrm"), os.path.join(folder, "lrm_truncated"))
    heads = os.path.join(folder, "lrm_truncated", "state_dict.pt")
    data = open(heads, "rb").read()
    open(heads, "wb").write(data[:len(data) // 2])
    os.makedirs(os.path.join(folder, "lrm_no_unet"))
    for name in ("lrm_config.json", "state_dict.pt"):
        shutil.copy(os.path.join(ROOT, "tiny", "lrm", name), os.path.join(folder, "lrm_no_unet"))
    return folder


LPO_BAD = lpo_make_bad_files()
BAD_INPUTS = globals().get("BAD_INPUTS", [])
BAD_INPUTS += [
    ("lpo", ["--out", "{tmp}/o", "--resolution", "33"], "resolution"),
    ("lpo", ["--out", "{tmp}/o", "--resolution", "-32"], "resolution"),
    ("lpo", ["--out", "{tmp}/o", "--lrm", "{tmp}/missing"], "lrm"),
    ("lpo", ["--out", "{tmp}/o", "--model", "{tmp}/no_pipeline"], "base"),
    ("lpo", ["--out", "{tmp}/o", "--num_children", "1"], "num_children"),
    ("lpo", ["--out", "{tmp}/o", "--th_min", "0.5", "--th_max", "0.2"], "th_min"),
    ("lpo", ["--out", "{tmp}/o", "--th_max", "1"], "th_max"),
    ("lpo", ["--out", "{tmp}/o", "--lrm_t", "middle"], "lrm_t"),
    ("lpo", ["--out", "{tmp}/o", "--num_inference_steps", "0"], "num_inference_steps"),
    ("lpo", ["--out", "{tmp}/o", "--lr", "nan"], "lr"),
    ("lpo", ["--out", "{tmp}/o", "--prompts", os.path.join(LPO_BAD, "blank.txt")], "prompts"),
    ("lpo", ["--out", "{tmp}/o", "--prompts", os.path.join(LPO_BAD, "nocaption.parquet")], "caption"),
    ("lpo", ["--out", "{tmp}/o", "--prompts", "{tmp}/none.parquet"], "prompts"),
    ("lpo", ["--out", "{run}"], "resume"),
    ("lpo", ["--out", os.path.join(LPO_BAD, "damaged"), "--resume"], "damaged"),
    # the sampler and the loss: LPO needs the stochastic sampler, a clip band, a positive beta
    ("lpo", ["--out", "{tmp}/o", "--eta", "0"], "eta"),
    ("lpo", ["--out", "{tmp}/o", "--eta", "1.5"], "eta"),
    ("lpo", ["--out", "{tmp}/o", "--clip_eps", "0"], "clip_eps"),
    ("lpo", ["--out", "{tmp}/o", "--clip_eps", "1"], "clip_eps"),
    ("lpo", ["--out", "{tmp}/o", "--beta", "0"], "beta"),
    ("lpo", ["--out", "{tmp}/o", "--beta", "nan"], "beta"),
    ("lpo", ["--out", "{tmp}/o", "--guidance_scale", "nan"], "guidance_scale"),  # not the NaN guard
    ("lpo", ["--out", "{tmp}/o", "--seed", "-1"], "seed"),
    ("lpo", ["--out", "{tmp}/o", "--model", "tiny-sd3", "--resolution", "256"], "position embedding"),
    ("sample", ["--model", "tiny-sd3", "--resolution", "256", "--out", "{tmp}"], "position embedding"),
    ("lpo", ["--out", "{tmp}/o", "--num_inference_steps", "1001"], "num_inference_steps"),
    ("lpo", ["--out", "{tmp}/o", "--model", os.path.join(LPO_BAD, "short_schedule"), "--num_inference_steps", "200"],
     "timesteps"),
    ("lpo", ["--out", "{tmp}/o", "--model", os.path.join(LPO_BAD, "v_prediction")], "epsilon"),
    # the tiny world's judge on a real model's images: refused, eval.py named
    ("lpo", ["--out", "{tmp}/o", "--model", "sd15", "--eval_samples", "10"], "eval.py"),
    # unreadable LRM folders: one line, not a traceback
    ("lpo", ["--out", "{tmp}/o", "--lrm", os.path.join(LPO_BAD, "lrm_truncated")], "readable"),
    ("lpo", ["--out", "{tmp}/o", "--lrm", os.path.join(LPO_BAD, "lrm_no_unet")], "readable"),
    # a refused --resume of a run folder (a damaged checkpoint) changes nothing in it
    ("lpo", ["--out", "{run}", "--resume"], "damaged"),
]


# ----------------------------------------------------------------------------- lpo.py: caption-only reads, write failures, refused resumes, accumulation, presets
def test_lpo_datasets_stream_only_their_caption_column(tmp_path, monkeypatch):
    """A hub or folder dataset is opened with columns=["caption"]: the parquet builder (Pick-a-Pic
    v1's, ~190 GB with its images) reads that column alone; a builder without `columns` (json)
    still gives its captions; a dataset without captions is one line."""
    from datasets.packaged_modules.parquet import parquet as parquet_module
    asked = []
    generate_tables = parquet_module.Parquet._generate_tables

    def spy(self, *args, **kwargs):
        asked.append(self.config.columns)
        yield from generate_tables(self, *args, **kwargs)
    monkeypatch.setattr(parquet_module.Parquet, "_generate_tables", spy)
    os.makedirs(tmp_path / "pairs")
    pd.DataFrame(dict(caption=["a red circle", "a blue square", "a red circle"], jpg_0=[b"\xff" * 4096] * 3)).to_parquet(
        tmp_path / "pairs" / "train.parquet")
    assert lpo.load_prompts(str(tmp_path / "pairs"), "train", 5, seed=0) == ["a red circle", "a blue square"]
    assert asked and all(columns == ["caption"] for columns in asked), asked
    os.makedirs(tmp_path / "lines")
    (tmp_path / "lines" / "train.jsonl").write_text('{"caption": "a", "n": 1}\n{"caption": "b", "n": 2}\n')
    assert lpo.load_prompts(str(tmp_path / "lines"), "train", 5, seed=0) == ["a", "b"]
    os.makedirs(tmp_path / "nocap")
    pd.DataFrame(dict(words=["a red circle"])).to_parquet(tmp_path / "nocap" / "train.parquet")
    with pytest.raises(SystemExit, match="no `caption` column"):
        lpo.load_prompts(str(tmp_path / "nocap"), "train", 5, seed=0)


def test_lpo_write_failures_are_one_line(tmp_path, fresh_lrm, monkeypatch):
    """A full disk while writing the log, the LoRA, the checkpoint or the merged U-Net: one line
    naming the file and the system's reason, no traceback."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    common = [*LPO_TINY_RUN, "--lrm", fresh_lrm["sd"], "--th-min", "0", "--th-max", "0", "--max-rounds", "1"]
    import runs
    writes = [(runs, "append_row", "log.jsonl"), (models, "write_safetensors", "pytorch_lora_weights.safetensors"),
              (runs, "atomic_torch_save", "ckpt.pt"), (UNet2DConditionModel, "save_pretrained", "unet")]
    for owner, name, file in writes:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, full)
            message = lpo_error(*common, "--out", str(tmp_path / name), "--save-merged")
        want = f"cannot write {tmp_path / name / file} (No space left on device)"
        assert want in message and "--resume" in message, message


def test_lpo_refused_resume_changes_nothing_and_checks_the_prompts_text(tmp_path, fresh_lrm, capsys):
    """A refused --resume leaves the run folder byte for byte as it was (a stray *.tmp included);
    the checkpoint holds a sha1 of the prompt list, and a resume whose prompt file now says
    something else is refused; fewer distinct captions than --num_prompts are warned about."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na red circle\na green triangle\n")
    out = tmp_path / "run"
    common = [*LPO_TINY_RUN, "--lrm", fresh_lrm["sd"], "--out", str(out), "--prompts", str(prompts),
              "--unique-prompts", "--th-min", "0", "--th-max", "0", "--max-rounds", "1"]
    run_lpo(*common)
    warning = capsys.readouterr().err
    assert "--num_prompts 8 but" in warning and "has only 3 distinct captions" in warning, warning
    assert len(torch.load(out / "ckpt.pt", weights_only=False)["prompts_sha1"]) == 40
    (out / "stray.tmp").write_bytes(b"left by a kill")
    before = lpo_folder_digest(out)
    assert "seed 0 -> 1" in lpo_error(*common, "--resume", "--seed", "1")
    assert lpo_folder_digest(out) == before
    prompts.write_text("a red circle\na blue square\na red circle\na yellow star\n")   # same --prompts string
    assert "other prompts" in lpo_error(*common, "--resume")
    assert lpo_folder_digest(out) == before
    prompts.write_text("a red circle\na blue square\na red circle\na green triangle\n")
    assert run_lpo(*common, "--resume")["step"] >= 1
    assert not os.path.exists(out / "stray.tmp")   # an accepted resume drops what kills left


def test_lpo_grad_accum_weights_each_forward_by_its_pairs(monkeypatch):
    """An update's gradient is that of the mean loss over its pairs, whatever way its pairs were
    split into forwards: grad_accum 2 and 3, the last update short, equals one big batch of each
    update's pairs."""
    weight = torch.nn.Parameter(torch.zeros(3))

    def logprobs(unet, minibatch, cond, schedule, cfg):
        zeros = torch.zeros(len(minibatch["t"]))
        return [minibatch["x_w"] @ weight, minibatch["x_l"] @ weight, zeros, zeros]
    grads = []

    def record(params, optimizer, loss, world, max_norm=1.0):
        grads.append(params[0].grad.clone())
        params[0].grad = None
        return 0.0
    monkeypatch.setattr(lpo, "pair_logprobs", logprobs)
    monkeypatch.setattr(lpo, "encode_for_cfg", lambda pipe, captions, resolution: None)
    monkeypatch.setattr(lpo, "apply_update", record)
    generator = torch.Generator().manual_seed(0)
    for accum, count in ((2, 5), (2, 7), (3, 9), (3, 11)):   # the last update: 1 or 2 forwards
        cfg = lpo.Config(train_batch_size=2, grad_accum=accum, beta=1.0, clip_eps=0.5)
        mine = dict(x_w=torch.randn(count, 3, generator=generator), x_l=torch.randn(count, 3, generator=generator),
                    t=torch.zeros(count), prompt_ids=torch.zeros(count, dtype=torch.long))
        grads.clear()
        optimizer = torch.optim.SGD([weight], lr=0.0)   # carries the parameters; `record` steps nothing
        sums = lpo.train_on_pairs(None, None, optimizer, mine, ["a red circle"], None, cfg, 1)
        assert sums["updates"] == len(grads) == 2 and sums["pairs"] == count
        for got, rows in zip(grads, (slice(0, 2 * accum), slice(2 * accum, count))):
            zeros = torch.zeros(len(mine["t"][rows]))
            loss, _ = lpo.lpo_loss(mine["x_w"][rows] @ weight, mine["x_l"][rows] @ weight, zeros, zeros, 1.0, 0.5)
            want, = torch.autograd.grad(loss, weight)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_lpo_preset_of_a_folder_reads_its_unet_and_docs(tmp_path):
    """A pipeline folder takes the SDXL preset when its U-Net has SDXL's added conditions
    (addition_embed_type text_time), whatever its name; a hub id that cannot be read offline
    goes by its name. The docstring's resume command is the torchrun one (the world size is
    checked); the log's timings and memory are rank 0's."""
    for name, family in (("plain", "sdxl"), ("xl-lookalike", "sd15")):
        os.makedirs(tmp_path / name / "unet")
        shutil.copy(os.path.join(ROOT, "tiny", family, "unet", "config.json"), tmp_path / name / "unet")
    plain = lpo.get_config(["--model", str(tmp_path / "plain")])
    assert (plain.th_min, plain.lora_rank, plain.base) == (0.45, 64, str(tmp_path / "plain"))
    assert lpo.get_config(["--model", str(tmp_path / "xl-lookalike")]).lora_rank == 4
    assert lpo.get_config(["--model", "someone/sdxl-finetune"]).lora_rank == 64
    assert lpo.get_config(["--model", "someone/sd-finetune"]).lora_rank == 4
    assert "torchrun --nproc_per_node=4 lpo.py --model sd15 --resume" in lpo.__doc__
    assert "sec_* and peak_mem_mb are rank 0's own" in lpo.__doc__


# ============================================================================ sample.py and eval.py
N_PROMPTS, SEEDS = 3, 2   # 6 paired images: enough to exercise every path, cheap to sample


# ----------------------------------------------------------------------------- fixtures


def eval_argv(out, lrm_dir, tiny_clip, *extra):
    clip, mlp = tiny_clip
    return ["--model", "tiny", "--num-prompts", str(N_PROMPTS), "--seeds-per-prompt", str(SEEDS), "--out", out,
            "--lrm", lrm_dir, "--scorers", "judge,lrm,pickscore,clip,aesthetic", "--pickscore", clip,
            "--pickscore-processor", clip, "--clip", clip, "--aesthetic-clip", clip, "--aesthetic-mlp", mlp, *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- math
def test_win_rate_hand_made_cases():
    assert ev.win_rate([1, 2, 3], [1, 2, 3]) == (0.5, 0.5, 0.5)          # all ties
    assert ev.win_rate([2, 3, 4], [1, 2, 3]) == (1.0, 1.0, 1.0)          # all wins
    assert ev.win_rate([0, 1, 2], [1, 2, 3]) == (0.0, 0.0, 0.0)          # all losses
    rate, low, high = ev.win_rate([2, 0, 5, 3], [1, 1, 5, 2])           # win, loss, tie, win
    assert rate == pytest.approx(2.5 / 4) and low <= rate <= high
    with pytest.raises(ValueError):
        ev.win_rate([1, 2], [1, 2, 3])                                  # never silently truncated


def test_win_rate_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    n, p = 400, 0.7
    wins = rng.random(n) < p
    tuned, base = np.where(wins, 1.0, 0.0), np.full(n, 0.5)
    rate, low, high = ev.win_rate(tuned, base, n_boot=20_000, seed=1)
    half = 1.96 * np.sqrt(rate * (1 - rate) / n)                         # binomial oracle
    assert rate == wins.mean() and low < rate < high
    assert low == pytest.approx(rate - half, abs=0.01) and high == pytest.approx(rate + half, abs=0.01)
    # 40 prompts x 10 seeds where all seeds of a prompt agree: resampling prompts must widen the
    # interval ~sqrt(10)x; treating the 400 images as independent would claim false precision
    groups = np.repeat(np.arange(40), 10)
    by_prompt = np.repeat(rng.random(40) < p, 10)
    r1, l1, h1 = ev.win_rate(by_prompt * 1.0, base, seed=1)
    r2, l2, h2 = ev.win_rate(by_prompt * 1.0, base, seed=1, groups=groups)
    assert r1 == r2 and (h2 - l2) > 2.5 * (h1 - l1) and l2 <= r2 <= h2
    # one prompt, many seeds: the seeds are the only resampling unit left (not a zero-width interval)
    assert ev.win_rate(tuned, base, seed=1, groups=[7] * n) == (rate, low, high)


def _binomial_quantile(n, p, q):
    """The smallest k with P(Binomial(n, p) <= k) >= q, summed exactly (math.comb)."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_win_rate_interval_is_the_exact_binomial_quantiles():
    """Wins 0 / 1 over n independent pairs: the bootstrap distribution of the mean is Binomial(n, rate) / n,
    so a 95% percentile interval must sit on its exact 2.5% and 97.5% quantiles (within one step 1 / n);
    a 90% interval is ~3 steps inside (n = 400). Both implementations: eval.py's and the tiny world's."""
    from tiny.world import bootstrap_win_rate
    rng = np.random.default_rng(0)
    n = 400
    wins = rng.random(n) < 0.7
    tuned, base = np.where(wins, 1.0, 0.0), np.full(n, 0.5)
    rate = wins.mean()
    want_low = _binomial_quantile(n, rate, 0.025) / n
    want_high = _binomial_quantile(n, rate, 0.975) / n
    for fn in (ev.win_rate, bootstrap_win_rate):
        got_rate, low, high = fn(tuned, base, n_boot=20_000, seed=1)
        assert got_rate == rate
        assert abs(low - want_low) <= 1 / n and abs(high - want_high) <= 1 / n, (fn.__module__, low, high, want_low, want_high)



def test_win_rate_refuses_empty_input_and_resamples_two_prompts():
    with pytest.raises(ValueError):
        ev.win_rate([], [])
    tuned = np.r_[np.ones(20), np.zeros(20)]   # prompt 0 always wins, prompt 1 always loses
    rate, low, high = ev.win_rate(tuned, np.full(40, 0.5), seed=0, groups=[0] * 20 + [1] * 20)
    assert rate == 0.5 and low == 0.0 and high == 1.0   # two prompts: resampling them gives 0, 0.5 or 1

def test_non_finite_scores_are_refused_or_left_out_and_counted():
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="finite"):
        ev.win_rate([1.0, float("nan")], [0.0, 0.0])        # NaN > x is False: it would count as a loss
    rows = [{"prompt": p, "s/base": 0.0, "s/tuned": t} for p, t in [("a", 1.0), ("b", float("nan")), ("c", -1.0), ("d", 2.0)]]
    got = ev.summarise(rows, SimpleNamespace(n_boot=200, seed=0))["s"]
    assert (got["n"], got["nonfinite"], got["win_rate"], got["tuned"]) == (3, 1, 2 / 3, pytest.approx(2 / 3))


def test_prompt_sources_give_unique_prompts_in_order(tmp):
    (tmp / "p.txt").write_text("a red circle\n\na blue square\na red circle\n")
    (tmp / "p.json").write_text('["a red circle", "a blue square", "a red circle"]')
    (tmp / "parti.tsv").write_text("Prompt\tCategory\na red circle\tA\na blue square\tB\na red circle\tA\n")
    for name in ("p.txt", "p.json", "parti.tsv"):
        assert sample.load_prompts(str(tmp / name)) == ["a red circle", "a blue square"]
    from datasets import load_dataset
    caps = load_dataset("tiny/pickapic", split="test_unique")["caption"]
    assert sample.load_prompts("tiny/pickapic", "test_unique", 3) == list(dict.fromkeys(caps))[:3]


def test_one_reader_keeps_each_stages_prompts_and_splits(tmp):
    """data.py serves every stage: sample.py keeps a prompt as written (its folders record it), lpo.py
    strips it; a table file is one split, mpcf.py's whatever --split, refused for lrm.py's three."""
    (tmp / "spaces.tsv").write_text("Prompt\n a red circle \na red circle\n")
    assert sample.load_prompts(str(tmp / "spaces.tsv")) == [" a red circle ", "a red circle"]
    assert lpo.load_prompts(str(tmp / "spaces.tsv"), "train", 5, strip=True) == ["a red circle"]
    one = os.path.join(ROOT, "tiny", "pickapic", "data", "validation_unique-00000-of-00001.parquet")
    assert len(data.open_pairs(one, "test_unique")) == len(pd.read_parquet(one))
    with pytest.raises(ValueError, match="no readable split 'train': it holds one"):
        data.load_pairs(one, "train")


def test_lpo_prompts_are_distinct_captions_except_in_the_tiny_preset(tmp):
    (tmp / "p.txt").write_text("a red circle\n\na blue square\na red circle\na green square\n")
    assert lpo.load_prompts(str(tmp / "p.txt"), "train", 2) == ["a red circle", "a blue square"]
    assert lpo.load_prompts(str(tmp / "p.txt"), "train", 3, unique=False) == ["a red circle", "a blue square", "a red circle"]
    assert lpo.get_config(["--model", "sd15"]).unique_prompts and not lpo.get_config(["--model", "tiny"]).unique_prompts
    from datasets import load_dataset   # the tiny world has 15 captions: its preset reads rows
    assert lpo.load_prompts("tiny/pickapic", "train", 320, unique=False) == load_dataset("tiny/pickapic", split="train")["caption"][:320]
    assert len(lpo.load_prompts("tiny/pickapic", "train", 320)) == 15


def test_hub_check_knows_dataset_repos(monkeypatch):
    """The default --prompts is a hub *dataset* (yuvalkirstain/pickapic_v1): asked as a model repo it
    is not found, which used to stop sample.py / eval.py before anything ran."""
    def fake_download(repo, repo_type="model", **kw):   # a hub holding that one dataset and nothing else
        if (repo, repo_type) != ("yuvalkirstain/pickapic_v1", "dataset"):
            raise FileNotFoundError(f"{repo_type} {repo}")
        return "/cache/pickapic_v1"
    monkeypatch.setattr(sample.huggingface_hub, "snapshot_download", fake_download)
    assert sample.findable("yuvalkirstain/pickapic_v1") and not sample.findable("nobody/nothing")


# ----------------------------------------------------------------------------- scorers
def test_clip_scorers_match_transformers_forward(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor
    path, mlp_path = tiny_clip
    cfg = ev.Config(pickscore=path, pickscore_processor=path, clip=path, aesthetic_clip=path, aesthetic_mlp=mlp_path)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red circle", "a blue square", "a green green triangle"]
    got = {n: ev.load_scorer(n, cfg, cpu, torch.float32)(images, prompts)[n] for n in ("pickscore", "clip", "aesthetic")}
    # oracle: the model's own full forward (logits_per_image = exp(logit_scale) * cos) ...
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=images, padding=True, return_tensors="pt"))
    logits = out.logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(got["pickscore"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["clip"], logits / model.logit_scale.exp().item(), rtol=1e-5, atol=1e-6)
    # ... and the aesthetic MLP by hand: 5 affine maps, no activations, on the unit image embedding
    x = out.image_embeds.numpy().astype(np.float64)
    sd = torch.load(mlp_path)
    for k in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{k}.weight"].numpy().T + sd[f"layers.{k}.bias"].numpy()
    np.testing.assert_allclose(got["aesthetic"], x[:, 0], rtol=1e-4, atol=1e-5)


def test_missing_scorer_weights_name_the_path(tiny_clip):
    cfg = ev.Config(pickscore="/nonexistent/PickScore_v1", aesthetic_clip=tiny_clip[0],
                        aesthetic_mlp="/nonexistent/sac+logos+ava1-l14-linearMSE.pth")
    for name, path in (("pickscore", cfg.pickscore), ("aesthetic", cfg.aesthetic_mlp)):
        with pytest.raises(SystemExit, match="scorer " + name + ".*" + path.replace("+", r"\+")):
            ev.load_scorer(name, cfg, torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------- sample -> eval
def test_round_trip_pairs_images_and_reports_every_scorer(round_trip, lrm_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    base, tuned = os.path.join(round_trip, "base"), os.path.join(round_trip, "tuned")
    rows = [json.loads(line) for line in open(os.path.join(base, "metadata.jsonl"))]
    assert [r["index"] for r in rows] == list(range(N_PROMPTS * SEEDS))
    assert [r["seed"] for r in rows] == [1_000_000 + i for i in range(N_PROMPTS * SEEDS)]
    assert len({r["prompt"] for r in rows}) == N_PROMPTS
    # seed per index, DDIM 20 steps, CFG 5: base image 3 re-made alone by plain diffusers
    pipe = StableDiffusionPipeline.from_pretrained("tiny/sd15", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    r = rows[3]
    ref = pipe(r["prompt"], generator=torch.Generator().manual_seed(r["seed"]), num_inference_steps=20,
               guidance_scale=5.0, eta=0.0, height=32, width=32).images[0]
    assert np.abs(pixels(os.path.join(base, r["file_name"])) - np.asarray(ref, dtype=np.int16)).max() <= 2
    diff = [np.abs(pixels(os.path.join(base, r["file_name"])) - pixels(os.path.join(tuned, r["file_name"]))).mean()
            for r in rows]
    assert min(diff) > 0.5   # the LoRA was applied to the tuned model
    report = json.load(open(os.path.join(round_trip, "eval.json")))
    assert report["n"] == N_PROMPTS * SEEDS and report["settings"]["guidance_scale"] == 5.0
    assert set(report["scores"]) == {"judge:human", "judge:match", "judge:aesthetic", "judge:clip", "judge:vqa",
                                     "lrm", "pickscore", "clip", "aesthetic"}
    scores = [json.loads(line) for line in open(os.path.join(round_trip, "scores.jsonl"))]
    assert len(scores) == N_PROMPTS * SEEDS
    for m, s in report["scores"].items():
        t, b = np.array([x[m + "/tuned"] for x in scores]), np.array([x[m + "/base"] for x in scores])
        assert s["tuned"] == pytest.approx(t.mean()) and s["base"] == pytest.approx(b.mean())
        assert s["win_rate"] == pytest.approx(((t > b) + 0.5 * (t == b)).mean())
        assert s["ci_low"] <= s["win_rate"] <= s["ci_high"]
    # the judge's numbers are the world's judge on the saved PNGs
    imgs = [Image.open(os.path.join(tuned, r["file_name"])) for r in rows]
    np.testing.assert_allclose([x["judge:human/tuned"] for x in scores], judge_scores(imgs, [r["prompt"] for r in rows])["human"])
    # the LRM column: the clean latent (diffusers' own VAE preprocessing) scored at t = 1
    from lrm_model import LatentRewardModel
    lrm = LatentRewardModel.from_pretrained(lrm_dir, base="tiny/sd15").eval()
    with torch.no_grad():
        lat = pipe.vae.encode(pipe.image_processor.preprocess(imgs)).latent_dist.mean * pipe.vae.config.scaling_factor
        want = lrm.score(lat, 1, prompts=[r["prompt"] for r in rows]).numpy()
    np.testing.assert_allclose([x["lrm/tuned"] for x in scores], want, rtol=1e-4, atol=1e-4)
    md = open(os.path.join(round_trip, "eval.md")).read()
    assert "| judge:human |" in md and "win-rate" in md
    assert Image.open(os.path.join(round_trip, "eval_grid.png")).size[0] > 2 * 96   # base | tuned, enlarged


def test_eval_of_folders_control_and_refusals(round_trip, lrm_dir, tiny_clip, tmp):
    base, tuned = os.path.join(round_trip, "base"), os.path.join(round_trip, "tuned")

    def cfg(*extra):
        return ev.get_config(eval_argv(str(tmp / "ctl"), lrm_dir, tiny_clip, *extra))
    # control: base against itself is a tie on every image under every scorer
    ev.main(cfg("--base-dir", base, "--tuned-dir", base, "--scorers", "judge,lrm", "--n-boot", "200"))
    for s in json.load(open(tmp / "ctl" / "eval.json"))["scores"].values():
        assert (s["win_rate"], s["ci_low"], s["ci_high"], s["ties"]) == (0.5, 0.5, 0.5, 1.0)
    # an image set with one pair missing is refused, not truncated
    short = str(tmp / "short")
    shutil.copytree(tuned, short)
    lines = open(os.path.join(short, "metadata.jsonl")).readlines()
    open(os.path.join(short, "metadata.jsonl"), "w").writelines(lines[:-1])
    with pytest.raises(SystemExit, match="mismatched image sets"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", short, "--scorers", "judge"))
    # a tuned set sampled with another CFG is refused
    shutil.rmtree(short)
    shutil.copytree(tuned, short)
    info = json.load(open(os.path.join(short, "sampling.json")))
    json.dump(dict(info, guidance_scale=7.5), open(os.path.join(short, "sampling.json"), "w"))
    with pytest.raises(SystemExit, match="guidance_scale = 5.0 vs 7.5"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", short, "--scorers", "judge"))
    with pytest.raises(SystemExit, match="unknown.*nope"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", base, "--scorers", "judge,nope"))
    with pytest.raises(SystemExit, match="--lora /nonexistent/lora"):
        sample.main(sample.get_config(["--model", "tiny", "--lora", "/nonexistent/lora"]))


def test_eval_orientation_on_known_better_images(tmp):
    """Tuned = centred pictures of the caption, base = pictures of another caption: the judge
    must call it ~1.0 for tuned, and ~0.0 with the folders swapped (no side mix-up)."""
    colors, rows = list(COLORS), []
    for name, right in (("good", True), ("bad", False)):
        d = tmp / name
        d.mkdir()
        for i in range(12):
            c, s = colors[i % 5], SHAPES[i % 3]
            cap = f"a {c} {s}"
            img = draw(c, s, 18, 16, 16) if right else draw(colors[(i + 2) % 5], SHAPES[(i + 1) % 3], 18, 16, 16)
            img.save(d / sample.file_name(i, 7 + i))
            rows.append(dict(file_name=sample.file_name(i, 7 + i), prompt=cap, seed=7 + i, index=i))
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))
        (d / "sampling.json").write_text(json.dumps(dict(scheduler="DDIMScheduler", num_inference_steps=20,
                                                         guidance_scale=5.0, eta=0.0, resolution=32)))
    for tuned, base, want in (("good", "bad", 1.0), ("bad", "good", 0.0)):
        out = tmp / f"orient-{tuned}"
        ev.main(ev.get_config(["--model", "tiny", "--scorers", "judge", "--out", str(out),
                               "--base-dir", str(tmp / base), "--tuned-dir", str(tmp / tuned)]))
        s = json.load(open(out / "eval.json"))["scores"]["judge:human"]
        assert s["win_rate"] == want and s["n"] == 12


def test_two_process_sharded_sampling_and_scoring_each_index_once(round_trip, lora_dir, tmp):
    """torchrun eval.py, 2 ranks (gloo): sample.py's sharded sampling of both models, then sharded
    scoring gathered on rank 0; everything must match the 1-process round trip."""
    out = str(tmp / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py",
           "--model", "tiny", "--lora", lora_dir, "--scorers", "judge", "--num-prompts", str(N_PROMPTS),
           "--seeds-per-prompt", str(SEEDS), "--batch-size", "2", "--eval-batch-size", "2", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    n = N_PROMPTS * SEEDS
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][:2]
    for log, side in zip(logs, ("base", "tuned")):   # both ranks worked, no index twice
        assert log["folder"] == side and log["per_rank"] == [n // 2, n // 2] and log["generated"] == n
        folder = os.path.join(out, side)
        names = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
        assert names == sorted(r["file_name"] for r in rows) and sorted(r["index"] for r in rows) == list(range(n))
        for r in rows:   # same image as the 1-process run: the seed belongs to the index, not the rank
            single = pixels(os.path.join(round_trip, side, r["file_name"]))
            assert np.abs(pixels(os.path.join(folder, r["file_name"])) - single).max() <= 2
    scores = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(round_trip, "scores.jsonl"))]
    assert [s["index"] for s in scores] == list(range(n))   # each pair scored once, by one rank
    np.testing.assert_allclose([s["judge:human/tuned"] for s in scores], [s["judge:human/tuned"] for s in ref], atol=0.05)


def test_resume_generates_only_missing_images(round_trip, tmp):
    out = str(tmp / "resume")
    shutil.copytree(os.path.join(round_trip, "base"), os.path.join(out, "base"))
    shutil.copy(os.path.join(round_trip, "run.json"), out)   # the folder of a (killed) sample.py run
    gone = sorted(f for f in os.listdir(os.path.join(out, "base")) if f.endswith(".png"))[1::3]
    before = {f: pixels(os.path.join(out, "base", f)) for f in gone}
    for f in gone:
        os.remove(os.path.join(out, "base", f))
    argv = ["--model", "tiny", "--num-prompts", str(N_PROMPTS), "--seeds-per-prompt", str(SEEDS), "--out", out]
    sample.main(sample.get_config(argv + ["--resume"]))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["generated"] == len(gone) and log[-1]["images"] == N_PROMPTS * SEEDS
    for f in gone:
        assert np.abs(pixels(os.path.join(out, "base", f)) - before[f]).max() <= 2
    with pytest.raises(SystemExit, match="--resume"):   # other settings: refuse to mix images
        sample.main(sample.get_config(argv + ["--resume", "--guidance_scale", "7.5"]))


# ----------------------------------------------------------------------------- sample.py / eval.py: refusals, kill and resume, VAE memory
def test_eval_refuses_a_folder_that_is_not_a_lora_before_sampling(tmp):
    """It used to sample all the base images first, then die in a traceback."""
    from safetensors.torch import save_file
    not_lora = tmp / "not-a-lora"
    not_lora.mkdir()
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora / "model.safetensors"))
    damaged = tmp / "damaged-lora"
    damaged.mkdir()
    (damaged / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    for folder, words in ((not_lora, "no LoRA"), (damaged, "damaged"), (tmp / "empty-lora", "no LoRA")):
        folder.mkdir(exist_ok=True)
        out = tmp / f"never-{folder.name}"
        with pytest.raises(SystemExit, match=f"eval.py: error: --lora .*{words}"):
            ev.main(ev.get_config(["--model", "tiny", "--lora", str(folder), "--scorers", "judge", "--out", str(out)]))
        assert not out.exists()


def test_sample_kill_anywhere_then_resume_gives_the_same_images(lora_dir, tmp):
    """SIGKILL at write boundaries of sample.py (mid PNG, mid grid: the last write); --resume ends
    with the same files, byte for byte, as an uninterrupted run, and no orphan .tmp file."""
    argv = ["--model", "tiny", "--lora", lora_dir, "--num_prompts", "1", "--seeds_per_prompt", "2",
            "--batch_size", "1"]
    ref = str(tmp / "kill-ref")
    sample.main(sample.get_config(argv + ["--out", ref]))

    def files(folder):
        found = {}
        for dirpath, _, names in os.walk(folder):
            for name in names:
                if name != "log.jsonl":
                    found[os.path.relpath(os.path.join(dirpath, name), folder)] = open(os.path.join(dirpath, name), "rb").read()
        return found
    want = files(ref)
    assert len([n for n in want if n.endswith(".png")]) == 2 * 2 + 1
    for k, point in enumerate(("mid base/00001_1000001.png", "mid kill-1/grid.png")):
        out = str(tmp / f"kill-{k}")
        env = dict(os.environ, OMP_NUM_THREADS="1", LPO_KILL_AT=point)
        run = subprocess.run([sys.executable, "sample.py", *argv, "--out", out], capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == -9, (point, run.returncode, run.stderr[-2000:])
        assert [name for name in files(out) if name.endswith(".tmp")], point   # the kill left one behind
        sample.main(sample.get_config(argv + ["--out", out, "--resume"]))
        assert files(out) == want, point
        for dirpath, _, names in os.walk(out):
            for name in names:
                assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o644, name


def test_vae_sees_one_image_at_a_time(lrm_dir, tmp):
    """VAE memory bounded independently of the batch: sample.py decodes, eval.py's LRM column
    encodes, one image per VAE pass whatever --batch_size (an fp32 SDXL image needs GBs)."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    seen = []

    def record(module, args):
        seen.append((type(module).__name__, args[0].shape[0]))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: record(module, args) if isinstance(module, (Encoder, Decoder)) else None)
    try:
        sample.main(sample.get_config(["--model", "tiny", "--num_prompts", "2", "--seeds_per_prompt", "2",
                                       "--batch_size", "4", "--out", str(tmp / "vae-batch")]))
        cfg = ev.get_config(["--model", "tiny", "--lora", "x", "--lrm", lrm_dir])
        images = [Image.open(tmp / "vae-batch" / "base" / sample.file_name(i, 1_000_000 + i)) for i in range(4)]
        ev.load_scorer("lrm", cfg, torch.device("cpu"), torch.float32)(images, ["a red circle"] * 4)
    finally:
        handle.remove()
    assert {name for name, _ in seen} == {"Encoder", "Decoder"}
    assert max(size for _, size in seen) == 1, seen


def test_eval_refuses_pairs_sampled_with_other_settings(tmp_path, capsys):
    """A base at CFG 7.5 and a tuned at CFG 5.0 (the peers' evaluation bug) must be refused; so must
    another VAE. (sampling.json's pre-release names steps / guidance are no longer read.)"""
    def folder(name, settings):
        path = tmp_path / name
        path.mkdir()
        Image.new("RGB", (8, 8)).save(path / "00000_1.png")
        row = dict(file_name="00000_1.png", prompt="a red circle", seed=1, index=0)
        (path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        if settings is not None:
            (path / "sampling.json").write_text(json.dumps(settings))
        return str(path)
    current = dict(scheduler="DDIMScheduler", num_inference_steps=20, guidance_scale=5.0, eta=0.0,
                   resolution=32)
    with pytest.raises(SystemExit, match="guidance_scale = 7.5 vs 5.0"):
        ev.check_paired(folder("a", dict(current, guidance_scale=7.5)), folder("b", current))
    with pytest.raises(SystemExit, match="vae = None vs my-vae"):
        ev.check_paired(folder("c", current), folder("d", dict(current, vae="my-vae")))
    rows, settings = ev.check_paired(folder("e", current), folder("f", current))
    assert len(rows) == 1 and settings["guidance_scale"] == 5.0
    ev.check_paired(folder("g", None), folder("h", None))  # no record: said, not refused
    assert "not checked" in capsys.readouterr().out


def _sample_bad_files(folder):
    """Files for sample.py's and eval.py's bad-input cases."""
    from safetensors.torch import save_file
    with open(os.path.join(folder, "empty.txt"), "w") as f:
        f.write("\n  \n\n")
    pd.DataFrame({"caption": [1, 2, 3]}).to_parquet(os.path.join(folder, "int_captions.parquet"))
    os.makedirs(os.path.join(folder, "not_a_lora"))
    save_file({"conv.weight": torch.zeros(2)}, os.path.join(folder, "not_a_lora", "model.safetensors"))
    os.makedirs(os.path.join(folder, "lora"))   # fits tiny/sd15 (enough to reach the next refusal)
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"{layer}.lora_A.weight": torch.zeros(8, 32), f"{layer}.lora_B.weight": torch.zeros(32, 8)},
              os.path.join(folder, "lora", "pytorch_lora_weights.safetensors"))
    # a pipeline without its vae/ (the configs are all the checks read)
    os.makedirs(os.path.join(folder, "no_vae", "unet"))
    for name in ("model_index.json", "unet/config.json"):
        shutil.copy(os.path.join(ROOT, "tiny", "sd15", name), os.path.join(folder, "no_vae", name))
    os.makedirs(os.path.join(folder, "not_samples"))
    with open(os.path.join(folder, "bad.tsv"), "w") as f:
        f.write("caption\tseed\na red circle\t1\na blue square\t2\textra\n")


_SAMPLE_BAD = _made_once("sample-bad-inputs-v3", _sample_bad_files)
_TINY_LORA = ["--model", "tiny", "--lora", f"{_SAMPLE_BAD}/lora"]
BAD_INPUTS = globals().get("BAD_INPUTS", [])
BAD_INPUTS += [
    ("sample", ["--model", "tiny", "--out", "{run}"], "--resume"),
    ("sample", ["--model", "tiny", "--guidance_scale", "nan", "--out", "{tmp}"], "guidance_scale"),
    ("sample", ["--model", "tiny", "--eta", "2", "--out", "{tmp}"], "eta"),
    ("eval", ["--model", "tiny", "--lora", "x", "--n_boot", "0", "--out", "{tmp}"], "n_boot"),
    ("sample", ["--model", "tiny", "--resolution", "33", "--out", "{tmp}"], "resolution"),
    ("sample", ["--model", "tiny", "--resolution", "-8", "--out", "{tmp}"], "resolution"),
    ("sample", ["--model", "tiny", "--prompts", f"{_SAMPLE_BAD}/empty.txt", "--out", "{tmp}"], "no prompt"),
    ("sample", ["--model", "tiny", "--prompts", f"{_SAMPLE_BAD}/int_captions.parquet", "--out", "{tmp}"], "text"),
    ("sample", ["--model", "tiny", "--prompts", "{pairs}", "--split", "nope", "--out", "{tmp}"], "split"),
    ("sample", ["--model", "tiny", "--lora", f"{_SAMPLE_BAD}/not_a_lora", "--out", "{tmp}"], "lora"),
    ("sample", ["--model", "tiny", "--base", f"{_SAMPLE_BAD}/no_vae", "--out", "{tmp}"], "vae"),
    ("sample", ["--model", "tiny", "--out", "/dev/null/out"], "cannot write"),
    ("sample", ["--model", "tiny", "--lora", "x", "--unet", "y"], "--unet"),
    ("sample", ["--model", "tiny", "--dtype", "fp8"], "dtype"),
    ("sample", ["--model", "tiny", "--prompts", f"{_SAMPLE_BAD}/bad.tsv", "--out", "{tmp}"], "cannot read"),
    ("eval", [*_TINY_LORA, "--out", "{run}"], "--resume"),
    ("eval", ["--model", "tiny", "--lora", f"{_SAMPLE_BAD}/not_a_lora", "--out", "{tmp}"], "lora"),
    ("eval", [*_TINY_LORA, "--resolution", "33", "--out", "{tmp}"], "resolution"),
    ("eval", [*_TINY_LORA, "--lrm", os.path.join(ROOT, "tiny", "lrm-xl"), "--out", "{tmp}"], "lrm"),
    ("eval", [*_TINY_LORA, "--base", f"{_SAMPLE_BAD}/no_vae", "--scorers", "judge", "--out", "{tmp}"], "vae"),
    ("eval", [*_TINY_LORA, "--prompts", f"{_SAMPLE_BAD}/empty.txt", "--out", "{tmp}"], "no prompt"),
    ("eval", [*_TINY_LORA, "--prompts", "{pairs}", "--split", "nope", "--out", "{tmp}"], "split"),
    ("eval", [*_TINY_LORA, "--scorers", "judge,nope"], "unknown"),
    ("eval", ["--model", "tiny", "--base_dir", "{tmp}"], "tuned_dir"),
    ("eval", ["--model", "tiny", "--base_dir", f"{_SAMPLE_BAD}/not_samples", "--tuned_dir",
              f"{_SAMPLE_BAD}/not_samples", "--scorers", "judge", "--out", "{tmp}"], "metadata"),
    ("eval", [*_TINY_LORA, "--scorers", "judge", "--out", "/dev/null/out"], "cannot write"),
]


# ============================================================================ bench.py and memory.py: speed and memory (tiny mode, meta device)
CPU = torch.device("cpu")


def test_full_size_networks_are_the_published_architectures():
    """Parameter counts of the real checkpoints (SD1.5 / SDXL U-Net, SD VAE, CLIP-L, OpenCLIP bigG
    text tower with projection, OpenCLIP ViT-H/14 image tower with projection), built on the meta
    device; MPCF's scorers at their published sizes."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from lrm_model import LatentRewardModel

    def n(module):
        return sum(p.numel() for p in module.parameters())
    sd, xl = bench.load_pipeline("sd15", "meta"), bench.load_pipeline("sdxl", "meta")
    assert n(sd.unet) == 859_520_964 and n(xl.unet) == 2_567_463_684
    assert [n(e) for e in models.text_encoders(sd)] == [123_060_480]
    assert [n(e) for e in models.text_encoders(xl)] == [123_060_480, 694_659_840]
    assert n(sd.vae) == 83_653_863 and n(xl.vae) == 83_653_863
    with torch.device("meta"):
        assert n(CLIPVisionModelWithProjection(CLIPVisionConfig(**bench.VIT_H))) == 632_076_800
        widths = [LatentRewardModel(p.unet, models.text_encoders(p), models.tokenizers(p),
                                    dict(resolution=r, g=7.5)).visual_projection
                  for p, r in ((sd, 512), (xl, 1024))]
    assert [(w.in_features, w.out_features) for w in widths] == [(4800, 768), (3520, 1280)]
    assert sd.vae.config.scaling_factor == 0.18215 and xl.vae.config.scaling_factor == 0.13025
    assert sd.tokenizer.model_max_length == 77 and xl.tokenizer_2.model_max_length == 77
    assert not sd.config.get("force_zeros_for_empty_prompt") and xl.config.force_zeros_for_empty_prompt
    assert bench.default_resolution(sd) == 512 and bench.default_resolution(xl) == 1024
    # the scheduler of the tiny world's folder is SD's own: DDIM on the scaled-linear betas
    assert (sd.scheduler.config.beta_start, sd.scheduler.config.beta_end, sd.scheduler.config.steps_offset) == (0.00085, 0.012, 1)
    aesthetic, head, clip, vqa = memory.mpcf_scorers("meta")
    # openai/clip-vit-large-patch14 image tower; laion CLIP-ViT-H-14 (986M); InstructBLIP-XL (4B)
    assert n(aesthetic) == 303_966_208 and n(head) == 768 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16 + 1024 + 128 + 64 + 16 + 1
    assert 0.98e9 < n(clip) < 0.99e9
    assert 3.9e9 < n(vqa) < 4.2e9


def test_cfg_condition_matches_diffusers_pipelines(tiny):
    """[uncond; cond] as StableDiffusion(XL)Pipeline.encode_prompt builds it (SDXL: zeros, real
    time_ids): lpo.encode_for_cfg, which the bench uses, on the bench's pipelines."""
    prompts = ["a red circle", "a blue square"]
    stage = tiny["tiny"][0]
    c, u = stage.pipe.encode_prompt(prompts, CPU, 1, True)
    got = models.encode_for_cfg(stage.pipe, prompts, 32)
    torch.testing.assert_close(got["encoder_hidden_states"], torch.cat([u, c]))
    stage = tiny["tiny-xl"][0]
    c, u, pc, pu = stage.pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=True)
    got = models.encode_for_cfg(stage.pipe, prompts, 32)
    assert u.abs().sum() == 0 and pu.abs().sum() == 0   # the oracle really is SDXL's zero uncond
    torch.testing.assert_close(got["encoder_hidden_states"], torch.cat([u, c]))
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], torch.cat([pu, pc]))
    assert got["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_schedule_conditioning_and_pixel_reward_match_oracles(tiny, name):
    from diffusers import DDIMScheduler
    """The schedule and CFG conditioning equal lpo.py's own (its pipeline loaded by lpo.py); the
    batched pixel reward equals a per-child oracle: two separate U-Net calls, guidance 5,
    DDIMScheduler.step's pred_original_sample taken by DDIM's deterministic step to the chain's end
    (a_0), VAE decode, image reward. A mix-up of children, prompts or noise levels fails here."""
    stage, b, px = tiny[name]
    settings = stage.settings
    pipe = models.load_pipeline(settings.base, CPU, torch.float32, vae=False)
    want_schedule = lpo.make_schedule(pipe.scheduler.config, 20, settings.th_min, settings.th_max,
                                      CPU, 8)
    for k in ("timesteps", "prev_timesteps", "thresholds", "alphas_cumprod", "sigmas"):
        torch.testing.assert_close(getattr(stage.schedule, k), getattr(want_schedule, k),
                                   check_dtype=False)
    assert stage.schedule.latent_size == stage.latent_size == 8
    torch.testing.assert_close(b["cond"], models.encode_for_cfg(pipe, b["prompts"], 32))

    prompts = [p for p in b["prompts"] for _ in range(settings.num_children)]   # child i: prompt i // K
    kids = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([451, 451, 1, 951])[:len(prompts)]                      # each child its own level
    got = px.score(kids, t, text=px.encode_text(prompts))
    sched = DDIMScheduler.from_config(stage.pipe.scheduler.config)
    sched.set_timesteps(20)
    a0 = sched.alphas_cumprod[0]
    for i, p in enumerate(prompts):
        c = models.encode_for_cfg(stage.pipe, [p], 32)
        halves = [{k: (v.chunk(2)[j] if torch.is_tensor(v) else {a: w.chunk(2)[j] for a, w in v.items()})
                   for k, v in c.items()} for j in (0, 1)]
        with torch.no_grad():
            e_u, e_c = (stage.pipe.unet(kids[i:i + 1], t[i], **h).sample for h in halves)
            eps = e_u + 5.0 * (e_c - e_u)
            x0 = sched.step(eps, int(t[i]), kids[i:i + 1]).pred_original_sample
            end = a0.sqrt() * x0 + (1 - a0).sqrt() * eps                    # DDIM Eq. (12), eta 0, to a_0
            image = px.vae.decode(end / px.vae.config.scaling_factor).sample
            want = px.reward(image)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-4, rtol=1e-4)
    secs = bench.sampling_pass(stage, b, stage.lrm)                          # lpo.sample_tuples, as run
    assert set(secs) == {"sample", "score"} and min(secs.values()) > 0


def test_dpo_loss_hand_values():
    # e_w = 0.1, e_l = 0.3 vs reference 0.2, 0.2, beta 10: -log sigmoid(-5 * (-0.2)) = log(1 + e^-1)
    err = torch.tensor([0.1, 0.3], requires_grad=True)
    loss = bench.diffusion_dpo_loss(err, torch.tensor([0.2, 0.2]), 10.0)
    assert abs(loss.item() - math.log1p(math.exp(-1))) < 1e-6
    loss.backward()
    assert err.grad[0] > 0 > err.grad[1]   # lowering the winner's error (raising the loser's) helps
    same = bench.diffusion_dpo_loss(torch.tensor([0.5, 0.1]), torch.tensor([0.5, 0.1]), 5000.0)
    assert abs(same.item() - math.log(2)) < 1e-6


def test_lpo_update_trains_the_lora_toward_the_winner_and_control(tiny):
    """Repeated bench updates on one pair raise log r_w - log r_l; with winner and loser swapped
    (control) it falls. Only LoRA weights move; the reference (LoRA off) stays the base."""
    stage, b, _ = tiny["tiny"]
    unet = stage.pipe.unet
    p = lpo.PRESETS["tiny"]   # the bench measures lpo.py's own settings, read from lpo.py
    settings = stage.settings
    assert (settings.sample_batch_size, settings.train_batch_size, settings.lr, len(stage.lora)) == \
        (p["sample_batch_size"], p["train_batch_size"], p["lr"],
         2 * 4 * sum(n.endswith(".to_q") for n, _ in unet.named_modules()))
    assert (b["t"].tolist(), b["t_prev"].tolist()) == ([bench.T] * 2, [bench.T - 50] * 2)
    base = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    lora0 = [p.detach().clone() for p in stage.lora]
    acp = stage.schedule.alphas_cumprod

    def step_mean(bb):
        eps = models.guided_prediction(unet, bb["x_t"], bench.T, bb["cond"], 5.0)
        return lpo.ddim_step(eps, bb["x_t"], bench.T, bench.T - 50, acp, 1.0)

    def margin(bb):
        with torch.no_grad():
            mean, std = step_mean(bb)
            unet.disable_adapters()
            ref, _ = step_mean(bb)
            unet.enable_adapters()
        lp = [lpo.step_logprob(x, mu, std).mean().item() for mu in (mean, ref) for x in (bb["x_w"], bb["x_l"])]
        return (lp[0] - lp[2]) - (lp[1] - lp[3])

    # two children of the parent as winner and loser: small log-ratios, inside the clip band
    with torch.no_grad():
        mean, std = step_mean(b)
    noise = torch.randn(2, 2, *b["x_t"].shape[1:], generator=torch.Generator().manual_seed(3))
    kids = mean[:, None] + std[:, None] * noise
    fwd = dict(b, x_w=kids[:, 0], x_l=kids[:, 1])
    rev = dict(b, x_w=kids[:, 1], x_l=kids[:, 0])
    results = []
    for bb in (fwd, rev):
        for p, p0 in zip(stage.lora, lora0):
            p.data.copy_(p0)
        stage.optimizer.state.clear()
        for _ in range(2):
            bench.lpo_update(stage, bb)
        results.append(margin(bb))
    assert results[0] > 0 and results[1] > 0   # each run learned its own labels: swapped labels, swapped preference
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(stage.lora, lora0))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in base.items())


def test_dpo_update_trains_the_whole_unet_not_the_reference(tiny):
    stage, b, _ = tiny["tiny-xl"]
    ref = {k: v.clone() for k, v in stage.pipe.unet.state_dict().items()}
    policy, opt = bench.make_dpo(stage, "tiny-xl")
    assert type(opt).__name__ == "Adafactor" and policy.is_gradient_checkpointing   # DPO's SDXL recipe
    before = [p.detach().clone() for p in policy.parameters()]
    bench.dpo_update(stage, policy, opt, b)
    moved = [not torch.equal(p, p0) for p, p0 in zip(policy.parameters(), before)]
    assert sum(moved) / len(moved) > 0.9       # the full U-Net is trained, not an adapter
    assert all(torch.equal(v, stage.pipe.unet.state_dict()[k]) for k, v in ref.items())
    assert type(bench.make_dpo(tiny["tiny"][0], "tiny")[1]).__name__ == "AdamW"


def test_measure_reports_the_median_after_warmup(monkeypatch, tmp_path):
    """A fake clock that each call of fn advances by its own duration (no wall-clock reading)."""
    from types import SimpleNamespace
    clock = [100.0]
    calls = []
    durations = iter([0.5, 0.02, 0.4, 0.12])   # warm-up, then the timed runs

    def fn():
        calls.append(1)
        s = next(durations)
        clock[0] += s
        return {"part": s / 2}                 # what the phase reports about itself: medians per key
    fake = type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0]), "time": staticmethod(lambda: 7.0)})
    monkeypatch.setattr(bench, "time", fake)
    run = SimpleNamespace(name="m", cfg=SimpleNamespace(warmup=1, repeats=3, out=str(tmp_path)), device=CPU, results={})
    bench.measure(run, "x", fn, per=2)
    r = run.results
    assert len(calls) == 4 and set(r) == {"x_s", "x_part_s", "x_rss_gb"}   # CPU: no CUDA counters
    assert r["x_s"] == pytest.approx(0.06)     # the median per 2; the mean 0.18, or with the warm-up 0.26, fail
    assert r["x_part_s"] == pytest.approx(0.03) and 0.05 < r["x_rss_gb"] < 100
    (row,) = [json.loads(line) for line in open(tmp_path / "bench.jsonl")]
    assert row == dict(r, model="m", phase="x", time=7.0)


def test_bad_input_fails_in_one_line(monkeypatch):
    for argv, words in ((["--model", "sd21"], "--model"), (["--num_children", "1"], "--num_children"),
                        (["--sample_batch_size", "-1"], "--sample_batch_size"),
                        (["--resolution", "100"], "--resolution")):
        with pytest.raises(SystemExit) as e:
            bench.get_config(argv + ["--device", "cpu"])
        message = str(e.value.code)
        assert words in message and message.startswith("bench.py: error:") and "\n" not in message, message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.get_config(["--model", "sdxl"])
    assert "--tiny" in str(e.value.code) and "memory.py" in str(e.value.code)
    assert memory.get_config(["--model", "sdxl"]).model == "sdxl"   # no GPU needed
    with pytest.raises(SystemExit, match="memory.py: error: --model 'tiny'"):
        memory.get_config(["--model", "tiny"])


def test_modes_set_their_presets_and_flags_read_both_spellings():
    smoke = bench.get_config(["--smoke"])
    assert (smoke.model, smoke.device, smoke.resolution, smoke.baselines, smoke.threads) == ("sd15", "cpu", 64, False, 1)
    tiny = bench.get_config(["--tiny", "--no-baselines", "--num-children", "3"])
    assert (tiny.model, tiny.device, tiny.threads, tiny.baselines, tiny.num_children) == ("tiny,tiny-xl,tiny-sd3", "cpu", 1, False, 3)
    assert bench.get_config(["--tiny", "--resume"]).resume and not bench.get_config(["--tiny"]).resume


def test_lrm_step_trains_down_and_mid_with_a_bounded_vae_batch(monkeypatch):
    """lrm_step runs lrm.py's step (lrm.train_step in 2 micro-batches): the LRM's down blocks, mid
    block, text encoder and heads move, the up blocks (never run) do not; the VAE sees at most
    lrm.py's --vae_batch_size images a call (tiny preset: 8)."""
    cfg = bench.get_config(["--tiny"])
    stage = bench.load_lrm_stage("tiny", cfg, CPU)
    assert stage.settings.vae_batch_size == 8 and stage.settings.micro_batch_size == 0   # 0: all
    batch = bench.make_pairs(stage, 6, seed=0)                 # 12 images, 2 micro-batches of 3 pairs
    assert batch["px"].shape == (6, 2, 3, 32, 32) and -1 <= batch["px"].min() < batch["px"].max() <= 1
    sizes = []
    encode = stage.vae.encode
    monkeypatch.setattr(stage.vae, "encode", lambda x: sizes.append(len(x)) or encode(x))
    before = {k: v.clone() for k, v in stage.lrm.state_dict().items()}
    bench.lrm_train_step(stage, batch, 3)
    assert sizes == [6, 6]
    moved = {k for k, v in stage.lrm.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("unet.down_blocks") for k in moved) and any(k.startswith("unet.mid_block") for k in moved)
    assert any(k.startswith("text_encoders") for k in moved) and "visual_projection.weight" in moved
    assert not any(k.startswith("unet.up_blocks") for k in moved)
    matrices, vectors = stage.optimizer.param_groups   # as lrm.main: no decay on 1-D parameters
    preset = L.PRESETS["tiny"]
    assert (matrices["lr"], matrices["weight_decay"], vectors["weight_decay"]) == \
        (preset["lr"], preset["weight_decay"], 0.0)


def test_memory_arithmetic_and_activation_counting_by_hand():
    """memory.row's bytes and marks, and the two activation counters, on cases small enough to
    count by hand."""
    # 1000 bf16 weights + 10 fp32 LoRA weights + 10 trained x 12 B (grad, AdamW m, v) + 500
    assert memory.held([(1000, 2), (10, 4)]) == (1010, 2040)
    row = memory.row("s", "b", 1010, 2040, 120, 500)
    assert (row["parameters"], row["total_gb"], row["train_state_gb"]) == (1010, 2660 / 1e9, 120 / 1e9)
    # lrm.py's trained parameters (10; the largest FSDP2 unit 3) on W ranks: (weights, state) a rank
    assert memory.trained_bytes(10, 3, 1) == (10 * (4 + 2), 10 * 12)   # fp32 + bf16 autocast copy
    assert memory.trained_bytes(10, 3, 1, backward=False) == (10 * 4, 10 * 12)
    assert memory.trained_bytes(10, 3, 2) == (10 * 4 / 2 + 2 * 3 * 2, 10 * 12 / 2 + 3 * 4)
    assert memory.trained_bytes(10, 3, 8, backward=False) == (10 * 4 / 8 + 2 * 3 * 2, 10 * 12 / 8)
    limit = 0.9 * 24 * 2**30
    assert memory.row("s", "b", 0, 0, 0, limit)["marks"] == ["yes", "yes", "yes"]
    assert memory.row("s", "b", 0, 0, 0, limit + 1)["marks"] == ["no", "yes", "yes"]
    assert memory.row("s", "b", 0, 0, limit + 1, 0)["marks"] == ["no", "yes", "yes"]
    assert memory.row("s", "b", 80 * 2**30, 80 * 2**30, 0, 0)["marks"] == ["no", "no", "no"]
    # lrm.py's accumulation: fits when a micro-batch does; 1 GiB fixed, 0.4 (2, 1) GiB a pair, 16 pairs
    gib = 2**30
    assert memory.row("s", "b", 0, 0, 0, 16 * 0.4 * gib, gib, pairs=16)["marks"] == ["yes", "yes", "yes"]
    assert memory.row("s", "b", 0, 0, 0, 16 * 2 * gib, gib, pairs=16)["marks"] == ["micro 8", "yes", "yes"]   # 24 GB: 8 x 2 <= 20.6
    assert memory.row("s", "b", 0, 0, 0, 16 * gib, 30 * gib, pairs=16)["marks"] == ["no", "micro 4", "yes"]
    # linear (weight trained, not counted) saves its (2, 4) input, relu its (2, 3) output: fp32
    layer = torch.nn.Linear(4, 3, bias=False, device="meta")
    x = torch.zeros(2, 4, device="meta")
    assert memory.saved_bytes(lambda: torch.relu(layer(x)), [layer]) == (8 + 6) * 4
    # attention over 64 tokens saves q, k, v and the output, never the 64 x 64 matrix
    q = torch.zeros(1, 2, 64, 8, device="meta", requires_grad=True)
    functional = torch.nn.functional
    attention = memory.saved_bytes(lambda: functional.scaled_dot_product_attention(q, q * 1, q * 2), [])
    assert attention == 4 * 1 * 2 * 64 * 8 * 4 and functional.scaled_dot_product_attention is memory.SDPA
    # inference: the largest input + output of one layer: max(3x4 + 3x8, 3x8 + 3x2) fp32 values
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).to("meta")
    assert memory.working_bytes(lambda: net(torch.zeros(3, 4, device="meta")), [net]) == (12 + 24) * 4


def test_memory_table_counts_the_published_networks(capsys):
    """memory.py's rows: the eval row holds U-Net + VAE + text encoders at 2 bytes, the LRM row
    the LRM (U-Net, CLIP-L, heads) + VAE at 4 bytes; all on the meta device, in seconds."""
    pipe = bench.load_pipeline("sdxl", "meta")
    (row,) = memory.estimate_eval("sdxl", pipe, 1024)
    parameters = 2_567_463_684 + 83_653_863 + 123_060_480 + 694_659_840
    assert row["parameters"] == parameters and row["weights_gb"] == 2 * parameters / 1e9
    text = memory.main(memory.get_config(["--model", "sd15"]))
    assert "computed, not measured" in text.lower() and text in capsys.readouterr().out
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]
    rows = {row[0]: row for row in cells if len(row) == 12 and row[1] == "sd15"}
    unet, vae, clip_l = 859_520_964, 83_653_863, 123_060_480
    assert rows["eval sampling batch"][4] == f"{(unet + vae + clip_l) / 1e9:.3f}B"
    heads = 4800 * 768 + 768 * 768 + 1   # visual and text projections, logit_scale
    up_and_out = 510_808_004   # up blocks, conv_norm_out, conv_out: never run, not held
    assert rows["LRM training step"][4] == f"{(unet - up_and_out + clip_l + heads + vae) / 1e9:.3f}B"
    assert "sharded over 8 ranks (FSDP2)" in text.splitlines()[0]   # --world's default: the paper's 8 GPUs
    assert rows["LRM training step"][3] == "16 pairs" and rows["LPO iteration"][3] == "5x4 / 10"
    assert rows["eval sampling batch"][3] == "8 images" and rows["LRM validation batch"][3] == "32 pairs"
    marks = [mark for row in rows.values() for mark in row[-3:]]
    assert all(mark in ("yes", "no") or mark.startswith("micro ") for mark in marks), marks
    mpcf_row = [row for row in cells if len(row) == 12 and row[0] == "MPCF scoring batch"]
    assert mpcf_row and mpcf_row[0][1:4] == ["any", "224", "32 pairs"]


def test_memory_shards_the_lrm_step_over_world_ranks():
    """lrm.py's step on W ranks (FSDP2), on SD1.5's meta LRM: a rank's share of the trained
    parameters, their gradients and AdamW's moments halves from W = 1 to 2, + the largest unit
    unsharded (2 bf16 copies, 1 fp32 gradient); the up blocks and output convs are not held."""
    unet, vae, clip_l = 859_520_964, 83_653_863, 123_060_480
    heads = 4800 * 768 + 768 * 768 + 1
    pipe = bench.load_pipeline("sd15", "meta")
    unused = [pipe.unet.up_blocks, pipe.unet.conv_norm_out, pipe.unet.conv_out]
    trained = unet - sum(p.numel() for part in unused for p in part.parameters()) + clip_l + heads
    assert trained == 476_049_665
    units = memory.fsdp_units(bench.latent_reward_model(pipe, 512, copy_networks=False))
    # resnets and attentions (8 + 6 down, 2 + 1 mid), 5 blocks, 2 embeddings + conv_in, CLIP-L's 12
    # layers and itself, the 2 heads; logit_scale
    assert len(units) == 17 + 5 + 2 + 13 + 2 + 1 and sum(units) == trained and units[-1] == 1
    blocks = [*pipe.unet.down_blocks, pipe.unet.mid_block]
    parts = [part for block in blocks for part in [*block.resnets, *(getattr(block, "attentions", None) or [])]]
    attention = max(sum(p.numel() for p in part.parameters()) for part in parts)
    layers = sum(p.numel() for p in pipe.text_encoder.encoder.layers.parameters())
    down2 = max(units)   # the largest unit: CLIP-L's own weights (token + position embeddings, LN)
    assert down2 == clip_l - layers == 38_006_016 > attention == 34_760_960
    (step1, valid1), (step2, valid2) = [memory.estimate_lrm("sd15", bench.load_pipeline("sd15", "meta"), 512, world)
                                        for world in (1, 2)]
    assert step1["parameters"] == step2["parameters"] == trained + vae
    assert step1["train_state_gb"] == valid1["train_state_gb"] == 12 * trained / 1e9
    assert step2["train_state_gb"] == (12 * trained / 2 + 4 * down2) / 1e9
    assert valid2["train_state_gb"] == 12 * trained / 2 / 1e9
    assert step1["weights_gb"] == ((4 + 2) * trained + 4 * vae) / 1e9   # + bf16 autocast copies
    assert valid1["weights_gb"] == (4 * trained + 4 * vae) / 1e9
    assert step2["weights_gb"] == valid2["weights_gb"] == (4 * trained / 2 + 2 * 2 * down2 + 4 * vae) / 1e9
    assert step1["activations_gb"] == step2["activations_gb"] > 0


def test_tiny_run_writes_table_json_log_and_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "bench")
    argv = ["--model", "tiny-xl", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", out,
            "--sample_batch_size", "2", "--train_batch_size", "3"]
    res = bench.main(bench.get_config(argv))   # the SDXL-shaped path; tiny and tiny-sd3: elsewhere
    printed = capsys.readouterr().out
    assert "| ratio_step |" in printed and "| phase | tiny-xl |" in printed and "| resolution | 32 |" in printed
    data = json.load(open(os.path.join(out, "bench.json")))
    assert set(data["results"]) == {"tiny-xl"} and data["table"] in printed
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["settings"]["num_children"] == 4
    assert env["device"] == "CPU"
    phases = ("lpo_iteration", "lpo_step", "lpo_update", "pixel_step", "dpo_update", "lrm_step")
    for name, r in data["results"].items():
        for k in phases + ("lpo_step_sample", "lpo_step_score", "pixel_step_sample", "pixel_step_score"):
            assert r[k + "_s"] > 0 and k + "_peak_gb" not in r and k + "_reserved_gb" not in r, (name, k)   # CUDA only
        for k in phases:
            assert 0.05 < r[k + "_rss_gb"] < 100, k   # a CPU's memory: the process's peak RSS
        # lpo.py's own split of a step adds up to (a little less than) the whole step
        assert 0 < (r["lpo_step_sample_s"] + r["lpo_step_score_s"]) / r["lpo_step_s"] <= 1.0   # parts of the step
        assert 0 < (r["pixel_step_sample_s"] + r["pixel_step_score_s"]) / r["pixel_step_s"] <= 1.0
        assert r["ratio_step"] == pytest.approx(r["pixel_step_s"] / r["lpo_step_s"])
        assert r["ratio_dpo"] == pytest.approx(r["dpo_update_s"] / r["lpo_update_s"])
        assert r["lrm_pairs"] == r["lrm_micro_batch"] == 4
    rows = [json.loads(line) for line in open(os.path.join(out, "bench.jsonl"))]
    assert len(rows) == len(phases) and {r["phase"] for r in rows} == set(phases)
    # --resume measures nothing already in bench.json
    monkeypatch.setattr(bench, "bench_lpo", lambda *a: pytest.fail("re-measured a model"))
    again = bench.main(bench.get_config(argv + ["--resume"]))
    assert again == res
    with pytest.raises(SystemExit, match="other settings"):   # never one table of two configurations
        bench.main(bench.get_config(argv + ["--num_children", "3", "--resume"]))
    before = open(os.path.join(out, "bench.json")).read()
    with pytest.raises(SystemExit, match="--resume"):          # nor a silent overwrite
        bench.main(bench.get_config(argv))
    assert open(os.path.join(out, "bench.json")).read() == before


BAD_INPUTS = globals().get("BAD_INPUTS", [])
BAD_INPUTS += [
    ("bench", ["--model", "sd21"], "model"),
    ("bench", ["--model", "sd15,"], "model"),
    ("bench", ["--num_children", "1"], "num_children"),
    ("bench", ["--resolution", "100"], "resolution"),
    ("bench", ["--resolution", "-64"], "resolution"),
    ("bench", ["--sample_batch_size", "-1"], "sample_batch_size"),
    ("bench", ["--lrm_batch_size", "-2"], "lrm_batch_size"),
    ("bench", ["--repeats", "0"], "repeats"),
    ("bench", ["--tiny", "--warmup", "-1"], "warmup"),
    ("tools.memory", ["--model", "sd21"], "model"),
    ("tools.memory", ["--model", "tiny"], "model"),
    ("tools.memory", ["--world", "0"], "world"),
]


# ============================================================================ style and bad inputs (all stages)
# ----------------------------------------------------------------------------- the shared seams (issue 19)
# a run folder belongs to one stage's run: under --resume, a folder of another stage ({other}: an
# lrm.py run) or of none ({run}: files but no run.json) is refused before anything is read or written
BAD_INPUTS += [
    ("lpo", ["--out", "{other}", "--resume"], "lrm.py run"),
    ("mpcf", ["--out", "{other}", "--resume"], "lrm.py run"),
    ("mpcf", ["--out", "{run}", "--resume"], "no run of this project"),
    ("lrm", ["--out", "{run}", "--resume"], "damaged"),  # its ckpt.pt is read first, as lpo.py's
    ("sample", ["--model", "tiny", "--out", "{other}", "--resume"], "lrm.py run"),
    ("eval", ["--model", "tiny", "--unet", os.path.join(ROOT, "tiny", "sd15"), "--scorers", "judge", "--out", "{run}",
              "--resume"], "no run of this project"),
    ("bench", ["--tiny", "--out", "{other}", "--resume"], "lrm.py run"),
]


def seam_bad_data():
    """Pick-a-Pic folders (train / validation_unique / test_unique) each wrong one way, for the one
    rule every stage judges data by: NaN labels, blank captions, no rows, no decodable image."""
    folder = tempfile.mkdtemp(prefix="seam-bad-", dir=SCRATCH)
    good = data.open_split("tiny/pickapic", "validation_unique").to_pandas().head(40)
    broken = good.assign(jpg_0=[b"not a jpeg"] * 40, jpg_1=[b"nor this"] * 40)
    tables = dict(nan_labels=good.assign(label_0=[np.nan] * 20 + [np.inf] * 20,
                                              label_1=[np.nan] * 20 + [0.0] * 20), blank_captions=good.assign(caption="  "),
                  no_rows=good.head(0), undecodable=broken)
    for name, table in tables.items():
        os.makedirs(os.path.join(folder, name))
        for split in ("train", "validation_unique", "test_unique"):
            table.to_parquet(os.path.join(folder, name, f"{split}.parquet"))
    # LoRAs: an SD1.5 one (lpo.py's format) that fits tiny/sd15 only, and one with a NaN; run folders
    # whose checkpoint holds a NaN (a hand-edited or foreign file: the runs stop before saving one)
    from safetensors.torch import save_file
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    lora = {f"{layer}.lora.down.weight": torch.zeros(8, 32), f"{layer}.lora.up.weight": torch.zeros(32, 8)}
    for name, weights in (("sd15_lora", lora), ("nan_lora", dict(lora, **{f"{layer}.lora.up.weight": torch.full((32, 8), math.nan)}))):
        os.makedirs(os.path.join(folder, name))
        save_file(weights, os.path.join(folder, name, "pytorch_lora_weights.safetensors"))
    for name, file, state in (("nan_lpo_run", "ckpt.pt", {"lora": torch.tensor([1.0, math.nan]), "step": 1}),
                              ("nan_lrm_run", "ckpt.pt", {"lora": torch.tensor([math.inf]), "step": 1})):
        os.makedirs(os.path.join(folder, name))
        torch.save(state, os.path.join(folder, name, file))
    return folder


SEAM_BAD = seam_bad_data()
BAD_INPUTS += [   # data judged by one rule in every stage, in one line with the counts
    ("lrm", ["--data", os.path.join(SEAM_BAD, "nan_labels"), "--out", "{tmp}"], "40 without labels or with non-finite ones"),
    ("lrm", ["--data", os.path.join(SEAM_BAD, "blank_captions"), "--out", "{tmp}"], "40 with a blank caption"),
    ("lrm", ["--data", os.path.join(SEAM_BAD, "no_rows"), "--out", "{tmp}"], "has no rows"),
    ("mpcf", ["--data", os.path.join(SEAM_BAD, "nan_labels"), "--out", "{tmp}"], "no usable pair"),
    ("mpcf", ["--data", os.path.join(SEAM_BAD, "no_rows", "train.parquet"), "--out", "{tmp}"], "has no rows"),
    ("mpcf", ["--data", os.path.join(SEAM_BAD, "blank_captions"), "--out", "{tmp}"], "blank caption"),
    # an artifact that does not fit is refused, not ignored: a LoRA of another family, non-finite tensors
    ("sample", ["--model", "tiny-sd3", "--lora", os.path.join(SEAM_BAD, "sd15_lora"), "--out", "{tmp}"], "does not fit"),
    ("sample", ["--model", "tiny-xl", "--lora", os.path.join(SEAM_BAD, "sd15_lora"), "--out", "{tmp}"], "does not fit"),
    ("eval", ["--model", "tiny-sd3", "--lora", os.path.join(SEAM_BAD, "sd15_lora"), "--scorers", "judge", "--out",
              "{tmp}"], "does not fit"),
    ("sample", ["--model", "tiny", "--lora", os.path.join(SEAM_BAD, "nan_lora"), "--out", "{tmp}"], "non-finite"),
    ("lpo", ["--out", os.path.join(SEAM_BAD, "nan_lpo_run"), "--resume"], "non-finite"),
    ("lrm", ["--out", os.path.join(SEAM_BAD, "nan_lrm_run"), "--resume"], "non-finite"),
]


def test_undecodable_images_stop_every_stage_by_one_rule(tmp_path):
    """Pairs whose images cannot be decoded: mpcf.py scores them (they count), then stops in one
    line with the counts, as lrm.py does past 1% (data.check_decodable)."""
    with pytest.raises(SystemExit, match=r"40 of 40 pairs had an undecodable image \(more than 1%\)"):
        main(get_config(["--model", "tiny", "--data", os.path.join(SEAM_BAD, "undecodable"), "--out",
                         str(tmp_path / "m")]))
    gaps = pd.read_csv(tmp_path / "m" / "gaps.csv")   # what was scored is kept
    assert (gaps["status"] == "unreadable").sum() == 40


def test_a_lora_that_loads_nothing_is_refused_after_loading_too(tmp_path, monkeypatch):
    """Formats models.check_lora cannot read ahead (a hub LoRA, another layout) are judged as they
    load: a LoRA that gave the denoiser no adapter would make "tuned" images the base's."""
    monkeypatch.setattr(sample, "check_lora", lambda path, base: None)   # as for a hub id
    argv = ["--model", "tiny-sd3", "--lora", os.path.join(SEAM_BAD, "sd15_lora"), "--num_prompts", "1",
            "--seeds_per_prompt", "1", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match="none of its weights went to .*tiny/sd3's denoiser"):
        sample.main(sample.get_config(argv))


def test_every_write_is_guarded_full_disk_is_one_line(tmp_path, monkeypatch):
    """A full disk while mpcf.py appends its scores or sample.py saves a PNG: one line naming the
    file and --resume (the one guard, runs.write_or_fail), no traceback."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(SystemExit, match=r"cannot write .*gaps.part0.csv \(No space left on device\).*--resume"):
            main(get_config(["--model", "tiny", "--out", str(tmp_path / "m")]))
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", full)
        with pytest.raises(SystemExit, match=r"cannot write .*00000_1000000.png \(No space left on device\)"):
            sample.main(sample.get_config(["--model", "tiny", "--num_prompts", "1", "--seeds_per_prompt", "1",
                                           "--out", str(tmp_path / "s")]))


def test_a_folder_that_cannot_be_locked_still_runs(tmp_path, monkeypatch, capsys):
    """A file system without locks (some NFS or Lustre mounts): the run goes on, marked, with one
    warning that a second run would not be refused."""
    import fcntl

    def no_locks(*args):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    runs.prepare_run_folder(str(tmp_path / "r"), resume=False)
    runs.release_run_folders()
    assert json.load(open(tmp_path / "r" / "run.json"))["stage"] and "cannot be locked (No locks available)" in \
        capsys.readouterr().err


def test_no_network_is_said_in_seconds(tmp_path):
    """A hub id with the hub unreachable (HF_HUB_OFFLINE unset): one warning that the hub does not
    answer, then the refusal, in seconds; not a minute of retries (48 s before) ending in blame
    for a missing config.json alone."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"   # nothing listens there: refused at once
    start = time.time()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "lpo.py"), "--model", "someone/some-sd15", "--out",
                          str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and lines[-1].startswith("lpo.py: error:"), run.stderr[-2000:]
    assert "the hub http://127.0.0.1:9 is unreachable" in run.stderr and "Retrying" not in run.stderr, run.stderr
    assert time.time() - start < 40


def test_only_hub_ids_make_the_hub_probe(monkeypatch, capsys):
    """Outputs, local paths, tiny/ and runs/ never probe the hub (a tiny run offline says nothing);
    a hub id among the inputs does, once, and then the process is offline."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    runs.offline_unless_hub_answers(dict(out="runs/lpo-new", save_dataset="x/y", data="tiny/pickapic",
                                         lrm="runs/lrm-sd15", model="tiny", base=ROOT))
    assert hub.HF_HUB_OFFLINE is False and "unreachable" not in capsys.readouterr().err
    runs.offline_unless_hub_answers(dict(prompts="yuvalkirstain/pickapic_v1"))
    assert hub.HF_HUB_OFFLINE is True and "the hub http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_long_captions_are_cut_once_and_said_once(tmp_path, capsys):
    """A 240 kB caption is cut to data.MAX_CAPTION characters as it is read, with one warning for
    all of them (not a warning per text-encoder call, nor minutes of tokenising)."""
    path = tmp_path / "long.txt"
    path.write_text("a red circle " * 20_000 + "\n" + "a blue square " * 20_000 + "\na green triangle\n")
    prompts = data.load_prompts(str(path), "train", 3, strip=True)
    assert [len(prompt) for prompt in prompts] == [data.MAX_CAPTION, data.MAX_CAPTION, 16]
    assert prompts[0] == ("a red circle " * 200)[:data.MAX_CAPTION]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 captions longer than 2000 characters" in warnings[0], warnings


def test_a_json_list_of_plain_strings_is_prompts_for_every_stage(tmp_path):
    """lpo.py --prompts list.json (plain strings, as HPDv2's benchmark prompts) reads as sample.py does."""
    path = tmp_path / "list.json"
    path.write_text(json.dumps(["a red circle", "a blue square", "a red circle"]))
    assert lpo.load_prompts(str(path), "train", 5, seed=0, strip=True) == ["a red circle", "a blue square"]
    assert sample.load_prompts(str(path), "validation_unique") == ["a red circle", "a blue square"]


def _spawn(script, *argv, **env):
    """A stage run as a command (its own process, signals and all)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_folder_is_locked_for_its_run_and_freed_by_a_kill(tmp_path):
    """A second run into a folder a run is writing is refused in one line; the lock of a killed
    run goes with its process, so --resume then continues it."""
    out = tmp_path / "m"
    first = _spawn("mpcf.py", "--model", "tiny", "--out", out, LPO_KILL_AT="scored batch 1", LPO_KILL_SIGNAL="SIGSTOP")
    for _ in range(600):   # until it stops (frozen, holding the lock) after its first scored batch
        if os.path.exists(out / "gaps.part0.csv") and open(f"/proc/{first.pid}/stat").read().split()[2] == "T":
            break
        time.sleep(0.1)
    assert json.load(open(out / "run.json")) == {"stage": "mpcf.py"}
    with pytest.raises(SystemExit, match="is in use: another run writes there now"):
        main(get_config(["--model", "tiny", "--out", str(out), "--resume"]))
    with pytest.raises(SystemExit, match="already holds a run"):
        main(get_config(["--model", "tiny", "--out", str(out)]))
    first.kill()
    first.communicate()
    counts = main(get_config(["--model", "tiny", "--out", str(out), "--resume"]))
    assert counts["win_lose_kept"] == 877 and counts["ties_kept"] == 39


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_ends_in_one_line_that_says_how_to_continue(tmp_path, name, code):
    """SIGTERM (what schedulers send) and Ctrl-C: one line naming the run folder and the exact
    command that continues it, no traceback, exit 143 / 130; that command then finishes the run."""
    out = tmp_path / "m"
    run = _spawn("mpcf.py", "--model", "tiny", "--out", out, LPO_KILL_AT="scored batch 2", LPO_KILL_SIGNAL=name)
    _, err = run.communicate(timeout=300)
    assert run.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"mpcf.py: stopped by {name}: {out} keeps"), err[-2000:]
    command = last.split("continue with: ")[1].split()
    assert command[0] == "python" and command[-1] == "--resume", command
    again = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "kept 877 / 1495 win-lose pairs" in again.stdout, again.stderr[-2000:]


def test_a_full_disk_while_publishing_best_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError: still one line naming the
    folder and --resume, not a traceback (the guard of every write knows it)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(safetensors.torch, "save", full)
    argv = _run_args(tmp_path / "l", "--max_train_steps", 1, "--train_batch_size", 8, "--eval_max_pairs", 2,
                     "--eval_timesteps", "1")
    with pytest.raises(SystemExit) as exit_info:
        L.main(L.get_config(argv))
    message = str(exit_info.value.code)
    assert message.startswith("lrm.py: error: cannot write") and "No space left" in message, message
    assert "best" in message and "--resume" in message and "\n" not in message, message


# (kept last: every stage's section above appends its cases to BAD_INPUTS)
STAGES = ["lrm.py", "mpcf.py", "lpo.py", "sample.py", "eval.py", "bench.py"]


def test_style_ruff_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


@pytest.mark.parametrize("path", STAGES + ["lrm_model.py", "runs.py", "distributed.py", "models.py", "data.py",
                                  "tools/memory.py"])
def test_stage_files_read_like_the_anchors(path):
    """DiT train.py: 7.9 AST nodes per code line; ours at most 10, one statement a line."""
    import ast
    source = open(os.path.join(ROOT, path)).read()
    code_lines = [line for line in source.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    tree = ast.parse(source)
    nodes_per_line = sum(1 for _ in ast.walk(tree)) / len(code_lines)
    assert nodes_per_line <= 10.0, f"{path}: {nodes_per_line:.1f} AST nodes per code line"
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr):  # a bare expression statement: a call, not `a(), b()`
            assert not isinstance(node.value, (ast.Tuple, ast.IfExp)), (path, node.lineno)
    assert "SPEC.md" not in source and "TINY_WORLD_NOTES" not in source, path


# size budgets of the root files (issue 18): a stage holds its method, what is shared lives once;
# every other root file: 450 lines; the whole (all root .py but the tests): 4,600 lines and 34,000
# AST nodes, so that size cannot grow silently
LINE_BUDGETS = {"lpo.py": 700, "lrm.py": 650, "bench.py": 500}
TOTAL_LINES, TOTAL_NODES = 4600, 34000


def test_root_files_keep_their_size_budgets():
    import ast
    import glob
    total_lines = total_nodes = 0
    # tools/memory.py (the computed memory table) is held to a file's budget, not in the total
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))) + [os.path.join(ROOT, "tools", "memory.py")]:
        name = os.path.basename(path)
        if name == "test_all.py":
            continue
        source = open(path).read()
        tree = ast.parse(source)
        lines = len(source.splitlines())
        if name != "memory.py":
            total_lines += lines
            total_nodes += sum(1 for _ in ast.walk(tree))
        assert lines <= LINE_BUDGETS.get(name, 450), f"{name}: {lines} lines"
        docstring = ast.get_docstring(tree, clean=False) or ""
        assert len(docstring.splitlines()) <= 40, f"{name}: module docstring over 40 lines"
    assert total_lines <= TOTAL_LINES and total_nodes <= TOTAL_NODES, (total_lines, total_nodes)


def test_what_every_run_needs_is_written_once():
    """runs.py holds the run machinery; no stage defines a function of the same name again."""
    import ast
    shared = {node.name for name in ("runs.py", "distributed.py")
              for node in ast.parse(open(os.path.join(ROOT, name)).read()).body if isinstance(node, ast.FunctionDef)}
    assert {"fail", "setup_distributed", "prepare_run_folder", "write_or_fail", "truncate_log"} <= shared
    for path in STAGES + ["lrm_model.py"]:
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        again = shared & {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert not again, f"{path} defines {sorted(again)} again: import them from runs.py"


@pytest.mark.parametrize("module_name", ["lrm", "mpcf", "lpo", "sample", "eval", "bench", "tools.memory"])
def test_help_describes_every_option(module_name, capsys):
    import dataclasses
    import importlib
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exit_info:
        module.get_config(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(module.Config):
        option = f"--{field.name}"
        assert option in text, (module_name, option)
        described = text.split(option, 1)[1].split("(default:", 1)[0]
        # the option's metavar, then at least a few words of description
        assert len(described.split()) >= 2, (module_name, option, described)


def _tree_hash(folder):
    import hashlib
    digest = hashlib.sha256()
    for dirpath, _, filenames in sorted(os.walk(folder)):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, folder).encode())
            digest.update(open(path, "rb").read())
            digest.update(oct(os.stat(path).st_mode).encode())
    return digest.hexdigest()


BAD_INPUTS = globals().get("BAD_INPUTS", [])


def _count_weight_loads(monkeypatch):
    """Record every from_pretrained of a diffusers / transformers model or pipeline (a list, filled in place)."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel
    loaded = []
    for owner in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        original = owner.from_pretrained.__func__

        def recording(cls, *args, _original=original, **kwargs):
            loaded.append(f"{cls.__name__}({args[0] if args else ''})")
            return _original(cls, *args, **kwargs)
        monkeypatch.setattr(owner, "from_pretrained", classmethod(recording))
    return loaded


@pytest.mark.parametrize("module_name,argv,word", BAD_INPUTS,
                         ids=[f"{m}:{' '.join(a)[:40]}" for m, a, _ in BAD_INPUTS])
def test_bad_input_catalogue(module_name, argv, word, tmp_path, monkeypatch):
    """Each bad input ends in one line `<script>: error: ...` naming it, before any other weight is read, no traceback,
    and an existing run folder ({run}) is left byte for byte as it was."""
    import importlib
    module = importlib.import_module(module_name)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (run / "ckpt.pt").write_bytes(b"not touched")
    other = tmp_path / "other"   # an lrm.py run's folder
    other.mkdir()
    (other / "run.json").write_text('{"stage": "lrm.py"}\n')
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    places = {"{tmp}": str(tmp_path / "fresh"), "{run}": str(run), "{other}": str(other),
              "{pairs}": os.path.join(ROOT, "tiny", "pickapic")}
    for name in ("{tmp}",):
        os.makedirs(places[name], exist_ok=True)
    filled = []
    for arg in argv:
        for key, value in places.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    before = _tree_hash(run)
    loaded = _count_weight_loads(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.get_config(filled))
    message = str(exit_info.value.code)
    assert message.startswith(f"{module_name.split('.')[-1]}.py: error:"), message
    assert "\n" not in message.strip() and word.lower() in message.lower(), message
    # what may be read is the bad artifact itself (a truncated LRM is found by reading it), no other weight
    others = [entry for entry in loaded if not any(arg in entry for arg in filled if os.sep in arg)]
    assert others == [], f"a bad input must fail before any other weight is read: {others}"
    assert _tree_hash(run) == before, "a refused run changed an existing run folder"


def test_bad_input_catalogue_is_large_and_covers_every_stage():
    stages = {module_name for module_name, _, _ in BAD_INPUTS}
    assert len(BAD_INPUTS) >= 35, len(BAD_INPUTS)
    assert stages >= {"lrm", "mpcf", "lpo", "sample", "eval"}, stages


# ============================================================================ SD3: the tiny world (tiny/sd3)
SD3 = os.path.join(ROOT, "tiny", "sd3")


T5_LEN = 16  # min(256, tokenizer_3.model_max_length): the T5 length every stage uses


@pytest.fixture(scope="module")
def sd3():
    pipe = DiffusionPipeline.from_pretrained(SD3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sd3_loads_as_sd3_pipeline_and_generates(sd3):
    assert isinstance(sd3, StableDiffusion3Pipeline)
    cfg = sd3.transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.joint_attention_dim == sd3.text_encoder_3.config.d_model
    assert cfg.caption_projection_dim == inner
    proj = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    assert cfg.pooled_projection_dim == proj
    assert sd3.transformer.dtype == torch.float32  # stored fp16, loaded fp32
    world = json.load(open(os.path.join(ROOT, "tiny", "world.json")))
    assert sd3.scheduler.config.shift == world["sd3_scheduler_shift"]
    gen = torch.Generator().manual_seed(0)
    out = sd3(
        ["a red circle", "a blue square"],
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=gen,
        max_sequence_length=T5_LEN,
        output_type="np",
    ).images
    assert out.shape == (2, RES, RES, 3) and np.isfinite(out).all()
    assert out.std() > 0.01  # not a blank picture


def test_t5_tokenizer_makes_each_caption_word_one_token():
    path = os.path.join(SD3, "tokenizer_3")
    for tok in (T5TokenizerFast.from_pretrained(path), AutoTokenizer.from_pretrained(path)):
        assert tok.model_max_length == T5_LEN
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # as T5
        for caption in CAPTIONS:
            pieces = tok.convert_ids_to_tokens(tok(caption).input_ids)
            assert pieces == ["\u2581" + w for w in caption.split()] + ["</s>"]
        assert tok("").input_ids == [tok.eos_token_id]  # the CFG uncond: </s> alone
        padded = tok("a red", padding="max_length", max_length=T5_LEN).input_ids
        assert padded[3:] == [0] * (T5_LEN - 3)
        assert tok.decode(tok("a red circle").input_ids, skip_special_tokens=True) == "a red circle"
        assert tok.unk_token_id not in tok("a dog").input_ids  # unknown words fall back to letters


def test_pipeline_prompt_encoding_has_the_designed_shapes(sd3):
    emb, neg, pooled, neg_pooled = sd3.encode_prompt(
        CAPTIONS[:2], None, None, max_sequence_length=T5_LEN
    )
    assert emb.shape == (2, 2 * T5_LEN, 64) and pooled.shape == (2, 64)  # CLIP 16 + T5 16 tokens
    ids = sd3.tokenizer_3([""], padding="max_length", max_length=T5_LEN, return_tensors="pt")
    t5_empty = sd3.text_encoder_3(ids.input_ids)[0]  # the empty prompt, encoded as the pipeline
    torch.testing.assert_close(neg[:, T5_LEN:], t5_empty.expand(2, -1, -1))


def test_vae_is_the_sd15_vae_with_measured_shift_and_scale():
    vae = AutoencoderKL.from_pretrained(os.path.join(SD3, "vae"))
    sd15 = AutoencoderKL.from_pretrained(os.path.join(ROOT, "tiny", "sd15", "vae"))
    for (name, p), q in zip(vae.state_dict().items(), sd15.state_dict().values()):
        assert torch.equal(p, q), name
    rng = np.random.default_rng(123)  # fresh drawings, not the training ones
    x = images_to_tensor([random_drawing(rng)[0] for _ in range(512)])  # (512, 3, 32, 32)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean.double()  # (512, 4, 8, 8)
    assert abs(z.mean().item() - vae.config.shift_factor) < 0.02
    assert abs(z.std().item() * vae.config.scaling_factor - 1) < 0.03
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor  # SD3's normalisation
    assert abs(latents.mean().item()) < 0.03 and abs(latents.std().item() - 1) < 0.03


def test_make_world_sd3_only_quick_build(tmp_path):
    os.makedirs(tmp_path / "sd15")
    shutil.copytree(os.path.join(ROOT, "tiny", "sd15", "vae"), tmp_path / "sd15" / "vae")
    json.dump({"kept": 1}, open(tmp_path / "world.json", "w"))
    make_world.main(make_world.get_args(["--sd3-only", "--quick", "--out", str(tmp_path)]))
    info = json.load(open(tmp_path / "world.json"))
    assert info["kept"] == 1 and info["sd3_steps"] == 10  # earlier keys kept
    assert set(os.listdir(tmp_path)) == {"sd15", "sd3", "world.json"}  # nothing else rebuilt
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "sd3"))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.vae.config.shift_factor == info["sd3_vae_shift_factor"]
    # the quick build's caption match, recomputed on the saved folder (fp16 on disk)
    pipe.set_progress_bar_config(disable=True)
    match = make_world.caption_match(pipe, n=30, cfg=info["sd3_guidance_scale"])
    assert round(match, 4) == info["sd3_caption_match"]


# ============================================================================ SD3: the LRM over MMDiT (lrm_model.py, lrm.py)
SD3_PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def sd3_lrm():
    """An untrained LRM over tiny/sd3, its heads and first blocks moved off their init."""
    torch.manual_seed(0)
    lrm = M.LatentRewardModel.from_base("tiny-sd3")
    with torch.no_grad():
        lrm.logit_scale.fill_(3.0)
        for p in lrm.transformer.transformer_blocks[:lrm.blocks].parameters():
            p.add_(0.01 * torch.randn_like(p))
    return lrm.eval()


def _sd3_inputs(n=3, seed=0):
    """Latents (n, 4, 8, 8) and SD3 timesteps (sigma x 1000, floats) from low to pure noise."""
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([8.928571701049805, 520.0741577148438, 1000.0])[:n]
    return x, t


# ----------------------------------------------------------------------------- features, encoding
@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_mmdit_features_are_the_transformers_forward_up_to_block_n(sd3_lrm, blocks):
    """Oracle: the stock SD3Transformer2DModel.forward, observed by a hook on block N-1 (block 4 of
    4 is the last, context_pre_only one)."""
    model = sd3_lrm.transformer
    x, t = _sd3_inputs()
    text = models.encode_prompt(list(sd3_lrm.text_encoders), sd3_lrm.tokenizers, SD3_PROMPTS, 32)
    seen = []
    hook = model.transformer_blocks[blocks - 1].register_forward_hook(
        lambda module, args, output: seen.append(output[1]))
    with torch.no_grad():
        model(x, encoder_hidden_states=text["encoder_hidden_states"], timestep=t,
              pooled_projections=text["pooled_projections"])
        ours = M.mmdit_features(model, x, t, text["encoder_hidden_states"],
                                text["pooled_projections"], blocks)
    hook.remove()
    assert ours.shape == (3, 64)
    torch.testing.assert_close(ours, seen[0].mean(1), rtol=1e-5, atol=1e-6)
    # gradient checkpointing (lrm.py --grad_ckpt) recomputes the same features
    model.enable_gradient_checkpointing()
    again = M.mmdit_features(model, x, t, text["encoder_hidden_states"],
                             text["pooled_projections"], blocks)
    model.disable_gradient_checkpointing()
    assert again.requires_grad
    torch.testing.assert_close(again.detach(), ours, rtol=1e-5, atol=1e-6)


def test_score_runs_blocks_up_to_n_only_and_freezes_the_rest(sd3_lrm):
    assert sd3_lrm.blocks == 3 == round(0.75 * 4) and sd3_lrm.config["lrm_blocks"] == 3
    model = sd3_lrm.transformer
    calls = []
    watched = list(model.transformer_blocks) + [model.norm_out, model.proj_out]
    hooks = [module.register_forward_hook(lambda *args, i=i: calls.append(i))
             for i, module in enumerate(watched)]
    x, t = _sd3_inputs()
    with torch.no_grad():
        scores = sd3_lrm.score(x, t, SD3_PROMPTS)
    for hook in hooks:
        hook.remove()
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert calls == [0, 1, 2], "blocks 4.., norm_out and proj_out must never run"
    unused = [model.transformer_blocks[3], model.norm_out, model.proj_out, sd3_lrm.text_encoders]
    assert not any(p.requires_grad for module in unused for p in module.parameters())
    assert all(p.requires_grad for p in model.transformer_blocks[2].parameters())
    sd3_lrm.train()   # frozen encoders stay in eval mode: T5's dropout would draw noise
    assert model.training and not any(encoder.training for encoder in sd3_lrm.text_encoders)
    sd3_lrm.eval()
    assert sd3_lrm.text_projection is None and sd3_lrm.visual_projection.weight.shape == (64, 64)
    with pytest.raises(ValueError, match="the MMDiT has 4 joint blocks"):
        M.LatentRewardModel.from_base("tiny-sd3", lrm_blocks=5)


SD3_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)


SD35_MEDIUM_CONFIG = dict(SD3_MEDIUM_CONFIG, dual_attention_layers=tuple(range(13)),
                          qk_norm="rms_norm", pos_embed_max_size=384)


@pytest.mark.parametrize("config", [SD3_MEDIUM_CONFIG, SD35_MEDIUM_CONFIG], ids=["sd3", "sd3.5"])
def test_real_sd3_medium_widths_and_block_18_on_meta_device(config):
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):   # the published configs, no weights, no memory
        transformer = SD3Transformer2DModel(**config)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=width, projection_dim=width, num_hidden_layers=1, num_attention_heads=4))
            for width in (768, 1280)]
        encoders.append(T5EncoderModel(T5Config(d_model=4096, num_layers=1, num_heads=4)))
        lrm = M.LatentRewardModel(transformer, encoders, [None] * 3,
                                  dict(base="x", g=7.5, resolution=1024))
        x = torch.randn(1, 16, 128, 128)
        feature = M.mmdit_features(transformer, x, torch.tensor([500.0]),
                                   torch.randn(1, 77 + 256, 4096), torch.randn(1, 2048), lrm.blocks)
    assert lrm.blocks == 18 and lrm.config["lrm_blocks"] == 18   # paper: joint block 18 of 24
    assert feature.shape == (1, 1536) and lrm.visual_projection.weight.shape == (2048, 1536)
    before = sum(p.numel() for p in transformer.parameters())
    lrm.for_scoring()
    assert len(transformer.transformer_blocks) == 18
    assert sum(p.numel() for p in transformer.parameters()) < 0.8 * before


def _sd3_tokenizer(subfolder):
    return AutoTokenizer.from_pretrained(SD3, subfolder=subfolder)


def test_sd3_prompt_encoding_is_the_pipelines_encode_prompt():
    """Oracle: StableDiffusion3Pipeline.encode_prompt, on text encoders whose CLIP states (32 + 48)
    are narrower than T5's (96): the zero padding shows."""
    torch.manual_seed(0)
    clip_tokenizer = _sd3_tokenizer("tokenizer")
    t5_tokenizer = _sd3_tokenizer("tokenizer_3")
    clips = []
    for hidden, projection in ((32, 16), (48, 24)):
        config = CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=hidden,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=clip_tokenizer.model_max_length,
                                projection_dim=projection, bos_token_id=clip_tokenizer.bos_token_id,
                                eos_token_id=clip_tokenizer.eos_token_id,
                                pad_token_id=clip_tokenizer.pad_token_id)
        clips.append(CLIPTextModelWithProjection(config).eval())
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=96, d_kv=16, d_ff=64,
                                 num_layers=1, num_heads=4)).eval()
    base = StableDiffusion3Pipeline.from_pretrained(SD3)
    pipe = StableDiffusion3Pipeline(
        transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
        text_encoder=clips[0], tokenizer=clip_tokenizer, text_encoder_2=clips[1],
        tokenizer_2=_sd3_tokenizer("tokenizer_2"), text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    encoders = [clips[0], clips[1], t5]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    length = models.t5_length(t5_tokenizer)
    assert length == min(256, t5_tokenizer.model_max_length)
    prompts = SD3_PROMPTS + ["a very long caption " * 10]   # truncated by every tokenizer
    with torch.no_grad():
        want = pipe.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=length)
        got = models.encode_prompt(encoders, tokenizers, prompts, 32)
        empty = models.encode_prompt(encoders, tokenizers, [""] * 4, 32)   # the pipeline's batch
    context, uncond_context, pooled, uncond_pooled = want
    assert got["encoder_hidden_states"].shape == (4, clip_tokenizer.model_max_length + length, 96)
    torch.testing.assert_close(got["encoder_hidden_states"], context, rtol=0, atol=0)
    torch.testing.assert_close(got["pooled_projections"], pooled, rtol=0, atol=0)
    assert got["pooled"] is got["pooled_projections"] and pooled.shape == (4, 16 + 24)
    assert (got["encoder_hidden_states"][:, :clip_tokenizer.model_max_length, 80:] == 0).all()
    # the CFG uncond is "" encoded the same way (VFE's unconditional pass)
    torch.testing.assert_close(empty["encoder_hidden_states"], uncond_context, rtol=0, atol=0)
    torch.testing.assert_close(empty["pooled_projections"], uncond_pooled, rtol=0, atol=0)


def test_score_is_vfe_on_the_mmdit_feature_by_hand(sd3_lrm):
    x, t = _sd3_inputs()
    encoders = list(sd3_lrm.text_encoders)
    with torch.no_grad():
        cond = models.encode_prompt(encoders, sd3_lrm.tokenizers, SD3_PROMPTS, 32)
        empty = models.encode_prompt(encoders, sd3_lrm.tokenizers, [""] * 3, 32)
        features = [M.mmdit_features(sd3_lrm.transformer, x, t, text["encoder_hidden_states"],
                                     text["pooled_projections"], 3) for text in (cond, empty)]
        visual = sd3_lrm.visual_projection(features[1] + 7.5 * (features[0] - features[1]))
        text_feature = cond["pooled_projections"]
        cosine = torch.nn.functional.cosine_similarity(visual, text_feature, dim=-1)
        want = torch.exp(torch.tensor(3.0)) * cosine
        got = sd3_lrm.score(x, t, SD3_PROMPTS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # t is SD3's float sigma x 1000, not rounded: 8.93 and 8 score differently
    with torch.no_grad():
        rounded = sd3_lrm.score(x, 8, SD3_PROMPTS)
        assert not torch.equal(sd3_lrm.score(x, t[0], SD3_PROMPTS), rounded)


# ----------------------------------------------------------------------------- save, load, score
def test_save_load_round_trip_scores_identically_without_copying_the_text_encoders(sd3_lrm,
                                                                                    tmp_path):
    out = tmp_path / "lrm"
    sd3_lrm.save_pretrained(str(out))
    assert sorted(os.listdir(out)) == ["lrm_config.json", "state_dict.pt", "transformer"]
    config = json.load(open(out / "lrm_config.json"))
    assert config["base"] == "tiny/sd3" and config["lrm_blocks"] == 3
    assert config["latent_space"][2] is not None   # SD3's VAE has a shift_factor
    back = M.LatentRewardModel.from_pretrained(str(out), base="tiny-sd3").eval()
    x, t = _sd3_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.score(x, t, SD3_PROMPTS), sd3_lrm.score(x, t, SD3_PROMPTS),
                                   rtol=0, atol=0)
    base_t5 = M.load_text_encoders(SD3, {"text_encoder_3": "T5EncoderModel"})[0][0]
    for a, b in zip(back.text_encoders[2].parameters(), base_t5.parameters()):
        assert torch.equal(a, b)   # frozen: the base's
    # another latent space is refused both ways (an LRM does not transfer across VAEs)
    with pytest.raises(ValueError, match="latent space"):
        M.LatentRewardModel.from_pretrained(str(out), base="tiny")
    with pytest.raises(ValueError, match="latent space"):
        M.LatentRewardModel.from_pretrained("tiny/lrm", base="tiny-sd3")
    # a save cut short (no lrm_config.json) is refused, not read as the official U-Net layout
    os.remove(out / "lrm_config.json")
    with pytest.raises(ValueError, match="^incomplete LRM folder"):
        M.LatentRewardModel.from_pretrained(str(out), base="tiny-sd3")


def test_an_sd3_pipeline_shares_the_lrms_frozen_text_encoders_uncast():
    """lpo.py: one T5, not two. The pipeline's text encoders are the LRM's own objects, in the
    pipeline's dtype while the LRM is cast; the scores equal an LRM cast whole (bf16 text: close),
    and the pipeline encodes prompts as it does with its own."""
    x, t = _sd3_inputs()
    own = models.load_lrm("tiny/lrm-sd3", "tiny-sd3", "cpu", torch.float32, "hint")
    base = models.resolve_model("tiny-sd3")
    alone = models.load_pipeline(base, "cpu", torch.float32, vae=False)
    for dtype, tolerance in ((torch.float32, 0), (torch.bfloat16, 0.05)):
        lrm = models.load_lrm("tiny/lrm-sd3", "tiny-sd3", "cpu", torch.float32, "hint", dtype)
        pipe = models.load_pipeline(base, "cpu", dtype, vae=False, lrm=lrm)
        encoders = models.text_encoders(pipe)
        assert len(encoders) == 3 and all(a is b for a, b in zip(lrm.text_encoders, encoders))
        assert models.tokenizers(pipe) == lrm.tokenizers
        assert {p.dtype for e in encoders for p in e.parameters()} == {dtype}   # not cast
        assert lrm.transformer.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(lrm.score(x, t, SD3_PROMPTS), own.score(x, t, SD3_PROMPTS),
                                       rtol=tolerance, atol=tolerance)
    for got, want in zip(models.encode_for_cfg(pipe, SD3_PROMPTS, 32).values(),
                         models.encode_for_cfg(alone, SD3_PROMPTS, 32).values()):
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    # a U-Net LRM trains its text encoder: the pipeline keeps its own
    lrm = models.load_lrm("tiny/lrm", "tiny", "cpu", torch.float32, "hint", torch.float32)
    pipe = models.load_pipeline(models.resolve_model("tiny"), "cpu", torch.float32, vae=False, lrm=lrm)
    assert lrm.text_encoders[0] is not pipe.text_encoder


def test_lrm_takes_a_hub_subfolder_and_downloads_only_it(monkeypatch, tmp_path):
    """--lrm owner/repo/sub/folder (the released LRM-XL's way): snapshot_download of that
    subfolder alone, then read from the cache; a failed download is one line naming it."""
    import huggingface_hub
    calls = []

    def download(repo, allow_patterns=None, **kwargs):
        calls.append((repo, allow_patterns))
        shutil.copytree(os.path.join(ROOT, "tiny", "lrm"), tmp_path / "snap" / "sd15" / "lrm")
        return str(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    lrm = models.load_lrm("someone/LRM/sd15/lrm", "tiny", "cpu", torch.float32, "hint")
    assert calls == [("someone/LRM", ["sd15/lrm/*"])]
    assert lrm.unet is not None and lrm.scoring_only

    def offline(repo, **kwargs):
        raise OSError("no connection to the hub\nmore lines")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SystemExit, match=r"error: --lrm someone/LRM/sdxl: cannot download sdxl/ of the "
                                         r"hub repo someone/LRM \(no connection to the hub\)$"):
        models.load_lrm("someone/LRM/sdxl", "tiny", "cpu", torch.float32, "hint")
    with pytest.raises(SystemExit, match="error: no LRM at runs/none: train one"):
        models.load_lrm("runs/none", "tiny", "cpu", torch.float32, "hint")


def test_for_scoring_same_scores_without_the_unused_blocks(tmp_path):
    lrm = M.LatentRewardModel.from_base("tiny-sd3", lrm_blocks=2).eval()
    model = lrm.transformer
    unused = list(model.transformer_blocks[2:]) + [model.norm_out, model.proj_out]
    dropped = sum(p.numel() for module in unused for p in module.parameters())
    total = sum(p.numel() for p in lrm.parameters())
    x, t = _sd3_inputs()
    with torch.no_grad():
        want = lrm.score(x, t, SD3_PROMPTS)
        got = lrm.for_scoring().score(x, t, SD3_PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(model.transformer_blocks) == 2 and model.norm_out is None
    assert sum(p.numel() for p in lrm.parameters()) == total - dropped and dropped > 0
    with pytest.raises(ValueError, match="for_scoring"):
        lrm.save_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- flow-matching noise
def test_flow_noising_and_grid_match_the_flow_scheduler():
    """Oracle: FlowMatchEulerDiscreteScheduler.scale_noise at each of its 20 steps; the training
    levels are those below 1 (where LPO's children are: at sigma 1 a pair carries no signal)."""
    noise_scheduler, grid = L.noise_schedule(SD3)
    sampler = FlowMatchEulerDiscreteScheduler.from_pretrained(SD3, subfolder="scheduler")
    sampler.set_timesteps(20)
    assert grid == sorted(sampler.timesteps.tolist())[:-1] and len(grid) == 19 and max(grid) < 1000
    torch.testing.assert_close(torch.tensor(grid), sampler.sigmas[1:-1].flip(0) * 1000)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    e = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in sampler.timesteps:
        want = sampler.scale_noise(x, t[None], e)
        got = L.add_noise(noise_scheduler, x, e, torch.full((2,), t.item(), dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got.dtype == torch.float32
    # defaults: the grid's t nearest 0, 250, 500, 750, 1000 (DDPM: the old 1, 251, 501, 751, 951)
    assert noise_scheduler.config.shift == 3.0   # SD3's: the grid crowds the high noise levels
    want = [8.928571701049805, 266.3297119140625, 520.0741577148438, 730.9743041992188, 981.8745727539062]
    assert L.default_eval_timesteps(grid) == want
    ddpm, ddpm_grid = L.noise_schedule(os.path.join(ROOT, "tiny/sd15"))
    assert ddpm_grid == list(range(1, 1000, 50))
    assert L.default_eval_timesteps(ddpm_grid) == [1, 251, 501, 751, 951]
    assert L.parse_timesteps("1,251") == [1, 251] and L.parse_timesteps("8.5,1000") == [8.5, 1000]


def test_images_are_encoded_shifted_then_scaled():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(SD3, subfolder="vae")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    z = posterior.mean + posterior.std * noise
    want = (z - vae.config.shift_factor) * vae.config.scaling_factor   # SD3's pipeline
    torch.testing.assert_close(L.encode_images(vae, pixels, noise), want)


# ----------------------------------------------------------------------------- lrm.py
def test_shipped_tiny_sd3_lrm_is_small_and_noise_aware():
    """tiny/lrm-sd3 (python lrm.py --model tiny-sd3, trained on the levels below 1): no text
    encoders copied, and its validation accuracy falls from ~0.67-0.70 at the two lowest noise
    levels of the grid to chance at pure noise."""
    assert sorted(os.listdir("tiny/lrm-sd3")) == ["lrm_config.json", "state_dict.pt",
                                                 "transformer"]
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm-sd3", base="tiny-sd3")  # same VAE
    assert lrm.config["base"] == "tiny/sd3" and lrm.blocks == 3 and lrm.g == 7.5
    pairs = L.load_pairs("tiny/pickapic", "validation_unique")
    accuracy = L.pair_accuracy(lrm, pairs, [8.928571701049805, 266.3297119140625, 1000])["decisive"]
    assert min(accuracy[8.928571701049805], accuracy[266.3297119140625]) > 0.65   # 191 decisive pairs
    assert accuracy[1000] < 0.56


def _sd3_lrm_args(out, *extra):
    return ["--model", "tiny-sd3", "--out", str(out), "--max_train_steps", "3",
            "--train_batch_size", "4", "--eval_every", "3", "--save_every", "2",
            "--eval_max_pairs", "4", "--warmup", "1", *map(str, extra)]


def test_tiny_sd3_run_trains_logs_and_resumes_bitwise(tmp_path, monkeypatch):
    preset = L.get_config(["--model", "tiny-sd3"])
    assert (preset.max_train_steps, preset.train_batch_size, preset.lr) == (400, 32, 1e-3)
    assert (preset.threads, preset.keep) == (1, "tiny/pickapic/mpcf_keep.json")
    table = L.main(L.get_config(_sd3_lrm_args(tmp_path / "a")))
    grid = L.noise_schedule(SD3)[1]
    assert list(table["test_unique"]["decisive"]) == L.default_eval_timesteps(grid)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert "val_acc@8.92857" in rows[3] and "val_acc_ties_half@981.875" in rows[3]
    assert set(rows[-1]["final"]["test_unique"]["decisive"]) == {
        "8.92857", "266.33", "520.074", "730.974", "981.875"}
    a = _trained(tmp_path / "a", "tiny-sd3")   # (exactly the trained parameters)
    assert not any(key.startswith("text_encoders.") for key in a)   # frozen: the base's
    assert any(key.startswith("transformer.") for key in a)
    assert sorted(os.listdir(tmp_path / "a" / "best")) == ["lrm_config.json", "state_dict.pt",
                                                          "transformer"]
    # killed after step 3's update, before its checkpoint; resumed from step 2's: bit for bit
    real_log = L.log_jsonl

    def crash_at_step_3(path, row):
        real_log(path, row)
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt
    monkeypatch.setattr(L, "log_jsonl", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        L.main(L.get_config(_sd3_lrm_args(tmp_path / "b")))
    monkeypatch.setattr(L, "log_jsonl", real_log)
    L.main(L.get_config(_sd3_lrm_args(tmp_path / "b", "--resume")))
    assert _state(tmp_path / "b")["step"] == 3
    _assert_same_tensors(a, _trained(tmp_path / "b", "tiny-sd3"))
    init = M.LatentRewardModel.from_base("tiny-sd3").state_dict()
    assert not torch.equal(a["visual_projection.weight"], init["visual_projection.weight"])


def _sd3_rank_main(rank, port, args):
    """lrm.main as rank `rank` of 2 (gloo), in a forked child; exits 0 on success."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 1
    try:
        L.main(L.get_config(args))
        code = 0
    finally:
        os._exit(code)


def test_two_gloo_ranks_train_as_one_process_with_their_batch(tmp_path):
    import multiprocessing
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ("--max_train_steps", 2, "--train_batch_size", 8, "--eval_every", 100,
              "--eval_max_pairs", 2, "--eval_timesteps", "8.93", "--lr", 1e-4)
    fork = multiprocessing.get_context("fork")
    two_args = _sd3_lrm_args(tmp_path / "two", *common)
    ranks = [fork.Process(target=_sd3_rank_main, args=(rank, port, two_args)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [process.exitcode for process in ranks] == [0, 0]
    L.main(L.get_config(_sd3_lrm_args(tmp_path / "one", *common)))
    two, one = _trained(tmp_path / "two", "tiny-sd3"), _trained(tmp_path / "one", "tiny-sd3")
    init = M.LatentRewardModel.from_base("tiny-sd3").state_dict()
    moved = sum((value - init[key]).abs().sum().item() for key, value in one.items())
    diff = sum((two[key] - value).abs().sum().item() for key, value in one.items())
    assert moved > 0.1 and diff < 1e-3 * moved, (diff, moved)
    logs = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")
             if '"loss"' in line] for run in ("two", "one")]
    for two_row, one_row in zip(*logs):   # the global batch's loss and gradient norm
        assert two_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5)
        assert two_row["grad_norm"] == pytest.approx(one_row["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("argv,word", [
    (["--model", "tiny-sd3", "--lrm_blocks", "5"], "lrm_blocks 5: the MMDiT has 4"),
    (["--model", "tiny", "--lrm_blocks", "2"], "only an MMDiT"),
    (["--model", "tiny-sd3", "--lrm_blocks", "-1"], "lrm_blocks"),
    (["--model", "tiny-sd3", "--resolution", "36"], "multiple of 8"),
    (["--model", "tiny-sd3", "--resolution", "256"], "position embedding"),
    (["--model", "tiny", "--eval_timesteps", "1,8.5"], "integers"),
    (["--model", "tiny-sd3", "--eval_timesteps", "1001"], "0..1000"),
])
def test_bad_inputs_fail_in_one_line(argv, word, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        L.main(L.get_config(argv + ["--out", str(tmp_path / "run")]))
    message = str(exit_info.value.code)
    assert message.startswith("lrm.py: error:") and "\n" not in message and word in message


# ============================================================================ SD3: sample.py, eval.py, bench.py
STEPS = 8  # fewer than the preset's 20: the same code, a quarter of the time


# 2 prompts x 2 seeds, CPU, few steps; the tiny-sd3 preset's prompts, seeds and guidance
ARGV = ["--model", "tiny-sd3", "--num_prompts", "2", "--seeds_per_prompt", "2",
        "--num_inference_steps", str(STEPS)]


def pipeline():
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(SD3)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # as sample.py decodes (a batched decode can differ by 1 level)
    return pipe


def pipeline_images(pipe, rows):
    """The SD3 pipeline's own images of metadata rows: each image's seed, the preset's guidance,
    T5 at min(256, tokenizer_3.model_max_length) tokens (the repository's rule)."""
    length = min(256, pipe.tokenizer_3.model_max_length)
    generators = [torch.Generator().manual_seed(row["seed"]) for row in rows]
    guidance = sample.get_config(ARGV).guidance_scale  # the preset's: the world's choice, 5.0
    output = pipe([row["prompt"] for row in rows], generator=generators, height=32, width=32,
                  num_inference_steps=STEPS, guidance_scale=guidance, max_sequence_length=length,
                  output_type="np")
    return np.round(output.images * 255).astype(np.int16)  # (N, H, W, 3), as the PIL path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """sample.py on tiny-sd3 with a LoRA made by peft on the transformer's attention projections
    and saved by StableDiffusion3Pipeline.save_lora_weights (transformer_lora_layers, as lpo.py)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    tmp = tmp_path_factory.mktemp("sd3-tools")
    pipe = pipeline()
    torch.manual_seed(0)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an untrained LoRA changes nothing
                parameter.normal_(0, 0.3)
    lora = str(tmp / "lora")
    layers = get_peft_model_state_dict(pipe.transformer)
    StableDiffusion3Pipeline.save_lora_weights(lora, transformer_lora_layers=layers)
    out = str(tmp / "samples")
    sample.main(sample.get_config(ARGV + ["--lora", lora, "--out", out]))
    return dict(tmp=tmp, lora=lora, out=out)


def test_sample_sd3_is_the_pipelines_own_sampling_and_the_lora_moves_tuned_only(run):
    base_dir = os.path.join(run["out"], "base")
    tuned_dir = os.path.join(run["out"], "tuned")
    rows = [json.loads(line) for line in open(os.path.join(base_dir, "metadata.jsonl"))]
    assert [row["seed"] for row in rows] == [1_000_000 + i for i in range(4)]
    for folder, tuned in ((base_dir, None), (tuned_dir, run["lora"])):
        settings = json.load(open(os.path.join(folder, "sampling.json")))
        assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        assert (settings["tuned"], settings["num_inference_steps"], settings["eta"]) == (
            tuned, STEPS, 0.0)
    pipe = pipeline()
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"   # kept, not DDIM
    base = np.stack([pixels(os.path.join(base_dir, row["file_name"])) for row in rows])
    tuned = np.stack([pixels(os.path.join(tuned_dir, row["file_name"])) for row in rows])
    # the same seed -> the pipeline's own image, exactly; the base untouched by the LoRA
    assert np.array_equal(base, pipeline_images(pipe, rows))
    pipe.load_lora_weights(run["lora"])   # diffusers' own LoRA loading: the tuned oracle
    assert np.array_equal(tuned, pipeline_images(pipe, rows))
    assert np.abs(tuned - base).mean() > 1.0


def test_sample_takes_a_merged_transformer_folder_as_unet(run):
    """lpo.py --save_merged writes {out}/transformer: --unet takes it (or its parent) for an SD3
    base; the LoRA fused in gives the LoRA's images."""
    pipe = pipeline()
    pipe.load_lora_weights(run["lora"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = run["tmp"] / "merged"
    pipe.transformer.save_pretrained(str(merged / "transformer"))
    out = str(run["tmp"] / "merged-samples")
    sample.main(sample.get_config(ARGV + ["--unet", str(merged), "--out", out]))
    for name in os.listdir(os.path.join(run["out"], "tuned")):
        if name.endswith(".png"):
            fused = pixels(os.path.join(out, "tuned", name))
            unfused = pixels(os.path.join(run["out"], "tuned", name))
            assert np.abs(fused - unfused).max() <= 1, name


def flow_shift(sigma, shift=3.0):
    """FlowMatchEulerDiscreteScheduler's shift: s -> shift s / (1 + (shift - 1) s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def test_eval_scores_sd3_samples_with_an_sd3_lrm_at_the_grids_last_level(run):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from lrm_model import LatentRewardModel
    torch.manual_seed(0)
    lrm_dir = str(run["tmp"] / "lrm")
    LatentRewardModel.from_base(SD3).save_pretrained(lrm_dir)
    base_dir = os.path.join(run["out"], "base")
    tuned_dir = os.path.join(run["out"], "tuned")
    out = str(run["tmp"] / "eval")
    argv = ["--model", "tiny-sd3", "--base_dir", base_dir, "--tuned_dir", tuned_dir, "--lrm",
            lrm_dir, "--scorers", "judge,lrm", "--n_boot", "200", "--out", out]
    ev.main(ev.get_config(argv))
    report = json.load(open(os.path.join(out, "eval.json")))
    assert report["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert {"lrm", "judge:human"} <= set(report["scores"]) and report["n"] == 4
    # the grid's last level: training sigmas shifted once (sigma_min), the grid shifted again
    last = 1000 * flow_shift(flow_shift(1 / 1000))
    assert ev.final_timestep(SD3, STEPS) == pytest.approx(last, rel=1e-5)   # 8.93, not 0
    assert ev.final_timestep(os.path.join(ROOT, "tiny", "sd15"), 20) == 1   # DDIM: unchanged
    # the LRM column: diffusers' VAE preprocessing, SD3's latents (z - shift) x scale, at `last`
    scores = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
    rows = [json.loads(line) for line in open(os.path.join(tuned_dir, "metadata.jsonl"))]
    images = [Image.open(os.path.join(tuned_dir, row["file_name"])) for row in rows]
    vae = AutoencoderKL.from_pretrained(SD3, subfolder="vae")
    assert vae.config.shift_factor   # an SD3-style VAE: the shift matters
    lrm = LatentRewardModel.from_pretrained(lrm_dir, base=SD3).eval()
    with torch.no_grad():
        z = vae.encode(VaeImageProcessor().preprocess(images)).latent_dist.mean
        latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
        want = lrm.score(latents, last, prompts=[row["prompt"] for row in rows]).numpy()
    np.testing.assert_allclose([s["lrm/tuned"] for s in scores], want, rtol=1e-4, atol=1e-4)


def test_estimate_counts_sd3_medium_as_a_meta_device_instantiation():
    """memory.py's SD3 rows: the published SD3-Medium parts built here from their numbers
    (independently of bench.py's tables) on the meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    def count(module):
        return sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        mmdit = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=16,
                            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                            use_post_quant_conv=False)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, projection_dim=1280))
        t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
    parts = [count(module) for module in (mmdit, vae, clip_l, clip_g, t5)]
    # SD3-Medium's published sizes: MMDiT 2.03B, VAE 83.8M, T5-v1.1-XXL encoder 4.76B
    assert parts[0] == 2_028_328_000 and parts[1] == 83_819_683 and parts[4] == 4_762_310_656
    pipe = bench.load_pipeline("sd3", "meta")
    assert bench.default_resolution(pipe) == 1024 and pipe.vae.config.shift_factor == 0.0609
    assert models.t5_length(pipe.tokenizer_3) == 256 and pipe.tokenizer.model_max_length == 77   # the pipeline's
    (row,) = memory.estimate_eval("sd3", pipe, 1024)
    assert row["parameters"] == sum(parts) and row["weights_gb"] == 2 * sum(parts) / 1e9
    assert row["batch"] == "4 images" and row["activations_gb"] > 0
    # LPO: the policy (+ LoRA rank 64 on 24 x to_q, to_k, to_v, to_out.0), the pipeline's text
    # encoders, once (the LRM shares them), the LRM's first 18 joint blocks + heads; no VAE
    unused = [mmdit.transformer_blocks[18:], mmdit.norm_out, mmdit.proj_out]
    lrm_mmdit = parts[0] - sum(count(module) for module in unused)
    lora = 24 * 4 * 64 * (1536 + 1536)
    text = parts[2] + parts[3] + parts[4]
    (row,) = memory.estimate_lpo("sd3", bench.load_pipeline("sd3", "meta"), 1024)
    assert row["parameters"] == parts[0] + lora + text + lrm_mmdit + 1536 * 2048 + 1 == 9_175_278_657
    assert row["weights_gb"] == (2 * row["parameters"] + 2 * lora) / 1e9   # LoRA fp32, the rest 2 bytes
    # LRM step on 8 ranks: the trained MMDiT part + heads sharded, the frozen text encoders bf16
    (step, _) = memory.estimate_lrm("sd3", bench.load_pipeline("sd3", "meta"), 1024, 8)
    trained, block = lrm_mmdit + 1536 * 2048 + 1, count(mmdit.transformer_blocks[0])
    assert step["parameters"] == trained + text + parts[1]
    assert step["weights_gb"] == (2 * text + 4 * parts[1] + 4 * trained / 8 + 2 * 2 * block) / 1e9
    assert step["train_state_gb"] == (12 * trained / 8 + 4 * block) / 1e9
    # the default --model of both includes SD3
    assert "sd3" in bench.Config.model.split(",") and "sd3" in memory.Config.model.split(",")


def test_bench_tiny_sd3_runs_lpo_through_lpos_flow_step(tmp_path):
    """--tiny includes tiny-sd3; its LPO phases run lpo.py's generic functions, which pick the
    flow step from the schedule; the pixel reward's x0 is the Euler step to sigma 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    import lpo
    assert "tiny-sd3" in bench.get_config(["--tiny"]).model.split(",")
    out = str(tmp_path / "bench")
    argv = ["--model", "tiny-sd3", "--device", "cpu", "--warmup", "0", "--repeats", "1",
            "--out", out, "--sample_batch_size", "2", "--train_batch_size", "2"]
    results = bench.main(bench.get_config(argv))["tiny-sd3"]
    assert results["lpo_step_s"] > 0 and results["lpo_update_s"] > 0 and results["ratio_step"]
    assert results["lrm_step_s"] > 0 and results["ratio_dpo"]   # SD3's DPO: the velocity's error
    smoke_like = bench.main(bench.get_config(argv + ["--no-baselines", "--out", out + "-lpo"]))
    assert {"pixel_step_s", "dpo_update_s"}.isdisjoint(smoke_like["tiny-sd3"])
    stage = bench.load_lpo_stage("tiny-sd3", bench.get_config(argv), torch.device("cpu"))
    assert isinstance(stage.schedule, lpo.FlowSchedule)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(SD3, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[0.6], device="cpu")   # one step: sigma (0.6 shifted) -> 0
    x = torch.randn(2, 16, 8, 8)
    velocity = torch.randn(2, 16, 8, 8)
    want = scheduler.step(velocity, scheduler.timesteps[0], x).prev_sample
    # the pixel reward's x0: the schedule's deterministic step to the chain's end, as it calls it
    t = scheduler.timesteps[:1].repeat(2)
    got, _ = stage.schedule.step(velocity, x, t, stage.schedule.prev_timesteps[-1].item(), 0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("module,argv,word", [
    (sample, ["--model", "tiny-sd3", "--eta", "0.5"], "eta"),
    (ev, ["--model", "tiny-sd3", "--unet", SD3, "--eta", "0.5", "--scorers", "judge"], "eta"),
    (sample, ["--model", "tiny-sd3", "--unet", os.path.join(ROOT, "tiny", "sd15")], "transformer"),
])
def test_bad_sd3_inputs_fail_in_one_line(module, argv, word, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.get_config(argv + ["--out", str(tmp_path / "out")]))
    message = str(exit_info.value.code)
    assert message.startswith(f"{os.path.basename(module.__file__)}: error:") and "\n" not in message, message
    assert word in message and not os.path.exists(tmp_path / "out"), message


# ============================================================================ SD3: flow step and LPO (lpo.py)
SD3_BASE = os.path.join(ROOT, "tiny", "sd3")


def flow_scheduler(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def toy_velocity(x, s):
    """Some smooth field of x and the noise level s (not a flow's): the Euler parity needs none."""
    return torch.tanh(1.5 * x.flip(-1)) - 0.7 * s * x + s**2


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_step_at_eta_0_is_the_schedulers_euler_step(shift):
    """eta 0: flow_step (std exactly 0) and FlowSchedule.step give FlowMatchEulerDiscreteScheduler
    .step over whole chains, any shift and step count; the schedule is the scheduler's grid."""
    for steps in (1, 4, 28, 50):
        scheduler = flow_scheduler(shift, steps)
        schedule = lpo.make_schedule(dict(scheduler.config), steps, 0.1, 0.2, CPU)
        assert torch.equal(schedule.timesteps, scheduler.timesteps)
        assert torch.equal(schedule.prev_timesteps[:-1], scheduler.timesteps[1:])
        assert schedule.prev_timesteps[-1] == 0
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        ours = x.clone()
        by_schedule = x.clone()
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i].item()
            x = scheduler.step(toy_velocity(x, sigma), t, x).prev_sample
            level, level_prev = t.item() / 1000, scheduler.sigmas[i + 1].item()
            mean, std = lpo.flow_step(toy_velocity(ours, sigma), ours, level, level_prev, 0.0)
            assert torch.all(std == 0)
            ours = mean
            t_prev = schedule.prev_timesteps[i].item()
            mean, std = schedule.step(toy_velocity(by_schedule, sigma), by_schedule, t.item(),
                                      t_prev, 0.0)
            by_schedule = mean
            torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(by_schedule, x, rtol=1e-5, atol=1e-5)


def gaussian_velocity(x, s, mu, scale):
    """The flow's true velocity E[e - x_0 | x_s] for data N(mu, scale^2) per dimension:
    v*(x, s) = (s - (1 - s) scale^2) / V_s (x - (1 - s) mu) - mu, V_s = (1 - s)^2 scale^2 + s^2."""
    variance = (1 - s) ** 2 * scale**2 + s**2
    return (s - (1 - s) * scale**2) / variance * (x - (1 - s) * mu) - mu


def worst_marginal_errors(steps, std_factor=1.0, euler_mean=False, samples=40_000):
    """Sample the chain from N(0, I) with the true velocity; at every step compare the samples with
    the flow's marginal N((1 - s') mu, V_s'): (largest |mean error| in standard errors of the
    mean, largest |sample var / V_s' - 1|). Controls: std x std_factor; euler_mean: the eta = 0
    mean with the eta = 1 noise added (a naive "noisy ODE")."""
    mu = torch.tensor([1.0, -0.5, 0.0, 0.3])
    scale = torch.tensor([0.5, 1.0, 1.5, 0.8])
    generator = torch.Generator().manual_seed(steps)
    scheduler = flow_scheduler(3.0, steps)  # SD3's shift
    levels = scheduler.sigmas.tolist()
    x = torch.randn(samples, 4, generator=generator)
    worst_mean = worst_var = 0.0
    for s, s_prev in zip(levels[:-1], levels[1:]):
        v = gaussian_velocity(x, s, mu, scale)
        mean, std = lpo.flow_step(v, x, s, s_prev, 1.0)
        if euler_mean:
            mean, _ = lpo.flow_step(v, x, s, s_prev, 0.0)
        x = mean + std_factor * std * torch.randn(x.shape, generator=generator)
        variance = (1 - s_prev) ** 2 * scale**2 + s_prev**2
        error = (x.mean(0) - (1 - s_prev) * mu) / (variance / samples).sqrt()
        worst_mean = max(worst_mean, error.abs().max().item())
        worst_var = max(worst_var, (x.var(0) / variance - 1).abs().max().item())
    return worst_mean, worst_var


def test_flow_step_at_eta_1_keeps_the_flows_gaussian_marginals():
    """eta 1 on Gaussian data (true velocity in closed form), SD3's shift 3: on a fine grid (400
    steps) every step's samples have the flow's marginal: mean within 5 standard errors, variance
    within 7.5% = the grid's own first-order error (3.7% at 400 steps, computed exactly for this
    linear chain; 22% at 50: it shrinks as the grid refines) + 5 standard errors of a
    40,000-sample variance (0.7% each). Controls
    that must fail (100 steps): a std 1.2x too large (47% off); the Euler mean plus eta 1 noise
    (more than 10x off)."""
    mean_error, var_error = worst_marginal_errors(400)
    assert mean_error < 5 and var_error < 0.075, (mean_error, var_error)
    _, coarse_error = worst_marginal_errors(50)
    assert 2 * var_error < coarse_error < 0.3, (coarse_error, var_error)
    _, wrong_std = worst_marginal_errors(100, std_factor=1.2)
    assert wrong_std > 0.2, wrong_std
    _, noisy_ode = worst_marginal_errors(100, euler_mean=True)
    assert noisy_ode > 1.0, noisy_ode


def test_flow_sigma_by_hand_and_the_flow_thresholds():
    """flow_sigma = the posterior std of the chain with marginals N((1 - s) x_0, s^2) by Gaussian
    conditioning (x_s = c x_s' + sqrt(s^2 - c^2 s'^2) n, c = (1 - s) / (1 - s'): Var(x_s' | x_s)
    = s'^2 - c^2 s'^4 / s^2); s' at s = 1; 0 at s' = 0; linear in eta. The SD3 schedule (shift 3,
    28 steps): thresholds from th_max at the first step to th_min at the last (std 0), linear in
    the std."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s_prev = s * torch.rand(50, generator=g, dtype=torch.float64)
    c = (1 - s) / (1 - s_prev)
    want = (s_prev**2 - c**2 * s_prev**4 / s**2).sqrt()
    torch.testing.assert_close(lpo.flow_sigma(s, s_prev, 1.0), want)
    torch.testing.assert_close(lpo.flow_sigma(s, s_prev, 0.3), 0.3 * want)
    assert lpo.flow_sigma(1.0, 0.7, 1.0).item() == pytest.approx(0.7)
    assert lpo.flow_sigma(0.2, 0.0, 1.0).item() == 0.0
    scheduler = flow_scheduler(3.0, 28)
    schedule = lpo.make_schedule(dict(scheduler.config), 28, 0.45, 0.6, CPU)
    levels = scheduler.sigmas.double()
    c = (1 - levels[:-1]) / (1 - levels[1:])
    want = (levels[1:] ** 2 - c**2 * levels[1:] ** 4 / levels[:-1] ** 2).clamp(min=0).sqrt()
    torch.testing.assert_close(schedule.sigmas, want, rtol=1e-5, atol=1e-6)
    # by hand: s' at s = 1 (0.9874, SD3's second level at 28 steps), 0 into x_0
    assert abs(schedule.sigmas[0] - 0.9874) < 1e-4 and schedule.sigmas[-1] == 0
    # thresholds: linear in the VP-equivalent sigma (the flow std / c(s'), c(s) = sqrt((1-s)^2 +
    # s^2)), spanning [0.45, 0.6] over the 27 steps that form pairs; the last step gets th_max
    th = schedule.thresholds
    s_prev = levels[1:]
    vp = (want / ((1 - s_prev) ** 2 + s_prev**2).sqrt())[:-1]
    torch.testing.assert_close(th[:-1], 0.45 + (vp - vp.min()) / (vp.max() - vp.min()) * 0.15,
                               rtol=1e-5, atol=1e-6)
    assert th[0] == pytest.approx(0.6) and th[-2] == pytest.approx(0.45) and th[-1] == 0.6


def test_step_logprob_of_flow_step_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    v, x_t, x_prev = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    s = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.05])
    s_prev = torch.tensor([0.95, 0.7, 0.5, 0.1, 0.01])
    mean, std = lpo.flow_step(v, x_t, s, s_prev, 1.0)
    assert std.shape == (5, 1, 1, 1) and (std > 0).all()
    want = torch.distributions.Normal(mean, std).log_prob(x_prev).mean((1, 2, 3))
    torch.testing.assert_close(lpo.step_logprob(x_prev, mean, std), want)
    # the mean by hand: x_0 = x_t - s v, e = x_t + (1 - s) v, (1 - s') x_0 + sqrt(s'^2 - sig^2) e
    shape = (-1, 1, 1, 1)
    keep = (s_prev.view(shape) ** 2 - std**2).sqrt()
    x0 = x_t - s.view(shape) * v
    noise = x_t + (1 - s.view(shape)) * v
    torch.testing.assert_close(mean, (1 - s_prev.view(shape)) * x0 + keep * noise)


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def sd3_pipe():
    cfg = lpo.get_config(["--model", SD3_BASE, "--eval-samples", "0"])
    cfg.resolution, latent = models.geometry(cfg.base, cfg.resolution)
    return models.load_pipeline(cfg.base, CPU, torch.float32, vae=False), latent


def test_sd3_encoding_guidance_and_schedule_reproduce_the_sd3_pipeline(sd3_pipe):
    """lpo's SD3 parts against StableDiffusion3Pipeline itself: encode_for_cfg equals its
    encode_prompt with CFG ([uncond = "" encoded the same way; cond]); and our chain at eta 0
    (guided_prediction + the FlowSchedule's step) from the same latents ends on the pipeline's
    own output latents (its Euler sampler), with the pipeline's T5 length."""
    pipe, latent = sd3_pipe
    assert pipe.vae is None and models.denoiser_name(pipe) == "transformer" and latent == 8
    assert len(models.text_encoders(pipe)) == 3
    prompts = ["a red circle", "a blue square"]
    length = models.t5_length(pipe.tokenizer_3)
    cond = models.encode_for_cfg(pipe, prompts, 32)
    states, empty, pooled, empty_pooled = pipe.encode_prompt(prompts, None, None,
                                                             max_sequence_length=length)
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat([empty, states]))
    torch.testing.assert_close(cond["pooled_projections"], torch.cat([empty_pooled, pooled]))
    assert cond["encoder_hidden_states"][0].abs().sum() > 0  # "" encoded, not zeros
    steps, guidance = 6, 4.0
    x = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    want = pipe(prompts, latents=x.clone(), num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", max_sequence_length=length).images
    schedule = lpo.make_schedule(pipe.scheduler.config, steps, 0.1, 0.2, CPU, latent)
    with torch.no_grad():
        for t, t_prev in zip(schedule.timesteps.tolist(), schedule.prev_timesteps.tolist()):
            velocity = lpo.guided_prediction(pipe.transformer, x, t, cond, guidance)
            x, _ = schedule.step(velocity, x, t, t_prev, 0.0)
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_sd3_lora_loads_with_the_sd3_pipelines_loader(sd3_pipe, tmp_path):
    """add_lora puts LoRA on to_q, to_k, to_v, to_out.0 of every joint block (not on the text
    stream's add_*_proj / to_add_out); save_lora's file loads with StableDiffusion3Pipeline
    .load_lora_weights and gives the trained transformer's output."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file
    pipe = StableDiffusion3Pipeline.from_pretrained(SD3_BASE, vae=None)
    lpo.add_lora(pipe.transformer, 4, 0, False)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an untrained LoRA changes nothing
                param.normal_(0, 0.3)
    lpo.save_lora(pipe, pipe.transformer, str(tmp_path))
    keys = load_file(tmp_path / lpo.LORA_FILE)
    blocks = pipe.transformer.config.num_layers
    assert len(keys) == blocks * 4 * 2 and all(key.startswith("transformer.") for key in keys)
    assert not any("add_" in key for key in keys)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700.0, 30.5])
    cond = models.encode_for_cfg(pipe, ["a red circle"], 32)
    with torch.no_grad():
        want = pipe.transformer(x, timestep=t, **cond).sample
        pipe.transformer.disable_adapters()
        plain = pipe.transformer(x, timestep=t, **cond).sample
    fresh = StableDiffusion3Pipeline.from_pretrained(SD3_BASE, vae=None)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        got = fresh.transformer(x, timestep=t, **cond).sample
    assert (want - plain).abs().max() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sd3_geometry_scheduler_checks_and_presets(tmp_path):
    """base_geometry reads transformer/ (sample_size x VAE factor; multiples of VAE factor x
    patch size); a flow scheduler with a dynamic shift is refused; an SD3 folder or hub id takes
    the sd3 preset (pipeline defaults 28 steps, CFG 7.0; SDXL's rank, lr, batches, thresholds)."""
    cfg = lpo.get_config(["--model", SD3_BASE, "--eval-samples", "0"])
    assert models.geometry(cfg.base, cfg.resolution) == (32, 8)
    cfg.resolution = 40
    assert models.geometry(cfg.base, cfg.resolution) == (40, 10)
    cfg.resolution = 36
    with pytest.raises(SystemExit, match="multiple of 8"):
        models.geometry(cfg.base, cfg.resolution)
    for name in ("stabilityai/stable-diffusion-3-medium-diffusers", "someone/sd3-finetune",
                 SD3_BASE):
        preset = lpo.preset_of(name)
        assert (preset["num_inference_steps"], preset["guidance_scale"], preset["lora_rank"],
                preset["th_min"], preset["base"]) == (28, 7.0, 64, 0.45, name), name
    sd35 = lpo.get_config(["--model", "sd35"])
    assert (sd35.num_inference_steps, sd35.guidance_scale, sd35.lora_rank) == (40, 4.5, 64)
    tiny = lpo.get_config(["--model", "tiny-sd3"])
    assert tiny.base.endswith(os.path.join("tiny", "sd3")) and tiny.lrm.endswith("lrm-sd3")
    assert tiny.threads == 1 and tiny.eval_samples > 0
    import shutil
    for part in ("transformer", "vae", "scheduler"):
        shutil.copytree(os.path.join(SD3_BASE, part), tmp_path / part,
                        ignore=shutil.ignore_patterns("*.safetensors"))
    config_path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_dynamic_shifting=True)))
    out = str(tmp_path / "out")
    bad = [(["--model", str(tmp_path), "--eval-samples", "0"], "use_dynamic_shifting"),
           (["--model", "tiny-sd3", "--base", SD3_BASE, "--resolution", "36"], "multiple of 8"),
           (["--model", "sd3", "--eval-samples", "10"], "eval.py")]
    for argv, word in bad:  # one line each, before any weight is read
        with pytest.raises(SystemExit) as stop:
            lpo.main(lpo.get_config([*argv, "--out", out]))
        message = str(stop.value)
        assert message.startswith("lpo.py: error:") and "\n" not in message, message
        assert word in message and not os.path.exists(out), message


# ----------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def sd3_lrm_folder(tmp_path_factory):
    """An untrained LRM on the tiny SD3 base: enough for the code paths (not for learning)."""
    from lrm_model import LatentRewardModel
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("lrm-sd3"))
    LatentRewardModel.from_base(SD3_BASE).save_pretrained(out)
    return out


def test_tiny_sd3_run_resumes_bitwise_keeps_no_pair_at_the_last_step(sd3_lrm_folder, tmp_path,
                                                                   monkeypatch):
    """lpo.main on the tiny SD3 world: 2 rounds in one go == 1 round, stop, --resume, 1 more
    (LoRA bitwise); no kept tuple comes from the last step (to x_0, std 0) even at thresholds 0,
    while every other step keeps all its groups; the LRM is told the child's level s' x 1000;
    --save_merged writes {out}/transformer; the built-in evaluation runs the SD3 pipeline."""
    seen = []
    sample = lpo.sample_tuples

    def sample_spy(*args):
        tuples, scores, seconds = sample(*args)
        seen.append(tuples)
        return tuples, scores, seconds
    monkeypatch.setattr(lpo, "sample_tuples", sample_spy)
    told = []
    from lrm_model import LatentRewardModel
    score = LatentRewardModel.score

    def score_spy(self, latents, timesteps, *args, **kwargs):
        told.append(timesteps[0].item())
        scores = score(self, latents, timesteps, *args, **kwargs)
        # no ties even among equal children: only not scoring it can drop the last step
        return scores + 1e-3 * torch.arange(len(scores))
    monkeypatch.setattr(LatentRewardModel, "score", score_spy)
    common = ["--model", "tiny-sd3", "--base", SD3_BASE, "--lrm", sd3_lrm_folder, "--num-prompts", "8",
              "--sample-batch-size", "4", "--train-batch-size", "16", "--th-min", "0",
              "--th-max", "0", "--ckpt-every", "1", "--num-inference-steps", "8",
              "--eval-samples", "0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    result = lpo.main(lpo.get_config([*common, "--out", a, "--max-rounds", "2", "--save-merged"]))
    schedule = lpo.make_schedule(json.load(open(os.path.join(SD3_BASE, "scheduler",
                                                              "scheduler_config.json"))),
                                 8, 0, 0, CPU)
    # 7 LRM calls a round: the deterministic last step (K equal children) is not scored
    assert told[:14] == pytest.approx(schedule.prev_timesteps.tolist()[:7] * 2)
    for tuples in seen:
        assert (tuples["t_prev"] > 0).all() and len(tuples["t"]) == 4 * 7  # 7 of 8 steps
    lpo.main(lpo.get_config([*common, "--out", b, "--max-rounds", "1"]))
    lpo.main(lpo.get_config([*common, "--out", b, "--max-rounds", "2", "--resume",
                             "--eval-samples", "4"]))
    ckpt_a, ckpt_b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert result["step"] == ckpt_a["step"] == ckpt_b["step"] > 1
    assert torch.equal(ckpt_a["lora"], ckpt_b["lora"])
    lora = lpo.LORA_FILE
    assert open(os.path.join(a, lora), "rb").read() == open(os.path.join(b, lora), "rb").read()
    rows = [row for row in read_log(a) if "round" in row]
    assert all(row["kept_frac"] == 1 for row in rows)  # of the scored steps: the last is not
    assert os.path.exists(os.path.join(a, "transformer", "config.json"))
    final = read_log(b)[-1]["final"]
    # 4 pairs: wins, ties and losses give a multiple of 1/8, inside its own bootstrap interval
    assert final["n"] == 4 and (final["win_rate"] * 8) % 1 == 0
    assert final["win_low"] <= final["win_rate"] <= final["win_high"]
    assert (final["match_base"] * 4) % 1 == 0 and (final["match_tuned"] * 4) % 1 == 0


def test_two_gloo_ranks_end_with_one_sd3_lora(sd3_lrm_folder, tmp_path):
    """torchrun, 2 CPU processes (gloo), tiny SD3: both ranks end with the same LoRA (~25 s, most
    of it two imports of torch and diffusers)."""
    import subprocess
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "lpo.py", "--model", "tiny-sd3", "--base", SD3_BASE, "--lrm", sd3_lrm_folder, "--out", out,
               "--num-prompts", "8", "--sample-batch-size", "4", "--train-batch-size", "16",
               "--th-min", "0", "--th-max", "0", "--num-inference-steps", "6", "--max-rounds", "1",
               "--eval-samples", "0"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_log(out)
    fingerprint = rows[-1]["final"]["lora_fingerprint"]
    assert rows[0]["tuples"] == 2 * 4 * 5 and rows[-1]["final"]["step"] >= 1  # 5 of 6 steps
    assert len(fingerprint) == 2 and fingerprint[0] == fingerprint[1]


# ============================================================================ FLUX: the tiny world (tiny/flux)
FLUX = os.path.join(ROOT, "tiny", "flux")


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(FLUX)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_flux_loads_as_flux_pipeline_and_samples_its_recorded_caption_match(flux):
    cfg = flux.transformer.config
    assert cfg.patch_size == 1 and cfg.in_channels == 4 * flux.vae.config.latent_channels  # 2x2 packed
    assert cfg.guidance_embeds and sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == flux.text_encoder.config.hidden_size  # CLIP's pooled output
    assert flux.transformer.dtype == torch.float32  # stored fp16, loaded fp32
    assert flux.tokenizer_2.model_max_length == T5_LEN
    assert RES % (2 * flux.vae_scale_factor) == 0  # 32 px: an 8x8 latent, 4x4 = 16 tokens
    sd3_vae = AutoencoderKL.from_pretrained(os.path.join(SD3, "vae"))  # the sd3 world's VAE
    assert (flux.vae.config.shift_factor, flux.vae.config.scaling_factor) == (
        sd3_vae.config.shift_factor, sd3_vae.config.scaling_factor)
    for (name, p), q in zip(flux.vae.state_dict().items(), sd3_vae.state_dict().values()):
        assert torch.equal(p, q), name
    world = json.load(open(os.path.join(ROOT, "tiny", "world.json")))
    # recomputed as the build did (same seeds, same count): the same number on this torch build
    match = make_world.caption_match(flux, n=300, cfg=world["flux_guidance_scale"])
    assert round(match, 4) == world["flux_caption_match"] and 0.55 <= match <= 0.85  # room for LPO
    # the pipeline sampled with the shift the training sigmas were drawn with (FLUX's dynamic mu)
    u = torch.linspace(1, 1 / 20, 20, dtype=torch.float64)
    shifted = make_world.shifted_sigma(u, world["flux_shift"])
    torch.testing.assert_close(flux.scheduler.sigmas[:-1].double(), shifted, atol=1e-4, rtol=0)
    assert world["flux_shift"] != 1.0 and flux.scheduler.config.use_dynamic_shifting


def test_make_world_flux_only_quick_build(tmp_path):
    from diffusers import FluxPipeline
    os.makedirs(tmp_path / "sd3")
    shutil.copytree(os.path.join(SD3, "vae"), tmp_path / "sd3" / "vae")
    json.dump({"kept": 1}, open(tmp_path / "world.json", "w"))
    make_world.main(make_world.get_args(["--flux-only", "--quick", "--out", str(tmp_path)]))
    info = json.load(open(tmp_path / "world.json"))
    assert info["kept"] == 1 and info["flux_steps"] == 10  # earlier keys kept
    assert set(os.listdir(tmp_path)) == {"sd3", "flux", "world.json"}  # nothing else rebuilt
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "flux"))
    # the quick build's caption match, recomputed on the saved folder (fp16 on disk)
    pipe.set_progress_bar_config(disable=True)
    match = make_world.caption_match(pipe, n=30, cfg=info["flux_guidance_scale"])
    assert round(match, 4) == info["flux_caption_match"]


def test_tiny_flux_transformer_predicts_the_velocity_of_held_out_drawings(flux):
    """The rectified-flow loss on fresh drawings: far below a freshly initialised transformer of
    the same config (the control), and below the shipped one given the wrong captions."""
    from diffusers import FluxTransformer2DModel
    rng = np.random.default_rng(321)  # fresh drawings, not the training ones
    drawn = [random_drawing(rng) for _ in range(256)]
    z = make_world.encode_means(flux.vae, [image for image, _ in drawn])  # (256, 4, 8, 8)
    x0 = (z - flux.vae.config.shift_factor) * flux.vae.config.scaling_factor
    captions = torch.tensor([CAPTIONS.index(caption) for _, caption in drawn])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    sigma = make_world.shifted_sigma(torch.sigmoid(torch.randn(len(x0), generator=g)),
                                     make_world.flux_shift(flux)[1])
    xs = make_world.rectified_flow_sample(x0, noise, sigma)
    target = make_world.rectified_flow_target(x0, noise)
    velocity = make_world.flux_velocity(flux)
    torch.manual_seed(0)
    fresh = FluxTransformer2DModel.from_config(flux.transformer.config).eval()
    wrong = (captions + torch.randint(1, len(CAPTIONS), captions.shape, generator=g)) % len(CAPTIONS)
    losses = {}
    with torch.no_grad():
        for name, model, caption_index in [("trained", flux.transformer, captions),
                                           ("fresh", fresh, captions),
                                           ("wrong captions", flux.transformer, wrong)]:
            pred = velocity(model, xs, sigma, caption_index, torch.Generator().manual_seed(1))
            losses[name] = torch.nn.functional.mse_loss(pred, target).item()
    print(losses)
    assert losses["trained"] < 0.25 * losses["fresh"], losses
    assert losses["trained"] < 0.6 * losses["wrong captions"], losses


# ----------------------------------------------------------------------------- tiny/ablations.py
def test_ablations_curve_agrees_with_independent_paths(tmp_path):
    """tiny/ablations.py --quick --rows curve (64 test pairs, t = 1, 501, 951): its LRM accuracies are
    lrm.pair_accuracy's on the same pairs (the same noise: the curve's latents are that function's);
    the pixel reward at t = 1 agrees with the judge on the VAE-decoded clean latents (the x0 it
    predicts there is that latent, nearly), and at t = 951 it is nearer chance than at t = 1."""
    from tiny import ablations
    results = ablations.main(["--quick", "--docs", str(tmp_path), "--runs", str(tmp_path),
                              "--rows", "curve"])
    curve = results["curve"]
    shipped = M.LatentRewardModel.from_pretrained(ablations.SHIPPED_LRM, base=ablations.BASE)
    pairs = L.load_pairs(ablations.DATA, "test_unique")
    oracle = L.pair_accuracy(shipped.for_scoring(), pairs, ablations.QUICK_LEVELS, max_pairs=64)
    for t in ablations.QUICK_LEVELS:
        assert curve["lrm"][str(t)] == pytest.approx(oracle["decisive"][t], abs=1e-9), t
    decoded = curve["clean"]["judge, VAE-decoded clean latents"]
    assert abs(curve["pixel"]["1"] - decoded) <= 2 / curve["decisive"]  # a pair or two at most
    assert abs(curve["pixel"]["951"] - 0.5) < abs(curve["pixel"]["1"] - 0.5)
    assert curve["cost"]["pixel_over_lrm"] > 1  # a decode and a CFG pass cost more than half a U-Net
    # equal scores earn half a pair (blank x0-predictions at high t); ties in the labels count none
    scores = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.0, 3.0])
    right, decisive = ablations.credit(scores, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]))
    assert (right.item(), decisive.item()) == (1.5, 2)
    assert os.path.exists(tmp_path / "ablations.png") and "| t | 1 | 501 | 951 |" in open(
        tmp_path / "ablations.md").read()


def test_ablations_judge_reward_runs_inside_lpo_sampling():
    """The pixel reward through lpo.sample_tuples (K children a prompt, its text rows repeated by
    take_rows): every score is scale x the judge's human score of the decoded x0-prediction of that
    child under its own caption (scored again with the prompts spelled out), and the x0-prediction
    is diffusers' DDIMScheduler.step's pred_original_sample (an independent oracle)."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler
    from tiny import ablations
    reward = ablations.JudgeReward(scale=2.0)
    pipe = reward.pipe
    prompts = ["a red circle", "a blue square", "a red circle"]
    calls = []
    score = reward.score

    def recorded(latents, t, text):
        calls.append((latents.clone(), t.clone(), score(latents, t, text=text)))
        return calls[-1][2]
    reward.score = recorded
    cfg = SimpleNamespace(num_children=4, guidance_scale=5.0, eta=1.0, lrm_t="child", negate_reward=False,
                          continuation="random")
    schedule = lpo.make_schedule(pipe.scheduler.config, 3, 0.1, 0.2, "cpu", 8)
    cond = models.encode_for_cfg(pipe, prompts, 32)
    text = reward.encode_text(prompts)
    _, scores, _ = lpo.sample_tuples(pipe.unet, reward, cond, text, torch.arange(3), schedule, cfg,
                                     torch.Generator().manual_seed(0))
    assert len(calls) == 3 and scores.shape == (9, 4)
    children = [prompt for prompt in prompts for _ in range(4)]
    for latents, t, scored in calls:
        again = score(latents, t, prompts=children)
        assert torch.equal(scored, again)
        assert len(set(scored.tolist())) > 1  # the children differ
    latents, t, _ = calls[1]
    context = models.uncond_then_cond(text["uncond"], text["cond"]["encoder_hidden_states"])
    eps = models.guided_prediction(pipe.unet, latents[:3], t[:3], dict(encoder_hidden_states=context),
                                   5.0)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    oracle = scheduler.step(eps, int(t[0]), latents[:3]).pred_original_sample
    torch.testing.assert_close(ablations.predicted_x0(eps, latents[:3], t[:3], reward.alphas_cumprod),
                               oracle, rtol=1e-5, atol=1e-5)


def test_ablations_rows_are_cached_and_plug_in_their_changes(tmp_path, monkeypatch):
    """A row's result is read back from the json, not run again (lpo.main is called once for two
    runs of the script), --redo runs it again; the pixel row runs lpo.py with the judge in the
    LRM's place and the t750 row with no pair below t = 750, both restored afterwards."""
    from tiny import ablations
    seen = []

    def fake_main(cfg):
        os.makedirs(cfg.out)
        config = DiffusionPipeline.load_config(cfg.base, subfolder="scheduler")
        schedule = lpo.make_schedule(config, 20, cfg.th_min, cfg.th_max, "cpu")  # as lpo.add_policy
        reward = lpo.load_lrm(cfg.lrm, cfg.base, "cpu", torch.float32, "")
        seen.append((os.path.basename(cfg.out), schedule, reward))
        with open(os.path.join(cfg.out, "log.jsonl"), "w") as log:
            log.write(json.dumps(dict(round=0, tuples=3, kept_frac=0.5, lrm_gap=1.0, sec_score=1,
                                      sec_sample=1)) + "\n")
        return dict(win_rate=0.6, win_low=0.5, win_high=0.7, n=20, match_base=0.7, match_tuned=0.8,
                    step=1)
    monkeypatch.setattr(lpo, "main", fake_main)
    load_lrm, make_schedule = lpo.load_lrm, lpo.make_schedule
    with open(tmp_path / "ablations.json", "w") as done:  # a curve row done: the pixel row's scale
        cost = dict(seconds_per_image=dict(lrm=1.0), pixel_over_lrm=2.0, batch=1, t=1, repeats=1, threads=1)
        curve = dict(levels=[1], pairs=1, decisive=1, lrm={"1": 1.0}, pixel={"1": 1.0}, cost=cost,
                     clean={"judge, clean images": 1.0}, judge_scale=1.5)
        json.dump(dict(rows=dict(curve=curve)), done)
    argv = ["--quick", "--docs", str(tmp_path), "--runs", str(tmp_path)]
    results = ablations.main(argv + ["--rows", "full-s0,pixel-s0,t750-s0"])
    assert [name for name, *_ in seen] == ["full-s0", "pixel-s0", "t750-s0"]
    assert results["full-s0"]["win_rate"] == 0.6 and results["full-s0"]["kept_frac"] == 0.5
    rewards = {name: reward for name, _, reward in seen}
    assert isinstance(rewards["pixel-s0"], ablations.JudgeReward) and rewards["pixel-s0"].scale == 1.5
    assert isinstance(rewards["full-s0"], M.LatentRewardModel)
    thresholds = {name: schedule.thresholds for name, schedule, _ in seen}
    window = seen[2][1].timesteps >= 750
    assert torch.equal(thresholds["t750-s0"][window], thresholds["full-s0"][window])
    assert (thresholds["t750-s0"][~window] == 1).all() and (thresholds["full-s0"] < 1).all()
    assert (lpo.load_lrm, lpo.make_schedule) == (load_lrm, make_schedule)
    ablations.main(argv + ["--rows", "full-s0,pixel-s0,t750-s0"])
    assert len(seen) == 3  # all three read back
    ablations.main(argv + ["--rows", "full-s0", "--redo", "full-s0"])
    assert [name for name, *_ in seen] == ["full-s0", "pixel-s0", "t750-s0", "full-s0"]
