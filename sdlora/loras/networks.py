"""The network types sdlora trains and reads, one row each: how peft trains it (its config, and where peft's layers
are made to compute what LyCORIS's do), its tensors in peft's state dicts and in kohya/LyCORIS files (the file form,
`modules.py`, names them), which tensor starts at zero, how kohya's sd-scripts labels it, and which clients load its
files. The names users choose from are config.NETWORKS; this table is what each of them means, and every module that
trains, writes, reads, checks or labels a network asks its row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import NETWORKS as NAMES
from .modules import DoraModule, LohaModule, LokrModule, LoraModule

LYCORIS = "AUTOMATIC1111, ComfyUI, LyCORIS; not diffusers (it cannot load LoHa, LoKr or lora_mid)"
INPUT_MAGNITUDE = "lora_input_magnitude"  # sdlora's input-axis DoRA magnitude (a 'lora_' name: peft's state dicts
                                          # carry it, training/run/dora.py adds it)


@dataclass(frozen=True)
class Network:
    """One network type."""

    name: str                      # lora.network
    title: str
    module: type                   # its layers as files hold them (modules.py, which names their tensors)
    peft_config: str               # peft's config class
    # (alpha, dropout, network_args) -> that config's own options (rank, targets and conv patterns are common)
    peft_options: Callable[[float, float, dict], dict]
    peft_tensors: Mapping[str, str]  # peft state-dict suffix -> the role `layout.assemble` reads it as
    zero_start: tuple[str, ...]    # peft suffix(es) of the tensor that starts at zero: while it is, nothing changes
    kohya_module: str              # ss_network_module as sd-scripts writes it
    algo: Callable[[str], str] | None = None  # (targets preset) -> LyCORIS's algo; None: kohya's own network
    lycoris_args: Callable[[dict], dict] = lambda args: {}  # its own ss_network_args, as strings
    clients: str = ""              # which clients load its files as they are meant
    clients_by_axis: Mapping[str, str] = field(default_factory=dict)  # DoRA: by its magnitude's axis
    # peft's layers made to compute what LyCORIS's do (adapters.py): its dimension split ordered as LyCORIS's,
    # full-matrix factors at scale 1, rank dropout without rescaling
    lycoris_split: bool = False
    full_factors_at_scale_one: bool = False
    unscaled_rank_dropout: bool = False
    input_magnitude: Callable[[dict], bool] = lambda args: False  # sdlora's input-axis DoRA magnitude on top
    fuses: bool = False            # layers trained apart stack exactly into one fused layer (SD3's q/k/v in files)

    @property
    def peft_prefix(self) -> str:
        """What peft's parameter names of this type start with (lora_, hada_, lokr_)."""
        return next(iter(self.peft_tensors))[1:].split("_")[0] + "_"


def conv_rank_alpha(rank: int, alpha: float, args: dict) -> tuple[int, float]:
    """(rank, alpha) of the k x k convs (LyCORIS's conv_dim / conv_alpha): conv_rank, else the rank; conv_alpha, else
    the other layers' alpha / rank ratio at that rank."""
    conv_rank = args.get("conv_rank") or rank
    return conv_rank, args.get("conv_alpha") or alpha * conv_rank / rank


def _lora_options(alpha: float, dropout: float, args: dict) -> dict:
    return {"lora_alpha": alpha, "lora_dropout": dropout, "init_lora_weights": True}


def _dora_options(alpha: float, dropout: float, args: dict) -> dict:
    """peft's LoRA, with peft's magnitude where it is on the output axis (the input axis: sdlora's, dora.py)."""
    return {**_lora_options(alpha, dropout, args), **({"use_dora": True} if args.get("dora_axis") == "output" else {})}


def _lycoris_options(alpha: float, dropout: float, args: dict) -> dict:
    return {"alpha": alpha, "rank_dropout": args.get("rank_dropout", 0.0),
            "module_dropout": args.get("module_dropout", 0.0), "use_effective_conv2d": args.get("use_tucker", False)}


def _loha_options(alpha: float, dropout: float, args: dict) -> dict:
    return {**_lycoris_options(alpha, dropout, args), "init_weights": True}


