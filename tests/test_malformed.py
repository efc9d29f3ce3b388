"""Malformed input, table-driven: every case ends as a one-line error that says what to fix, or as a documented
accepted result; never a traceback, never a silent success. Grow the table whenever a new case is found.

Each case runs the real entry point (`sdlora ...` through `main`, or the UI's own functions) on prepared files: job
files, flags, image folders, models, LoRA files, output paths and browser-given paths."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import draw_images

from sdlora.cli import main
from sdlora.config import SECTIONS, DataFolder, iter_options


@dataclass
class Case:
    id: str
    argv: list  # strings; "{name}" is replaced by a prepared file or folder
    says: str = ""  # the one-line error must contain this; empty: the command must succeed
    files: dict = field(default_factory=dict)  # extra files to write: name -> text
    check: object = None  # for accepted results: fn(paths) -> None


# ---------------------------------------------------------------- job files, generated from the config tree

TYPE_OF = {"int": 3, "float": 0.5, "str": "x", "bool": True, "list": ["x"]}
WRONG = {"int": '"three"', "float": '"half"', "str": "12", "bool": '"yes"', "list": "7"}


def _toml_value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return json.dumps(v)


def job(section: str, key: str, value_toml: str) -> str:
    """A valid job file with one key set to a raw TOML value (replacing the valid one where there is one)."""
    tables = {"model": {"path": '"{model}"'}, "augment": {"resolution": "32"},
              "output": {"path": '"{out}/x.safetensors"'}, "data": {"path": '"{images}"', "prompt": '"a sks"'}}
    tables.setdefault(section, {})[key] = value_toml
    return "".join(f"[{'[data]' if name == 'data' else name}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                   for name, kv in tables.items())


def config_cases() -> list[Case]:
    cases = []
    for section, f in iter_options():
        name = f"{section}.{f.name}"
        cases.append(Case(f"type {name}", ["train", "{job}"], "must be", {"job": job(section, f.name, WRONG[f.type])}))
        if f.metadata.get("choices"):
            cases.append(Case(f"choice {name}", ["train", "{job}"], "must be one of",
                              {"job": job(section, f.name, '"not-a-choice"')}))
        for kind, bound in (f.metadata.get("bounds") or {}).items():
            bad = {"ge": bound - 1, "gt": bound, "le": bound + 1, "lt": bound}[kind]
            if f.type == "float" and kind in ("ge", "le"):
                bad = bound + (-0.5 if kind == "ge" else 0.5)
            cases.append(Case(f"bound {name} {kind} {bound}", ["train", "{job}"], "must be",
                              {"job": job(section, f.name, _toml_value(bad))}))
        if f.type == "float":
            for v in (float("nan"), float("inf")):
                cases.append(Case(f"{v} {name}", ["train", "{job}"], "finite",
                                  {"job": job(section, f.name, _toml_value(v))}))
    return cases


JOB_FILES = [
    Case("invalid toml", ["train", "{job}"], "invalid TOML", {"job": "[lora\nrank = 4\n"}),
    Case("missing job file", ["train", "{tmp}/nope.toml"], "config file not found"),
    Case("unknown section", ["train", "{job}"], "unknown section 'lroa'", {"job": "[lroa]\nrank = 4\n"}),
    Case("unknown key", ["train", "{job}"], "unknown key 'lora.rnak'", {"job": "[lora]\nrnak = 4\n"}),
    Case("section not a table", ["train", "{job}"], "[lora] must be a table", {"job": "lora = 4\n"}),
    Case("data not a table", ["train", "{job}"], "data[0] must be a table", {"job": "data = [1]\n"}),
    Case("data without path", ["train", "{job}"], "data[0].path is empty",
         {"job": '[model]\npath = "{model}"\n[[data]]\nprompt = "a"\n'}),
    Case("config_version string", ["train", "{job}"], "config_version must be a whole number",
         {"job": 'config_version = "1"\n'}),
    Case("config_version float", ["train", "{job}"], "config_version must be a whole number",
         {"job": "config_version = 1.5\n"}),
    Case("config_version newer", ["train", "{job}"], "newer than this sdlora", {"job": "config_version = 9\n"}),
    Case("sample prompts not strings", ["train", "{job}"], "must be a list of strings",
         {"job": job("sample", "prompts", "[1, 2]")}),
    Case("no data", ["train", "{job}"], "no training data", {"job": '[model]\npath = "{model}"\n'}),
    Case("output not safetensors", ["train", "{job}"], "must end in .safetensors",
         {"job": job("output", "path", '"{out}/x.ckpt"')}),
    Case("queue missing", ["train", "--queue", "{tmp}/q.txt"], "queue file not found"),
    Case("queue names a missing job", ["train", "--queue", "{queue}"], "config file not found",
         {"queue": "missing.toml\n"}),
    Case("two jobs, one output", ["train", "{job}", "{job2}"], "both write",
         {"job": job("lora", "rank", "4"), "job2": job("lora", "rank", "8")}),
    Case("pivotal with zero steps and no ti", ["train", "{job}"], "train.max_steps must be > 0",
         {"job": job("train", "max_steps", "0")}),
    Case("pivotal token with spaces", ["train", "{job}"], "one word", {"job": job("pivotal", "token", '"a b"')}),
    Case("prior images without folder", ["train", "{job}"], "needs prior.class_data",
         {"job": job("prior", "class_prompt", '"a dog"')}),
    Case("no class images", ["train", "{job}"], "no class images in",
         {"job": job("prior", "class_prompt", '"a dog"\nclass_data = "{tmp}/empty"')}),
    Case("class folder without prompt", ["train", "{job}"], "class_prompt is empty",
         {"job": job("prior", "class_data", '"{tmp}"')}),
    Case("resolution not multiple of 8", ["train", "{job}"], "multiple of 8",
         {"job": job("augment", "resolution", "100")}),
    Case("blocks not a range", ["train", "{job}"], "'a-b' is not a block number or range",
         {"job": job("lora", "blocks", '"a-b"')}),
    Case("blocks backwards", ["train", "{job}"], "'5-2' is not a block number or range",
         {"job": job("lora", "blocks", '"5-2"')}),
    Case("mode_scale without mode", ["train", "{job}"], "mode_scale applies to timestep_sampling mode only",
         {"job": job("train", "mode_scale", "1.0")}),
]

FLAGS = [Case(f"flag {flag} {value}", ["train", "--model", "{model}", "--data", "{images}", "--output",
                                       "{out}/f.safetensors", flag, value], says)
         for flag, value, says in [
             ("--max-grad-norm", "-1", "max_grad_norm must be >= 0"), ("--warmup-steps", "-5", "must be >= 0"),
             ("--sample-every", "-1", "must be >= 0"), ("--seed", "-1", "seed must be >= 0"),
             ("--weight-decay", "-1", "must be >= 0"), ("--sample-steps", "0", "must be > 0"),
             ("--rank", "0", "must be > 0"), ("--rank", "abc", "invalid int value"),
             ("--lr", "0", "must be > 0"), ("--lr", "nan", "finite"), ("--lr", "inf", "finite"),
             ("--resolution", "500", "multiple of 8"), ("--batch-size", "0", "must be > 0"),
             ("--lora-dropout", "1", "must be < 1"), ("--caption-dropout", "1.5", "must be < 1"),
             ("--mixed-precision", "fp8", "invalid choice"), ("--targets", "everything", "invalid choice"),
             ("--seed", "99999999999", "seed must be <= 4294967295"), ("--save-every", "-2", "must be >= 0"),
             ("--data", "", "data[0].path is empty"), ("--data", "{tmp}/nope", "data folder not found"),
             ("--data", "{afile}", "data folder not found"),
             ("--model", "{tmp}/nope.safetensors", "model not found"),
             ("--output", "{out}/x.ckpt", "must end in .safetensors"),
             ("--output", "{folder_named_safetensors}", "a folder of that name exists"),
             ("--output", "{afile}/x.safetensors", "is a file, not a folder"),
             ("--mixed-precision", "fp16", "fp16 needs a CUDA GPU"),
         ]]
FLAGS += [Case("unknown flag", ["train", "--rnak", "4"], "unrecognized arguments"),
          Case("unknown command", ["trian"], "invalid choice"), Case("no command", [], "required: command")]

# ---------------------------------------------------------------- data and models (these load the tiny model)

TRAIN = ["train", "--model", "{model}", "--resolution", "32", "--max-steps", "1", "--output", "{out}/d.safetensors"]
DATA = [
    Case("empty folder", TRAIN + ["--data", "{empty}"], "no readable images"),
    Case("only non-images", TRAIN + ["--data", "{notes}"], "no readable images"),
    Case("only broken images", TRAIN + ["--data", "{broken}"], "no readable images"),
    Case("broken among good: skipped by name, trains", TRAIN + ["--data", "{mixed}", "--instance-prompt", "a"], "",
         check=lambda p: (Path(p["out"]) / "d.safetensors").is_file()),
    Case("model is a LoRA file", ["train", "--model", "{lora}", "--data", "{images}", "--output",
                                  "{out}/m.safetensors"], "a LoRA, not a base model"),
    Case("model is random bytes", ["train", "--model", "{junk}", "--data", "{images}", "--output",
                                   "{out}/m.safetensors"], "not a readable .safetensors"),
    Case("model folder without unet", ["train", "--model", "{empty}", "--data", "{images}", "--output",
                                       "{out}/m.safetensors"], "not a diffusers model folder"),
    Case("model is a pickle", ["train", "--model", "{ckpt}", "--data", "{images}", "--output",
                               "{out}/m.safetensors"], "pickles that can run code"),
    Case("model is non-standard single file", ["train", "--model", "{nonstandard}", "--data", "{images}",
                                               "--output", "{out}/m.safetensors"], "not divisible by the 32"),
    Case("hub id offline", ["train", "--model", "someone/some-model", "--data", "{images}", "--output",
                            "{out}/m.safetensors"], "hub is not reachable"),
    Case("pivotal trigger in no caption", TRAIN + ["--data", "{images}", "--pivotal-token", "<s9>",
                                                   "--pivotal-trigger", "zzz"], "contains the trigger 'zzz'"),
]
SD3 = ["train", "--model", "{sd3}", "--resolution", "32", "--max-steps", "1", "--output", "{out}/s.safetensors",
       "--data", "{images}"]
DATA += [
    Case("sd3 without T5 and without --no-t5", SD3, "has no text_encoder_3/ (T5): pass --no-t5"),
    Case("sd3 min-snr", SD3 + ["--no-t5", "--min-snr-gamma", "5"], "is for noise (epsilon/v) prediction"),
    Case("sd3 cross_attn", SD3 + ["--no-t5", "--targets", "cross_attn"], "is not a preset of Stable Diffusion 3"),
    Case("sd3 block out of range", SD3 + ["--no-t5", "--blocks", "0-9"], "block 9 does not exist"),
    Case("sd3 loha", SD3 + ["--no-t5", "--network", "loha"], "trains plain LoRA"),
    Case("sd3 zero terminal snr", SD3 + ["--no-t5", "--zero-terminal-snr"], "train.zero_terminal_snr is for noise"),
    Case("sd1 with sd3 loss weights", TRAIN + ["--data", "{images}", "--flow-weighting", "cosmap"],
         "flow_weighting applies to flow matching"),
    Case("sd3 single file without text encoders", ["train", "--model", "{sd3_bare}", "--data", "{images}",
                                                   "--output", "{out}/m.safetensors"],
         "has no CLIP-L text encoder: pass --text-encoders FOLDER"),
    Case("sd3 single file of a custom size", ["train", "--model", "{sd3_headerless}", "--data", "{images}", "--output",
                                              "{out}/m.safetensors"], "which no standard SD3 attention-head width"),
    Case("flux single file", ["train", "--model", "{flux}", "--data", "{images}", "--output", "{out}/m.safetensors"],
         "Flux and other transformers are not supported"),
    Case("flux folder", ["train", "--model", "{flux_folder}", "--data", "{images}", "--output",
                         "{out}/m.safetensors"], "FluxTransformer2DModel (FluxPipeline): not supported"),
]

# ---------------------------------------------------------------- LoRA files and tools

LORAS = ["nan", "inf", "zero", "junk_lora", "empty_file", "no_tensors", "unknown_key", "no_up", "tucker",
         "bad_adapter_meta", "pickle_lora", "xl", "sd3_lora"]
TOOL_ON = {  # argv builders for a LoRA file
    "inspect": lambda f: ["inspect", f],
    "convert": lambda f: ["convert", f, "--to", "diffusers", "-o", "{out}/c.safetensors"],
    "merge": lambda f: ["merge", "--model", "{model}", "--lora", f, "-o", "{out}/merged"],
    "mix": lambda f: ["mix", f, "-o", "{out}/mix.safetensors"],
    "resize": lambda f: ["resize", f, "--rank", "1", "-o", "{out}/r.safetensors"],
    "generate": lambda f: ["generate", "--model", "{model}", "--lora", f, "--prompt", "a", "--steps", "1",
                           "--width", "32", "--height", "32", "-o", "{out}/gen"],
}
SAYS = {"nan": "NaN or infinite", "inf": "NaN or infinite", "zero": "changes nothing",
        "junk_lora": "not a readable safetensors", "empty_file": "not a readable safetensors",
        "no_tensors": "holds no LoRA module", "unknown_key": "in no LoRA layout", "no_up": "lacks its up",
        "tucker": "Tucker", "bad_adapter_meta": "not valid JSON", "pickle_lora": "only .safetensors",
        "xl": "match no layer of the model", "sd3_lora": "match no layer of the model"}


def tool_cases() -> list[Case]:
    cases = []
    for lora in LORAS:
        for tool, argv in TOOL_ON.items():
            if tool == "inspect" and lora not in ("junk_lora", "empty_file", "pickle_lora"):
                continue  # inspect reports these as problems instead (test_reliability, test_layouts)
            if lora in ("xl", "sd3_lora") and tool not in ("merge", "generate"):
                continue  # a valid file, just for another model
            cases.append(Case(f"{tool} {lora}", argv("{" + lora + "}"), SAYS[lora]))
    cases.append(Case("missing lora file", ["inspect", "{tmp}/nope.safetensors"], "LoRA file not found"))
    return cases


TOOLS = tool_cases() + [
    Case("merge weight nan", ["merge", "--model", "{model}", "--lora", "{lora}:nan", "-o", "{out}/m"], "not a finite"),
    Case("merge weight 1e400", ["merge", "--model", "{model}", "--lora", "{lora}:1e400", "-o", "{out}/m"],
         "not a finite"),
    Case("mix weight inf", ["mix", "{lora}:inf", "-o", "{out}/m.safetensors"], "not a finite"),
    Case("merge without --lora", ["merge", "--model", "{model}", "-o", "{out}/m"], "required: --lora"),
    Case("mix rank 0", ["mix", "{lora}", "--rank", "0", "-o", "{out}/m.safetensors"], "at least 1"),
    Case("mix rank -3", ["mix", "{lora}", "--rank", "-3", "-o", "{out}/m.safetensors"], "at least 1"),
    Case("mix sd1 and sdxl", ["mix", "{lora}", "{xl}", "-o", "{out}/m.safetensors"], "different model families"),
    Case("mix sd1 and sd3", ["mix", "{lora}", "{sd3_lora}", "-o", "{out}/m.safetensors"], "different model families"),
    Case("sd1 lora into sd3", ["merge", "--model", "{sd3}", "--lora", "{lora}", "-o", "{out}/m"],
         "match no layer of the model"),
    Case("resize above rank", ["resize", "{lora}", "--rank", "64", "-o", "{out}/r.safetensors"], "above the LoRA"),
    Case("resize rank 0", ["resize", "{lora}", "--rank", "0", "-o", "{out}/r.safetensors"], "at least 1"),
    Case("resize energy 0", ["resize", "{lora}", "--keep-energy", "0", "-o", "{out}/r.safetensors"], "(0, 1]"),
    Case("resize energy 1.5", ["resize", "{lora}", "--keep-energy", "1.5", "-o", "{out}/r.safetensors"], "(0, 1]"),
    Case("resize both", ["resize", "{lora}", "--rank", "1", "--keep-energy", ".5", "-o", "{out}/r.safetensors"],
         "not allowed with argument --rank"),
    Case("resize neither", ["resize", "{lora}", "-o", "{out}/r.safetensors"], "one of the arguments --rank"),
    Case("convert nothing to do", ["convert", "{lora}", "-o", "{out}/c.safetensors"], "say what to change"),
    Case("convert to bogus", ["convert", "{lora}", "--to", "a1111", "-o", "{out}/c.safetensors"], "invalid choice"),
    Case("convert onto itself", ["convert", "{lora}", "--to", "kohya", "-o", "{lora}", "--overwrite"],
         "is also an input"),
    Case("output exists", ["resize", "{lora}", "--rank", "1", "-o", "{lora2}"], "pass --overwrite"),
    Case("merge onto the model", ["merge", "--model", "{nonstandard}", "--lora", "{lora}", "-o", "{nonstandard}",
                                  "--overwrite"], "is also an input"),
    Case("merge pickle model", ["merge", "--model", "{ckpt}", "--lora", "{lora}", "-o", "{out}/m"], "--allow-pickle"),
    Case("generate n 0", ["generate", "--model", "{model}", "--prompt", "a", "--n", "0", "-o", "{out}/g"],
         "--n must be at least 1"),
    Case("generate steps 0", ["generate", "--model", "{model}", "--prompt", "a", "--steps", "0", "-o", "{out}/g"],
         "--steps must be at least 1"),
    Case("generate width 63", ["generate", "--model", "{model}", "--prompt", "a", "--width", "63", "-o", "{out}/g"],
         "multiples of"),
    Case("generate width 4", ["generate", "--model", "{model}", "--prompt", "a", "--width", "4", "-o", "{out}/g"],
         "at least 8"),
    Case("generate guidance -1", ["generate", "--model", "{model}", "--prompt", "a", "--guidance", "-1", "-o",
                                  "{out}/g"], "--guidance must be"),
    Case("generate scales nan", ["generate", "--model", "{model}", "--prompt", "a", "--grid", "--scales", "0,nan",
                                 "-o", "{out}/g"], "finite"),
    Case("generate unknown scheduler", ["generate", "--model", "{model}", "--prompt", "a", "--steps", "1",
                                        "--scheduler", "warp9", "-o", "{out}/g"], "unknown scheduler"),
    Case("extract rank 0", ["extract", "--base", "{model}", "--tuned", "{model}", "--rank", "0", "-o",
                            "{out}/x.safetensors"], "at least 1"),
    Case("extract identical models", ["extract", "--base", "{model}", "--tuned", "{model}", "--rank", "2", "-o",
                                      "{out}/x.safetensors"], "nothing to extract"),
    Case("eval unknown concept", ["eval", "{lora}", "--trigger", "sks", "--concept", "dragon", "--n", "1"],
         "is not a shape the judge knows"),
    Case("ui share without auth", ["ui", "--share"], "give --auth"),
    Case("ui empty auth", ["ui", "--auth", ""], "USER:PASSWORD"),
    Case("ui auth without password", ["ui", "--auth", "bob"], "USER:PASSWORD"),
    Case("ui missing data root", ["ui", "--data-root", "{tmp}/nope"], "is not a folder"),
    Case("demo zero steps", ["demo", "--max-steps", "0"], "must be > 0"),
]

# ---------------------------------------------------------------- issue 27: the last library/OS exceptions

LAST_FIVE = [
    Case("caption is a png", TRAIN + ["--data", "{png_caption}"],
         "its caption img0.txt is not text: byte 0x89 at 0 is not UTF-8"),
    Case("caption with control characters", TRAIN + ["--data", "{nul_caption}"],
         "its caption img0.txt is not text: control character U+0000"),
    Case("caption of 50 kB", TRAIN + ["--data", "{long_caption}"],
         "too long for a caption of at most 10,000 characters"),
    Case("model folder without tokenizer", ["train", "--model", "{no_tokenizer}", "--data", "{images}", "--output",
                                            "{out}/m.safetensors"], "has no tokenizer/ folder: copy the tokenizer/"),
    Case("generate without tokenizer", ["generate", "--model", "{no_tokenizer}", "--prompt", "a", "-o", "{out}/g"],
         "has no tokenizer/ folder"),
    Case("generate allow-pickle code", ["generate", "--model", "{evil_ckpt}", "--allow-pickle", "--prompt", "a", "-o",
                                        "{out}/g"], "refused: loading it would import posix.system"),
    Case("merge allow-pickle code", ["merge", "--model", "{evil_ckpt}", "--allow-pickle", "--lora", "{lora}", "-o",
                                     "{out}/m"], "nothing from it ran"),
    Case("merge allow-pickle junk", ["merge", "--model", "{junk_ckpt}", "--allow-pickle", "--lora", "{lora}", "-o",
                                     "{out}/m"], "not a readable PyTorch checkpoint"),
    Case("generate output is a file", ["generate", "--model", "{model}", "--prompt", "a", "-o", "{afile}"],
         "is a file, not a folder"),
    Case("generate output under a file", ["generate", "--model", "{model}", "--prompt", "a", "-o", "{afile}/g"],
         "is a file, not a folder"),
    Case("eval output is a file", ["eval", "{lora}", "--trigger", "sks", "--concept", "star", "--n", "1",
                                   "--output", "{afile}"], "is a file, not a folder"),
    # the same class of mistake elsewhere: the machine's errors, and files that are not what their name says
    Case("lora name too long", ["inspect", "{tmp}/" + "x" * 300 + ".safetensors"], "file name too long"),
    Case("data folder name too long", TRAIN + ["--data", "{tmp}/" + "d" * 300], "file name too long"),
    Case("output under a file", ["convert", "{lora}", "--to", "diffusers", "-o", "{afile}/c.safetensors"],
         "is a file, not a folder"),
    Case("job file is binary", ["train", "{png_job}"], "not a TOML job file (not UTF-8"),
    Case("eval n 0", ["eval", "{lora}", "--trigger", "sks", "--concept", "star", "--n", "0", "--output", "{out}/e"],
         "--n must be at least 1"),
    Case("eval steps 0", ["eval", "{lora}", "--trigger", "sks", "--concept", "star", "--steps", "0", "--output",
                          "{out}/e"], "--steps must be at least 1"),
    Case("eval empty trigger", ["eval", "{lora}", "--trigger", " ", "--concept", "star", "--output", "{out}/e"],
         "--trigger is empty"),
    Case("demo n 0", ["demo", "--n", "0", "--output", "{out}/demo"], "--n must be at least 1"),
    Case("queue file is binary", ["train", "--queue", "{png_job}"], "is not a text file (not UTF-8"),
]

ALL = config_cases() + JOB_FILES + FLAGS + DATA + TOOLS + LAST_FIVE


def test_the_table_is_big_enough():
    assert len(ALL) >= 150 and len({c.id for c in ALL}) == len(ALL)


def test_a_refused_pickle_ran_nothing(prepared):
    """The code-running pickle of the table was refused by generate and merge above without running: no marker."""
    from sdlora.errors import ModelError
    from sdlora.models import load_model

    with pytest.raises(ModelError, match="nothing from it ran"):
        load_model(prepared["evil_ckpt"], allow_pickle=True)
    assert not (Path(prepared["evil_ckpt"]).parent / "RAN").exists()


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    """Every file and folder the cases name."""
    from safetensors.torch import save_file

    from sdlora.loras.files import write_lora
    from sdlora.single_file import save_single_file

    d = tmp_path_factory.mktemp("malformed")
    p = {"model": tiny_model, "images": str(draw_images(d / "images", n=2)), "tmp": str(d)}
    for name in ("empty", "notes", "broken", "folder_named.safetensors"):
        (d / name).mkdir()
    p["folder_named_safetensors"] = str(d / "folder_named.safetensors")
    p["empty"], p["notes"], p["broken"] = str(d / "empty"), str(d / "notes"), str(d / "broken")
    (d / "notes" / "a.md").write_text("text")
    (d / "broken" / "a.png").write_bytes(b"\x89PNG but not")
    mixed = draw_images(d / "mixed", n=2)
    (mixed / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    p["mixed"] = str(mixed)
    (d / "afile").write_text("")
    p["afile"] = str(d / "afile")
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    good = {f"{base}.lora_down.weight": torch.randn(2, 32), f"{base}.lora_up.weight": torch.randn(32, 2),
            f"{base}.alpha": torch.tensor(2.0)}
    loras = {"lora": good, "lora2": good,
             "nan": {**good, f"{base}.lora_up.weight": torch.full((32, 2), float("nan"))},
             "inf": {**good, f"{base}.lora_up.weight": torch.full((32, 2), float("inf"))},
             "zero": {**good, f"{base}.lora_up.weight": torch.zeros(32, 2)},
             "no_tensors": {}, "unknown_key": {**good, "weird.tensor": torch.zeros(1)},
             "no_up": {k: v for k, v in good.items() if "up" not in k},
             "tucker": {**good, f"{base}.lora_mid.weight": torch.zeros(2, 2, 3, 3)},
             "xl": {k.replace(base, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"): v
                    for k, v in good.items()}}
    for name, tensors in loras.items():
        p[name] = str(write_lora(d / f"{name}.safetensors", tensors, {"ss_base_model_version":
                                                                     "sdxl_base_v1-0" if name == "xl" else "sd_v1"}))
    save_file({f"unet.{base}.lora_A.weight": torch.randn(2, 32), f"unet.{base}.lora_B.weight": torch.randn(32, 2)},
              str(d / "bad_adapter_meta.safetensors"), {"lora_adapter_metadata": "{not json"})
    p["bad_adapter_meta"] = str(d / "bad_adapter_meta.safetensors")
    (d / "junk_lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}")
    (d / "empty_file.safetensors").write_bytes(b"")
    (d / "pickle_lora.pt").write_bytes(b"not read")
    (d / "m.ckpt").write_bytes(b"not read")
    (d / "junk.safetensors").write_bytes(b"junk" * 10)
    p.update(junk_lora=str(d / "junk_lora.safetensors"), empty_file=str(d / "empty_file.safetensors"),
             pickle_lora=str(d / "pickle_lora.pt"), ckpt=str(d / "m.ckpt"), junk=str(d / "junk.safetensors"))
    from safetensors.torch import load_file

    full = save_single_file(tiny_model, d / "full.safetensors")
    save_file(load_file(str(full)), str(d / "nonstandard.safetensors"))  # without the configs header
    p["nonstandard"] = str(d / "nonstandard.safetensors")
    _prepare_sd3(d, p)
    _prepare_last_five(d, p, tiny_model)
    return p


def _prepare_last_five(d: Path, p: dict, tiny_model: str) -> None:
    """Captions that are not text, a model folder without its tokenizer, pickles that would run code or are junk,
    and a PNG where a job file should be."""
    import shutil

    png = (Path(p["images"]) / "img0.png").read_bytes()
    for name, caption in (("png_caption", png), ("nul_caption", b"a red\x00sks"),
                          ("long_caption", b"a red sks, " * 5000)):
        folder = draw_images(d / name, n=1)
        (folder / "img0.txt").write_bytes(caption)
        p[name] = str(folder)
    shutil.copytree(tiny_model, d / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer"))
    p["no_tokenizer"] = str(d / "no_tokenizer")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(str(d / "RAN"))}, d / "evil.ckpt")
    assert not (d / "RAN").exists()
    (d / "junk.ckpt").write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00w" + bytes(range(200)))  # a pickle cut short
    (d / "png.toml").write_bytes(png)
    p.update(evil_ckpt=str(d / "evil.ckpt"), junk_ckpt=str(d / "junk.ckpt"), png_job=str(d / "png.toml"))


class RunsCode:
    """Pickled, it asks the loader to call os.system (which would create `marker`)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _prepare_sd3(d: Path, p: dict) -> None:
    """A tiny SD3 folder (no T5), an SD3 single file without its text encoders, an SD3 LoRA, and a Flux-shaped
    file and folder."""
    from safetensors.torch import load_file, save_file

    from sdlora.loras.files import write_lora
    from sdlora.random_pipelines import save_tiny_sd3_pipeline
    from sdlora.single_file import save_single_file

    p["sd3"] = str(save_tiny_sd3_pipeline(d / "sd3", "sd3", t5=False))
    from safetensors import safe_open

    single = save_single_file(p["sd3"], d / "sd3_full.safetensors")
    with safe_open(str(single), "pt") as f:
        header = f.metadata()
    save_file({k: v for k, v in load_file(str(single)).items() if not k.startswith("text_encoders.")},
              str(d / "sd3_bare.safetensors"), header)
    p["sd3_bare"] = str(d / "sd3_bare.safetensors")
    save_file(load_file(str(single)), str(d / "sd3_headerless.safetensors"))
    p["sd3_headerless"] = str(d / "sd3_headerless.safetensors")
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    p["sd3_lora"] = str(write_lora(d / "sd3_lora.safetensors", {
        f"{qkv}.lora_down.weight": torch.randn(2, 32), f"{qkv}.lora_up.weight": torch.randn(96, 2),
        f"{qkv}.alpha": torch.tensor(2.0)}, {"ss_base_model_version": "medium", "sdlora_family": "sd3"}))
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)},
              str(d / "flux.safetensors"))
    p["flux"] = str(d / "flux.safetensors")
    (d / "flux_folder" / "transformer").mkdir(parents=True)
    (d / "flux_folder" / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    p["flux_folder"] = str(d / "flux_folder")


def fill(text: str, paths: dict) -> str:
    for k, v in paths.items():
        text = text.replace("{" + k + "}", str(v))
    return text


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.id)
def test_malformed_input(case, prepared, tmp_path, capsys):
    paths = {**prepared, "out": str(tmp_path / "out")}
    for name, text in case.files.items():
        target = tmp_path / (f"{name}.toml" if name.startswith("job") else f"{name}.txt")
        target.write_text(fill(text, paths))
        paths[name] = str(target)
    argv = [fill(a, paths) for a in case.argv]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if not case.says:
        assert rc == 0, err
        case.check(paths)
        return
    lines = [x for x in err.strip().splitlines() if "error" in x]
    assert rc != 0 and lines, f"silently accepted: rc={rc} stderr={err[-500:]}"
    assert case.says in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors")), \
        "a file was written for a refused input"


