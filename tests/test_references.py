"""Right answers against the reference implementations: each test writes the reference's formula out itself (from
the file and function its docstring names) and compares sdlora's result with it, never sdlora with itself.

Read at: diffusers @ 58eb52c0 (examples/dreambooth/train_dreambooth_lora_sd3.py, src/diffusers/training_utils.py),
kohya-ss/sd-scripts @ 48d368fa (sd3_train_network.py, library/sd3_train_utils.py), LyCORIS @ f49d30d6
(lycoris/functional/general.py, lycoris/modules/lokr.py and loha.py), ComfyUI (comfy/weight_adapter/lokr.py @
2bffe2f4), AUTOMATIC1111 v1.10 (extensions-builtin/Lora/network.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

# ---------------------------------------------------------------- SD3's objective (diffusers, kohya)

SHIFT = 3.0


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def _diffusers_sd3_loss(denoise, x, noise, sigma, weighting_scheme: str, precondition: bool) -> torch.Tensor:
    """The per-sample loss of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (main(), the training loop)
    at given sigmas: noisy = (1 - s) x + s n; model_pred; with --precondition_outputs, model_pred = model_pred * (-s)
    + noisy and target = x, else target = n - x; weighting from training_utils.compute_loss_weighting_for_sd3
    (sigma_sqrt: s^-2, cosmap: 2 / (pi (1 - 2 s + 2 s^2)), else 1); loss = mean over C, H, W of weighting (pred -
    target)^2."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x + s * noise
    model_pred = denoise(noisy, s.flatten() * 1000)
    if precondition:
        model_pred = model_pred * (-s) + noisy
    if weighting_scheme == "sigma_sqrt":
        weighting = (s**-2.0).float()
    elif weighting_scheme == "cosmap":
        weighting = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    else:
        weighting = torch.ones_like(s)
    target = x if precondition else noise - x
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(x.shape[0], -1), 1)