def _lokr_options(alpha: float, dropout: float, args: dict) -> dict:
    """LyCORIS's start (w1 random, w2 = 0), which peft offers as init_weights="lycoris"."""
    return {**_lycoris_options(alpha, dropout, args), "init_weights": "lycoris",
            "decompose_both": args.get("decompose_both", False), "decompose_factor": args.get("factor", -1)}


def _lycoris_args(args: dict) -> dict:
    return {"use_tucker": str(args["use_tucker"]), "rank_dropout": f"{args['rank_dropout']:g}",
            "module_dropout": f"{args['module_dropout']:g}"}


def _lokr_args(args: dict) -> dict:
    return {**_lycoris_args(args), "factor": str(args["factor"]), "decompose_both": str(args["decompose_both"])}


def _dora_args(args: dict) -> dict:
    return {"dora_wd": "True", "wd_on_output": str(args["dora_axis"] == "output")}


_LORA = {".lora_A.weight": "down", ".lora_B.weight": "up"}  # peft's LoRA tensors (LoHa's and LoKr's: LyCORIS's names)
_ROWS = (
    Network(name="lora", title="plain LoRA", module=LoraModule, peft_config="LoraConfig", peft_options=_lora_options,
            peft_tensors=_LORA, zero_start=(".lora_B.weight",), kohya_module="networks.lora",
            clients="AUTOMATIC1111, ComfyUI, kohya, diffusers", fuses=True),
    Network(name="dora", title="DoRA", module=DoraModule, peft_config="LoraConfig", peft_options=_dora_options,
            peft_tensors={**_LORA, ".lora_magnitude_vector": "magnitude", f".{INPUT_MAGNITUDE}": "input_magnitude"},
            zero_start=(".lora_B.weight",), kohya_module="lycoris.kohya",
            algo=lambda targets: "locon" if targets == "all" else "lora", lycoris_args=_dora_args,
            clients_by_axis={
                "input": "AUTOMATIC1111 and ComfyUI (exact); diffusers drops dora_scale and loads a plain LoRA (wrong)",
                "output": "LyCORIS >= 3.2 (exact), ComfyUI (approximate: it normalises by the base weight), "
                          "AUTOMATIC1111 v1.10 (wrong: it expects the input axis); diffusers drops dora_scale"},
            input_magnitude=lambda args: args.get("dora_axis", "input") == "input"),
    Network(name="loha", title="LoHa", module=LohaModule, peft_config="LoHaConfig", peft_options=_loha_options,
            peft_tensors={f".{k}": k for k in LohaModule.TENSORS}, zero_start=(".hada_w2_b",),
            kohya_module="lycoris.kohya", algo=lambda targets: "loha", lycoris_args=_lycoris_args, clients=LYCORIS,
            unscaled_rank_dropout=True),
    Network(name="lokr", title="LoKr", module=LokrModule, peft_config="LoKrConfig", peft_options=_lokr_options,
            peft_tensors={f".{k}": k for k in LokrModule.TENSORS}, zero_start=(".lokr_w2", ".lokr_w2_b"),
            kohya_module="lycoris.kohya", algo=lambda targets: "lokr", lycoris_args=_lokr_args, clients=LYCORIS,
            lycoris_split=True, full_factors_at_scale_one=True),
)
# config.NETWORKS names the types users choose from (and config.NETWORK_ARGS their options); a name without a row
# fails here, at import
NETWORKS: dict[str, Network] = {n: next(r for r in _ROWS if r.name == n) for n in NAMES}
PEFT_PREFIXES = tuple(dict.fromkeys(n.peft_prefix for n in NETWORKS.values()))  # what is trainable
PEFT_TENSORS = {k: v for n in NETWORKS.values() for k, v in n.peft_tensors.items()}
_BY_MODULE = {n.module: n for n in NETWORKS.values()}


def network_of(module) -> Network:
    """The row of a file's module, by its type (a DoRA module's is DoRA's; its `inner` module has its own)."""
    return _BY_MODULE[type(module)]
ZERO_START = tuple(dict.fromkeys(s for n in NETWORKS.values() for s in n.zero_start))
