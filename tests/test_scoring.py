"""The scorers: the shapes judge's parts against the shapes generator's own labels (real behaviour), and clip-dino's
plumbing with tiny random CLIP / SigLIP / DINOv2 models built from transformers configs (nothing downloaded)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sdlora.errors import ConfigError, DataError, ModelError
from sdlora.paths import default_model_path
from sdlora.scoring.base import Scores, Shots, has_trigger, without_trigger
from sdlora.scoring.make import make_scorer
from sdlora.world import shapes


def draw(shape, colour, seed):
    return shapes.render(shape, colour, random.Random(seed))


# ---------------------------------------------------------------- shapes scorer: the judge against the generator


@pytest.mark.parametrize("concept", ["star", "heart", "circle", "diamond"])
def test_shapes_scorer_reads_any_concept_off_the_training_images(concept):
    scorer = make_scorer("shapes", trigger="sks")
    training = [draw(concept, c, i) for i, c in enumerate(shapes.COLOURS)]
    line = scorer.reference(training)
    assert scorer.concept == concept and f"'{concept}'" in line
    named = make_scorer("shapes", trigger="sks", concept="cross")
    assert "as the job names it" in named.reference(training) and named.concept == "cross"


def test_shapes_scorer_parts_match_the_generator_labels():
    scorer = make_scorer("shapes", trigger="sks")
    training = [draw("star", c, i) for i, c in enumerate(shapes.COLOURS)]
    scorer.reference(training)
    colours = list(shapes.COLOURS)[:4]
    prompts = [f"a {c} sks" for c in colours] + ["a blue circle", "a red square", "a shape"]
    concept = [True] * 4 + [False] * 3
    # two stars in the asked colour, one star in another colour, one circle; the world prompts: right, wrong, and
    # a prompt the judge cannot parse (scored by agreement with the base model's image)
    images = [draw("star", colours[0], 100), draw("star", colours[1], 101), draw("star", "green", 102),
              draw("circle", colours[3], 103), draw("circle", "blue", 104), draw("triangle", "red", 105),
              draw("square", "yellow", 106)]
    base = [None] * 4 + [draw("circle", "blue", 7), draw("square", "red", 8), draw("square", "yellow", 9)]
    s = scorer.score(Shots(prompts, concept, images, base))
    assert s.likeness == 3 / 4  # three of the four trigger images are stars
    assert s.adherence == 3 / 6  # right shape and colour: 2 stars + the blue circle (the unparsable one: no claim)
    assert s.preservation == 2 / 3  # right circle, wrong square, agreeing with its base image
    assert s.copying < 0.9
    copied = scorer.score(Shots(prompts[:1], [True], [training[3]]))
    assert copied.copying == pytest.approx(1.0, abs=1e-5) and copied.preservation is None


def test_combined_score_is_the_weighted_mean_minus_copying():
    s = Scores(likeness=0.5, adherence=0.25, preservation=1.0, copying=0.8)
    w = {"likeness": 2.0, "adherence": 1.0, "preservation": 1.0, "copying": 0.5}
    assert s.combined(w) == pytest.approx((2 * 0.5 + 0.25 + 1.0 - 0.5 * 0.8) / 4)
    partial = Scores(adherence=0.25, preservation=1.0)  # no concept prompt: likeness not measured, not counted
    assert partial.combined(w) == pytest.approx((0.25 + 1.0) / 2)
    assert math.isnan(Scores().combined(w))


def test_trigger_matching_is_by_whole_words():
    assert has_trigger("a red sks, smiling", "sks") and not has_trigger("a red sksx", "sks")
    assert has_trigger("photo of <s1> dog", "<s1>") and not has_trigger("", "sks") and not has_trigger("sks", "")
    assert without_trigger("sks, a man, smiling", "sks") == "a man, smiling"
    assert without_trigger("a photo of sks dog", "sks") == "a photo of dog"


def test_shapes_scorer_errors_are_one_line():
    with pytest.raises(ConfigError, match="not a class the judge knows"):
        make_scorer("shapes", trigger="sks", concept="blob")
    with pytest.raises(DataError, match="--judge-concept"):
        make_scorer("shapes", trigger="sks").reference([])


# ---------------------------------------------------------------- clip-dino: tiny random models from configs


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    """Tiny CLIP, SigLIP and DINOv2 folders (config, weights, image processor, tokenizer), random weights."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    root = tmp_path_factory.mktemp("scorers")
    tok = CLIPTokenizer.from_pretrained(default_model_path() / "tokenizer")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    made = {"clip": (CLIPModel(CLIPConfig(text_config={**text, "bos_token_id": tok.bos_token_id,
                                                       "eos_token_id": tok.eos_token_id},
                                          vision_config=vision, projection_dim=16)),
                     CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
            "siglip": (SiglipModel(SiglipConfig(text_config=text, vision_config=vision)),
                       SiglipImageProcessor(size={"height": 32, "width": 32})),
            "dino": (Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              mlp_ratio=2, image_size=32, patch_size=8)),
                     BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))}
    out = {}
    for name, (model, processor) in made.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        if name != "dino":
            tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_clip_dino_scores_are_the_published_formulas(tiny_scorers, no_network):
    from transformers import AutoImageProcessor, AutoModel

    scorer = make_scorer("clip-dino", trigger="sks", clip_model=tiny_scorers["clip"],
                         dino_model=tiny_scorers["dino"])
    training = [draw("star", c, i) for i, c in enumerate(list(shapes.COLOURS)[:3])]
    scorer.reference(training)
    images = [draw("star", "red", 50), draw("circle", "blue", 51), draw("square", "green", 52)]
    base = [None, draw("circle", "blue", 51), draw("circle", "green", 53)]
    prompts = ["a red sks", "a blue circle", "a green square"]
    s = scorer.score(Shots(prompts, [True, False, False], images, base))

    # the reference: the models' own features, cosine similarities written out (DreamBooth's DINO and CLIP-T)
    dino, dproc = AutoModel.from_pretrained(tiny_scorers["dino"]), AutoImageProcessor.from_pretrained(
        tiny_scorers["dino"])
    clip, cproc = AutoModel.from_pretrained(tiny_scorers["clip"]), AutoImageProcessor.from_pretrained(
        tiny_scorers["clip"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_scorers["clip"])
    with torch.no_grad():
        def d(ims):
            return F.normalize(dino(pixel_values=dproc(images=ims, return_tensors="pt").pixel_values).pooler_output,
                               dim=-1)
        ci = F.normalize(clip.get_image_features(pixel_values=cproc(images=images, return_tensors="pt")
                                                 .pixel_values).pooler_output, dim=-1)
        ids = tok(["a red", "a blue circle", "a green square"], padding=True, return_tensors="pt")
        ct = F.normalize(clip.get_text_features(**ids).pooler_output, dim=-1)
        ref, made = d(training), d(images[:1])
        assert s.likeness == pytest.approx((made @ ref.T).mean().item(), abs=1e-5)
        assert s.copying == pytest.approx((made @ ref.T).max().item(), abs=1e-5)
        assert s.preservation == pytest.approx(((d(images[1:]) * d(base[1:])).sum(-1)).mean().item(), abs=1e-5)
        assert s.adherence == pytest.approx((ci * ct).sum(-1).mean().item(), abs=1e-5)
    same = scorer.score(Shots(["a red sks", "a circle"], [True, False], [training[1], images[1]],
                              [None, images[1]]))
    assert same.copying == pytest.approx(1.0, abs=1e-5) and same.preservation == pytest.approx(1.0, abs=1e-5)


def test_siglip_and_clip_image_embeddings_as_the_image_model(tiny_scorers, no_network):
    scorer = make_scorer("clip-dino", trigger="sks", clip_model=tiny_scorers["siglip"], dino_model="clip")
    assert scorer.dino is scorer.clip  # likeness, preservation and copying from SigLIP's image embeddings
    scorer.reference([draw("star", "red", 1)])
    s = scorer.score(Shots(["a red sks", "a blue circle"], [True, False], [draw("star", "red", 2),
                                                                          draw("circle", "blue", 3)],
                           [None, draw("circle", "blue", 3)]))
    assert all(math.isfinite(v) for v in s.parts().values()) and len(s.parts()) == 4
    assert s.preservation == pytest.approx(1.0, abs=1e-5)


def test_a_missing_model_is_one_line_saying_how_to_get_it(tiny_scorers, tmp_path, no_network):
    with pytest.raises(ModelError) as e:
        make_scorer("clip-dino", trigger="sks", clip_model="someone/no-such-clip", dino_model=tiny_scorers["dino"])
    assert "hf download someone/no-such-clip" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="no such model folder"):
        make_scorer("clip-dino", trigger="sks", clip_model=tiny_scorers["clip"], dino_model=str(tmp_path / "none"))
    with pytest.raises(ModelError, match="not a text-image model"):
        make_scorer("clip-dino", trigger="sks", clip_model=tiny_scorers["dino"], dino_model="clip")