class _Linear:
    """A fixed 'transformer': a random channel mix of the input plus a timestep-dependent bias."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w, self.b = torch.randn(4, 4, generator=g) / 2, torch.randn(4, generator=g)

    def __call__(self, x, t):
        return torch.einsum("oc,bchw->bohw", self.w, x) + (t / 1000).view(-1, 1, 1, 1) * self.b.view(1, 4, 1, 1)


def _models(denoiser):
    from sdlora.training.run.parts import Part
    from sdlora.training.steps.step import Models

    conditioning = SimpleNamespace(predict=lambda den, x, t, cond, micro: den(x, t),
                                   denoiser_input=lambda noisy, image=None: noisy)  # text-to-image: latents alone
    return Models(Part.unwrapped(denoiser), None, _flow_scheduler(), conditioning)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [True, False])
def test_sd3_loss_is_diffusers_for_every_weighting_and_preconditioning(weighting, precondition):
    """sdlora's per-sample SD3 loss (denoise_loss) is train_dreambooth_lora_sd3.py's, for each --weighting_scheme
    and --precondition_outputs 1 / 0; the default config preconditions, as diffusers' default (1) and kohya's
    sd3_train_network.get_noise_pred_and_target (always) do."""
    from sdlora.config import TrainConfig
    from sdlora.training.steps.objective import Recipe
    from sdlora.training.steps.step import denoise_loss

    assert TrainConfig().precondition_outputs is True
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.03, 0.2, 0.5, 0.8, 0.999])
    den = _Linear()
    recipe = Recipe.from_config(TrainConfig(flow_weighting=weighting, precondition_outputs=precondition))
    got, _, _ = denoise_loss(_models(den), recipe, x, noise, noise, sigma * 1000, None, None)
    want = _diffusers_sd3_loss(den, x, noise, sigma, weighting, precondition)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


def test_sd3_preconditioned_sigma_sqrt_is_the_unweighted_velocity_loss():
    """With preconditioning, sigma_sqrt's 1/sigma^2 cancels the sigma^2 of x0 - (x_t - sigma v) = sigma (v - v):
    the loss is the plain velocity loss, with no weight near 1e6 at nearly clean timesteps (kohya's sd3 docs)."""
    from sdlora.config import TrainConfig
    from sdlora.training.steps.objective import Recipe
    from sdlora.training.steps.step import denoise_loss

    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma, den = torch.tensor([0.001, 0.01, 0.6]), _Linear(3)
    got = denoise_loss(_models(den), Recipe.from_config(TrainConfig(flow_weighting="sigma_sqrt")), x, noise, noise,
                       sigma * 1000, None, None)[0]
    s = sigma.view(-1, 1, 1, 1)
    velocity = ((den((1 - s) * x + s * noise, sigma * 1000) - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, velocity, rtol=1e-4, atol=1e-6)


def test_preconditioning_is_a_flow_matching_option(tiny_model, images, tmp_path):
    """--no-precondition-outputs on a noise-prediction model would change nothing: a one-line error."""
    from conftest import tiny_config

    from sdlora import train
    from sdlora.errors import ConfigError

    with pytest.raises(ConfigError, match="precondition_outputs applies to flow matching"):
        train(tiny_config(tiny_model, images, tmp_path / "o" / "l.safetensors", train__precondition_outputs=False))


def test_sd3_timestep_window_applies_after_the_shift_as_kohya():
    """kohya's library/sd3_train_utils.get_noisy_model_input_and_timesteps: u (uniform), shifted u s / (1 + (s - 1)
    u), then the window: timesteps = (u (t_max - t_min) + t_min).long(). sdlora's timesteps are the same draws
    before the floor, so every one lies in [t_min, t_max)."""
    from sdlora.training.steps.objective import Flow, Timesteps

    flow, window = Flow(_flow_scheduler()), Timesteps(low=200, high=500)
    got = flow.sample(window, 4000, torch.Generator().manual_seed(5), "cpu")
    u = torch.rand(4000, generator=torch.Generator().manual_seed(5))
    u = (u * SHIFT) / (1 + (SHIFT - 1) * u)
    kohya = (u * (500 - 200) + 200).long()
    assert got.min() >= 200 and got.max() < 500
    assert torch.all((got >= kohya) & (got < kohya + 1 + 1e-3))
    q = flow.quantiles(window, 5, "cpu")  # validation's fixed timesteps: the same distribution's quantiles
    assert q.min() >= 200 and q.max() < 500 and abs(q[2].item() - (200 + 300 * 0.75)) < 1e-3  # the median: u = 1/2


@pytest.mark.parametrize("kind,mean,scale", [("logit-normal", 0.8, 1.0), ("logit-normal", -0.5, 1.3),
                                             ("mode", 0.0, 1.0)])
def test_sd3_timestep_sampling_draws_diffusers_timesteps(kind, mean, scale):
    """The same --logit_mean / --logit_std / --mode_scale give the same timesteps as train_dreambooth_lora_sd3.py:
    u = compute_density_for_timestep_sampling (training_utils; logit_normal: sigmoid(normal(mean, std)), mode: 1 - u
    - mode_scale (cos^2(pi u / 2) - 1 + u)), indices = (u * 1000).long(), timesteps = scheduler.timesteps[indices]
    (a descending table: mean > 0 favours less noise). sdlora draws the same u from the same generator and does not
    round to the table, so each timestep lies within one table step of diffusers'."""
    from sdlora.training.steps.objective import Flow, Timesteps

    sched, n = _flow_scheduler(), 4000
    g = torch.Generator().manual_seed(7)
    if kind == "logit-normal":
        u = torch.sigmoid(torch.normal(mean=mean, std=scale, size=(n,), generator=g))
    else:
        u = torch.rand(n, generator=g)
        u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    want = sched.timesteps[(u * 1000).long().clamp(max=999)]
    ts = Timesteps(kind, mean, scale) if kind == "logit-normal" else Timesteps(kind)
    got = Flow(sched).sample(ts, n, torch.Generator().manual_seed(7), "cpu")
    step = SHIFT + 1e-3  # the table's largest step in timesteps: d sigma / d u <= shift, over 1000 rows
    assert (got - want).abs().max() <= step, (got - want).abs().max()


# ---------------------------------------------------------------- LyCORIS networks as their readers read them


def comfyui_lokr_weight(t: dict, base: str, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI comfy/weight_adapter/lokr.py, LoKrAdapter.calculate_weight: w1 = lokr_w1 or w1_a @ w1_b; w2 = lokr_w2,
    w2_a @ w2_b, or with lokr_t2 einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a); w1 unsqueezed to 4-D
    when w2 is; alpha / dim with dim = w2_b's (else w1_b's) first size, 1 when both are full; weight += strength
    alpha kron(w1, w2).reshape(weight.shape). ComfyUI catches an exception here, logs it and leaves the weight as it
    is: that layer is skipped."""
    get = lambda k: t.get(f"{base}.{k}")  # noqa: E731
    dim = None
    w1 = get("lokr_w1")
    if w1 is None:
        dim = get("lokr_w1_b").shape[0]
        w1 = torch.mm(get("lokr_w1_a").float(), get("lokr_w1_b").float())
    w2 = get("lokr_w2")
    if w2 is None:
        dim = get("lokr_w2_b").shape[0]
        if get("lokr_t2") is None:
            w2 = torch.mm(get("lokr_w2_a").float(), get("lokr_w2_b").float())
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", get("lokr_t2").float(), get("lokr_w2_b").float(),
                              get("lokr_w2_a").float())
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = float(get("alpha")) / dim if dim is not None else 1.0
    diff = torch.kron(w1.float(), w2.float())  # raises on a non-contiguous w2: ComfyUI skips the layer
    return weight + strength * alpha * diff.reshape(weight.shape)


def _train_network(model, data, out, network, args, rank=2, steps=2, **kw):
    from conftest import Capture, tiny_config

    from sdlora import train

    cfg = tiny_config(model, data, out, train__max_steps=steps, lora__rank=rank, **kw)
    cfg.lora.network, cfg.lora.network_args, cfg.lora.targets = network, args, "all"
    cap = Capture()
    train(cfg, cap)
    return cfg, cap.state


def test_lokr_tucker_file_is_applied_by_comfyui_as_trained(tiny_model, images, tmp_path):
    """A LoKr trained with use_tucker on 3x3 convs: ComfyUI's reader (written out above) applies every layer of the
    file, each equal to peft's trained update (LoKrLayer.get_delta_weight), and `inspect` finds no problem; a file
    that carries lokr_t2 is reported (ComfyUI skips it) and `convert` rewrites it in a form ComfyUI applies."""
    from safetensors.torch import save_file

    from sdlora import convert_lora, inspect_lora
    from sdlora.loras.files import read_lora

    cfg, state = _train_network(tiny_model, images, tmp_path / "o" / "k.safetensors", "lokr", "use_tucker=true")
    tensors, meta = read_lora(cfg.output.path)
    unet, checked = state.components.denoiser, 0
    for name, layer in unet.named_modules():
        if "default" not in getattr(layer, "lokr_w2_a", {}) and "default" not in getattr(layer, "lokr_w2", {}):
            continue
        base = "lora_unet_" + name.removesuffix(".base_layer").replace(".", "_")
        w = layer.get_base_layer().weight.detach().float()
        got = comfyui_lokr_weight(tensors, base, w) - w
        torch.testing.assert_close(got, layer.get_delta_weight("default").detach().float(), rtol=1e-4, atol=1e-6)
        checked += bool(getattr(layer, "lokr_t2", {}))
    assert checked >= 4  # the Tucker-trained convs were among them
    assert not any(k.endswith("lokr_t2") for k in tensors) and inspect_lora(cfg.output.path).problems == []

    conv = next(b.removesuffix(".lokr_w1") for b in tensors if "resnets_0_conv1" in b and b.endswith("lokr_w1"))
    g = torch.Generator().manual_seed(0)
    w2a, w2b = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    t2 = torch.randn(2, 2, 3, 3, generator=g)
    hand = {f"{conv}.lokr_w1": torch.randn(2, 2, generator=g), f"{conv}.lokr_w2_a": w2a, f"{conv}.lokr_w2_b": w2b,
            f"{conv}.lokr_t2": t2, f"{conv}.alpha": torch.tensor(1.0)}
    save_file(hand, str(tmp_path / "t2.safetensors"), {k: v for k, v in meta.items() if k.startswith("ss_")})
    info = inspect_lora(tmp_path / "t2.safetensors")
    assert any("ComfyUI skips 1 LoKr conv layers" in p for p in info.problems) and "ComfyUI skips" in info.loads_in
    w = torch.randn(32, 32, 3, 3, generator=g)
    with pytest.raises(RuntimeError):
        comfyui_lokr_weight(hand, conv, w)
    a1111 = torch.kron(hand[f"{conv}.lokr_w1"][:, :, None, None],  # A1111 network_lokr: make_kron after contiguous()
                       torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a).contiguous()) * 0.5
    fixed, _ = read_lora(convert_lora(tmp_path / "t2.safetensors", "kohya", tmp_path / "fixed.safetensors"))
    torch.testing.assert_close(comfyui_lokr_weight(fixed, conv, w) - w, a1111, rtol=1e-5, atol=1e-6)


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS lycoris/functional/general.py factorization(): a factor that divides gives (factor, dim / factor)
    ordered smaller first; otherwise the divisor pair closest to sqrt(dim) with the smaller part <= factor."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lycoris_lokr_shapes(layer: torch.nn.Module, rank: int, alpha: float, factor: int, decompose_both: bool,
                        use_tucker: bool) -> tuple[dict, float]:
    """The parameters lycoris/modules/lokr.py LokrModule.__init__ makes for a Linear or Conv2d, and its scale:
    out = (a, b), in = (c, d) by factorization(); w1 [a, c] (w1_a [a, r] / w1_b [r, c] with decompose_both when r <
    max(a, c) / 2); w2 [b, d(, k, k)] when r >= max(b, d) / 2, else a Tucker core [r, r, k, k] with w2_a [r, b] /
    w2_b [r, d] (use_tucker, k > 1) or w2_a [b, r] / w2_b [r, d k k]; scale alpha / r, or 1 when w1 and w2 are
    both full (alpha = lora_dim)."""
    conv = isinstance(layer, torch.nn.Conv2d)
    out_dim, in_dim = (layer.out_channels, layer.in_channels) if conv else (layer.out_features, layer.in_features)
    k = tuple(layer.kernel_size) if conv else ()
    (a, b), (c, d) = lycoris_factorization(out_dim, factor), lycoris_factorization(in_dim, factor)
    shapes = {}
    use_w1 = not (decompose_both and rank < max(a, c) / 2)
    if use_w1:
        shapes["lokr_w1"] = (a, c)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, rank), (rank, c)
    use_w2 = rank >= max(b, d) / 2
    if use_w2:
        shapes["lokr_w2"] = (b, d, *k)
    elif use_tucker and any(i != 1 for i in k):
        shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (rank, rank, *k), (rank, b), (rank, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, rank), (rank, d * math.prod(k))
    return shapes, 1.0 if use_w1 and use_w2 else alpha / rank


@pytest.mark.parametrize("args,rank", [("factor=16", 2), ("factor=16,decompose_both=true,use_tucker=true", 2),
                                       ("decompose_both=true,conv_rank=4,conv_alpha=1", 8)])
def test_lokr_builds_the_network_lycoris_builds_from_its_ss_network_args(tiny_model, args, rank):
    """Every LoKr layer sdlora trains has the parameter shapes and scale LyCORIS's LokrModule gives the arguments
    the file's ss_network_args records (factor, decompose_both, use_tucker, conv_dim, conv_alpha): at the tiny
    model's widths 32 and 64, factor 16 splits them (2, 16) and (4, 16) as LyCORIS does, not (16, 2) as peft; at
    rank 8 both factors of the 32-wide layers are full, and their scale is 1 whatever alpha says."""
    import json

    from diffusers import UNet2DConditionModel

    from sdlora.config import Config
    from sdlora.families import FAMILIES
    from sdlora.loras.metadata import network_labels
    from sdlora.training.run.adapters import inject

    cfg = Config()
    cfg.lora.network, cfg.lora.network_args, cfg.lora.rank, cfg.lora.alpha = "lokr", args, rank, 3.0
    cfg.lora.targets = "all"
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    family = FAMILIES["sd1"]
    names = inject(unet, family.target_patterns("all"), cfg.lora.rank, cfg.lora_alpha, 0.0, network="lokr",
                   args=cfg.network_args)
    lyco = json.loads(network_labels(cfg, family)["ss_network_args"])
    assert lyco["algo"] == "lokr"
    split, full = {}, False
    for name in names:
        layer = unet.get_submodule(name)
        base = layer.get_base_layer()
        conv3 = isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)
        r, alpha = (int(lyco["conv_dim"]), float(lyco["conv_alpha"])) if conv3 else (rank, 3.0)
        want, scale = lycoris_lokr_shapes(base, r, alpha, int(lyco["factor"]), lyco["decompose_both"] == "True",
                                          lyco["use_tucker"] == "True")
        got = {k: tuple(getattr(layer, k)["default"].shape) for k in want if "default" in getattr(layer, k)}
        assert got == want, (name, got, want)
        assert layer.scaling["default"] == pytest.approx(scale)
        split[base.weight.shape[0]] = want.get("lokr_w1", want.get("lokr_w1_a"))[0]
        full |= {"lokr_w1", "lokr_w2"} <= set(want) and not conv3
    if args == "factor=16":
        assert split[32] == 2 and split[64] == 4
    assert full == (rank == 8)


def test_loha_rank_dropout_drops_rows_without_rescaling_as_lycoris(tiny_model):
    """lycoris/modules/loha.py LohaModule.get_weight: while training, drop = (rand(out) > rank_dropout) multiplies
    the rows of the update, divided by drop.mean() only with rank_dropout_scale (default False). So each output
    channel of a LoHa layer's added output is either 0 or the whole update's, never rescaled."""
    from diffusers import UNet2DConditionModel

    from sdlora.training.run.adapters import inject

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    names = inject(unet, ["attn2.to_q"], 2, 2.0, network="loha", args={"rank_dropout": 0.5})
    layer = unet.get_submodule(names[0])
    torch.nn.init.normal_(layer.hada_w2_b["default"])  # started at zero: give the update a value
    layer.train()
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = torch.nn.functional.linear(x, layer.get_delta_weight("default"))
        torch.manual_seed(0)
        added = layer(x) - layer.get_base_layer()(x)
    per_row = [(added[..., j] - full[..., j]).abs().max() < 1e-5 or added[..., j].abs().max() < 1e-6
               for j in range(full.shape[-1])]
    kept = [added[..., j].abs().max() > 1e-6 for j in range(full.shape[-1])]
    assert all(per_row) and 0 < sum(kept) < len(kept)


def a1111_dora_weight(w: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, axis: str, strength: float):
    """What AUTOMATIC1111 v1.10 (extensions-builtin/Lora/network.py: finalize_updown, apply_weight_decompose) and
    ComfyUI (comfy/weight_adapter/base.py weight_decompose: weight += strength (weight_calc - weight)) make of a DoRA
    layer at a strength: W' = (W + dW) m / ||W + dW|| (the norm per input column, or per output row as LyCORIS's
    wd_on_out / peft), then W + strength (W' - W)."""
    v = w + delta
    if axis == "input":
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(v.shape[1], *[1] * (v.dim() - 1)).transpose(0, 1)
        merged = v * (m.reshape(norm.shape) / norm)
    else:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        merged = v * (m.reshape(norm.shape) / norm)
    return w + strength * (merged - w)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_samples_render_dora_at_a_strength_as_the_clients(tiny_model, axis):
    """A sample's lora_scale on a DoRA layer gives the layer A1111's and ComfyUI's weight at that strength (scale 0:
    the base model, not the base with the magnitude still applied)."""
    from diffusers import UNet2DConditionModel

    from sdlora.training.periodic.output import lora_scaled
    from sdlora.training.run.adapters import inject

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    names = inject(unet, ["attn2.to_k", r"resnets\.0\.conv1"], 2, 2.0, network="dora", args={"dora_axis": axis})
    assert any(isinstance(unet.get_submodule(n).get_base_layer(), torch.nn.Conv2d) for n in names)
    g = torch.Generator().manual_seed(3)
    for name in names:
        layer = unet.get_submodule(name)
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
            mag = layer.lora_input_magnitude["default"] if axis == "input" else \
                layer.lora_magnitude_vector["default"].weight
            mag.mul_(1 + 0.3 * torch.rand(mag.shape, generator=g))
    unet.eval()
    for name in names:
        layer = unet.get_submodule(name)
        base = layer.get_base_layer()
        conv = isinstance(base, torch.nn.Conv2d)
        x = torch.randn((2, base.in_channels, 6, 6) if conv else (2, 3, base.in_features), generator=g)
        w = base.weight.detach().float()
        delta = layer.get_delta_weight("default").detach().float()
        m = (layer.lora_input_magnitude["default"] if axis == "input" else
             layer.lora_magnitude_vector["default"].weight).detach().float()
        for s in (0.0, 0.5, 1.0):
            want_w = a1111_dora_weight(w, delta, m, axis, s)
            want = torch.nn.functional.conv2d(x, want_w, base.bias, base.stride, base.padding) if conv else \
                torch.nn.functional.linear(x, want_w, base.bias)
            with torch.no_grad(), lora_scaled([unet], s):
                got = layer(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- validation ranks what training minimises


def test_validation_loss_is_the_masked_loss_training_minimises(tiny_model, tmp_path):
    """With masks, training's loss is the mean over the masked area (per_sample_loss). So a held-out image's loss
    under the left-half mask (L) and the right-half mask (R) differ, and their mean is its whole-image loss (the
    halves are equal areas on the latent grid); validation that ignored masks would give L = R = the whole."""
    import dataclasses

    import numpy as np
    from conftest import Capture, draw_images, tiny_config
    from PIL import Image

    from sdlora import train

    data = draw_images(tmp_path / "imgs", n=4)
    halves = {}
    for side, cols in (("left", slice(0, 16)), ("right", slice(16, 32))):
        folder = tmp_path / side
        folder.mkdir()
        for p in data.glob("*.png"):
            arr = np.zeros((32, 32), dtype=np.uint8)
            arr[:, cols] = 255
            Image.fromarray(arr, "L").save(folder / p.name)
        halves[side] = folder
    cfg = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=1, validation__split=0.5)
    cfg.data[0].masks = str(halves["left"])
    cap = Capture()
    train(cfg, cap)
    state, va = cap.state, cap.state.validation
    assert all(e.mask.startswith(str(halves["left"])) for e in va.examples)

    def loss_with(mask_of):
        va.examples = [dataclasses.replace(e, mask=mask_of(e)) for e in va.examples]
        state.batches.latents.cache.clear()
        return va.loss(state)

    left = loss_with(lambda e: e.mask)
    right = loss_with(lambda e: str(halves["right"] / e.mask.rsplit("/", 1)[1]))
    whole = loss_with(lambda e: "")
    assert abs(left - right) > 1e-4 * whole
    assert abs((left + right) / 2 - whole) < 1e-5 * whole


# ---------------------------------------------------------------- the trigger words in the file


def test_trigger_words_are_found_where_users_put_them(tiny_model, tmp_path):
    """modelspec.trigger_phrase (what A1111 and ComfyUI show as the trigger) comes from [output] trigger, the
    pivotal token, the tags kept first (keep_tags) that every caption shares, or the instance prompt; the demo job
    names its own, the word its captions teach."""
    from conftest import draw_images, tiny_config

    from sdlora import train
    from sdlora.config import Config, DataFolder, load_toml
    from sdlora.loras.files import read_lora
    from sdlora.loras.metadata import trigger_words
    from sdlora.paths import sample_data

    demo = load_toml(sample_data() / "demo.toml")
    captions = (sample_data() / "concepts" / "star").glob("*.txt")
    assert trigger_words(demo) == "sks" and all("sks" in p.read_text().split() for p in captions)
    cfg = Config()
    cfg.data = [DataFolder(path="a", keep_tags=2), DataFolder(path="b")]
    assert trigger_words(cfg, {"a": ["ohwx, woman, red dress", "ohwx, woman, smiling"], "b": ["x, y"]}) == \
        "ohwx, woman"
    assert trigger_words(cfg, {"a": ["ohwx, woman", "ohwx, man"]}) == "ohwx"
    cfg.pivotal.token = "<s1>"
    assert trigger_words(cfg, {"a": ["ohwx, woman"]}) == "<s1>"

    data = draw_images(tmp_path / "imgs", n=2)
    for i, p in enumerate(sorted(data.glob("*.txt"))):
        p.write_text(f"zkx, {['red', 'blue'][i]}, circle")
    run = tiny_config(tiny_model, data, tmp_path / "o" / "l.safetensors", train__max_steps=1)
    run.data[0].prompt, run.data[0].keep_tags, run.data[0].shuffle_tags = "", 1, True
    assert train(run).trigger == "zkx"
    assert read_lora(run.output.path)[1]["modelspec.trigger_phrase"] == "zkx"


# ---------------------------------------------------------------- sizes an SD3 model takes


def test_sd3_sizes_beyond_the_position_embedding_are_one_line_errors(sd35m, tmp_path):
    """diffusers' PatchEmbed.cropped_pos_embed raises for a latent side over pos_embed_max_size patches: a
    resolution, a bucket or a sample larger than pos_embed_max_size x patch x VAE factor pixels is a one-line error
    naming that size, before training (and in generate)."""
    from conftest import draw_images, tiny_config
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from sdlora import train
    from sdlora.errors import ConfigError, SdloraError
    from sdlora.loras.apply import generate

    tc = SD3Transformer2DModel.load_config(sd35m, subfolder="transformer")
    vae = AutoencoderKL.load_config(sd35m, subfolder="vae")
    most = tc["pos_embed_max_size"] * tc["patch_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    data = draw_images(tmp_path / "imgs", n=2, sizes=((96, 48),))
    for options, says in (({"augment__resolution": most + 8 * tc["patch_size"]}, "resolution"),
                          ({"augment__resolution": most}, "the bucket of img0.png"),
                          ({"augment__resolution": 32, "validation__scorer": "shapes",
                            "validation__image_size": most + 8 * tc["patch_size"]}, "validation.image_size")):
        cfg = tiny_config(sd35m, data, tmp_path / "o" / "l.safetensors", model__t5=False, **options)
        with pytest.raises(ConfigError, match=rf"{says}.* is larger than .* at most {most} px a side"):
            train(cfg)
    with pytest.raises(SdloraError, match=rf"at most {most} px a side"):
        generate(sd35m, [], "a red sks", width=most * 2, height=most, steps=1, output_dir=tmp_path / "g", t5=False)