def test_every_config_field_is_covered():
    """The generated cases reach every section and every bounded field (so a new field gets its cases)."""
    ids = {c.id for c in ALL}
    for section, f in iter_options():
        assert f"type {section}.{f.name}" in ids
    assert set(SECTIONS) | {"data"} <= {c.id.split()[1].split(".")[0] for c in ALL if c.id.startswith("type ")}
    assert {f.name for f in dataclasses.fields(DataFolder)} <= {c.id.split(".")[-1] for c in ALL
                                                                 if c.id.startswith("type data.")}


def test_ui_functions_refuse_malformed_input(tmp_path, monkeypatch):
    """The UI's entry points, called as the page calls them, with what a browser (or an attacker) could send."""
    import gradio as gr

    from sdlora.errors import SdloraError
    from ui.app import parse_auth
    from ui.files import Allowed, inside, safe_name, write_captions
    from ui.jobs import JobManager
    from ui.library_tab import LibraryTab
    from ui.train_tab import TrainTab

    out = tmp_path / "out"
    out.mkdir()
    allowed = Allowed(out, [tmp_path / "data"])
    refused = 0
    for bad in ("/", "/etc/passwd", "../../etc", str(tmp_path), "~/.ssh", "\x00", " "):
        with pytest.raises((SdloraError, ValueError)):
            allowed.path(bad)
        refused += 1
    for bad in ("", "bob", ":pw", "bob:"):
        with pytest.raises(SdloraError):
            parse_auth(bad)
        refused += 1
    for name in ("../x", "/etc/passwd", "..", "a/../../b", "C:\\windows\\x"):
        assert inside(out, name).parent == out.resolve()
        assert "/" not in safe_name(name) and ".." not in safe_name(name)
    (tmp_path / "escape.png").write_bytes(b"")
    assert write_captions(out, [["../escape.png", "x"]]) == []  # the name is reduced to one inside `out`: no image
    assert not (tmp_path / "escape.txt").exists()
    monkeypatch.setattr(gr, "Warning", lambda text: None)
    manager = JobManager(out, data_roots=[tmp_path / "data"])
    tab, library = TrainTab(manager), LibraryTab(manager)
    rows, gallery, status = tab.dataset.on_folder("/etc")  # outside the allowed folders: nothing read, said at once
    assert rows == [] and gallery == [] and "error" in status
    for bad in ("/etc/passwd", str(tmp_path / "x.safetensors")):
        with pytest.raises(gr.Error):
            library.on_convert(bad, "kohya")
        with pytest.raises(gr.Error):
            library.on_resize(bad, 2, 0)
        refused += 2
    assert refused >= 15
