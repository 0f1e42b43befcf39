"""Strategies: which parameters are trained, and when. Each registers itself by short name.

A strategy owns its recipe options (``Options``, a subclass of the schema's ``StrategyOptions``:
``strategy.method`` picks the strategy, the rest of the section are its fields) and has:

- ``check(skeleton)``: driver-side structural checks on the model built on the meta device.
- ``prepare(model, task) -> model``: freeze, wrap with adapters, scale each layer's learning rate
  (``layer_lr_decay``, every strategy); called once before the backend wraps the model. Every
  parameter the strategy will ever train leaves here trainable, so the optimizer holds them all.
- ``on_epoch_start(model, epoch) -> bool``: set what trains this epoch (gradual unfreezing,
  LP-FT); True when that changed, so the backend re-wraps the model.
- ``save_adapter(model, directory)``: what the strategy trained, alone, where that is a format of
  its own (LoRA: a PEFT adapter directory that ``PeftModel.from_pretrained`` puts on the base
  model); called before ``export``.
- ``export(model) -> model``: e.g. merge adapters before ``save_pretrained``.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Protocol

import torch
from pydantic import ConfigDict, Field, model_validator

from raytune_ft.errors import UserError
from raytune_ft.models import scale_lr
from raytune_ft.schema import Recipe, StrategyOptions

STRATEGIES: dict[str, type["Strategy"]] = {}


class Strategy(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]]

    def __init__(self, options: StrategyOptions): ...
    def check(self, skeleton: torch.nn.Module) -> None: ...
    def prepare(self, model: torch.nn.Module, task) -> torch.nn.Module: ...
    def on_epoch_start(self, model: torch.nn.Module, epoch: int) -> bool: ...
    def save_adapter(self, model: torch.nn.Module, directory: str) -> None: ...
    def export(self, model: torch.nn.Module) -> torch.nn.Module: ...


def register(cls):
    """Class decorator: make a strategy available to recipes as ``strategy.method: <cls.name>``."""
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(recipe: Recipe) -> "Strategy":
    return STRATEGIES[recipe.strategy.method](recipe.strategy)


class OwnOptions(StrategyOptions):
    """A strategy's options: the shared ones and its own; nothing else."""

    model_config = ConfigDict(extra="forbid")


def layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's repeated blocks: its longest ModuleList (encoder.layer, h, layers, blocks)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > (len(best[1]) if best else 1):
            best = (name, module)
    if best is None:
        raise UserError("strategy.method", f"cannot find a stack of layers in {type(model).__name__}")
    return best


def in_module(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or f".{p}." in f".{name}" for p in prefixes)


def depth_groups(model: torch.nn.Module, heads: list[str]) -> list[list[str]]:
    """Parameter names grouped from the top: [head and what follows the layers], layer L-1, ...,
    layer 0, [embeddings and what precedes the layers]."""
    stack_name, stack = layer_stack(model)
    top, bottom, layers = [], [], [[] for _ in stack]
    seen_stack = False
    for name, _ in model.named_parameters():
        if name.startswith(stack_name + "."):
            seen_stack = True
            layers[int(name[len(stack_name) + 1:].split(".")[0])].append(name)
        elif in_module(name, heads) or seen_stack:
            top.append(name)
        else:
            bottom.append(name)
    return [top, *reversed(layers), bottom]


def apply_layer_lr_decay(model: torch.nn.Module, head_names: list[str], decay: float) -> None:
    """lr x decay^depth, depth counted from the top: the head 0, the top layer 1, ..., embeddings L+1."""
    parameters = dict(model.named_parameters())
    for depth, group in enumerate(depth_groups(model, head_names)):
        for name in group:
            scale_lr(parameters[name], decay**depth)


def scale_module_lr(model: torch.nn.Module, modules: list[str], factor: float) -> None:
    """The parameters of ``modules`` (names as ``in_module`` matches them: a task's head names,
    LoRA's ``lora_A``/``lora_B``) learn at lr x ``factor``."""
    for name, parameter in model.named_parameters():
        if in_module(name, modules):
            scale_lr(parameter, factor)


def set_trainable(model: torch.nn.Module, names: set[str]) -> bool:
    """Train exactly ``names``; True when anything changed."""
    changed = False
    for name, parameter in model.named_parameters():
        if parameter.requires_grad != (name in names):
            parameter.requires_grad_(name in names)
            changed = True
    return changed


@register
class Full:
    """Every parameter is trained."""

    name = "full"
    Options = OwnOptions

    def __init__(self, options: StrategyOptions):
        self.options = options

    def check(self, skeleton):
        if self.options.layer_lr_decay:
            layer_stack(skeleton)

    def prepare(self, model, task):
        model = self.select(model, task)
        if self.options.layer_lr_decay:
            apply_layer_lr_decay(model, task.head_names(model), self.options.layer_lr_decay)
        return model

    def select(self, model, task):
        """Set what trains (from the start); returns the model to train (wrapped, for adapters)."""
        return model

    def on_epoch_start(self, model, epoch):
        return False

    def save_adapter(self, model, directory):
        pass

    def export(self, model):
        return model


@register
class HeadOnly(Full):
    """Only the task's new head is trained; the pretrained body is frozen (a linear probe)."""

    name = "head_only"

    def select(self, model, task):
        heads = task.head_names(model)
        set_trainable(model, {name for name, _ in model.named_parameters() if in_module(name, heads)})
        return model


@register
class Freeze(Full):
    """The embeddings and the bottom ``layers`` layers, and/or the named ``modules``, stay frozen."""

    name = "freeze"

    class Options(OwnOptions):
        layers: Optional[int] = Field(None, ge=0, description="the embeddings and the bottom N layers stay frozen")
        modules: list[str] = Field(default_factory=list, description="module-name prefixes to freeze")

        @model_validator(mode="after")
        def _something_frozen(self):
            if self.layers is None and not self.modules:
                raise ValueError("strategy.layers: freeze needs layers (bottom N) or modules (name prefixes)")
            return self

    def check(self, skeleton):
        super().check(skeleton)
        layers = self.options.layers
        if layers:
            stack_name, stack = layer_stack(skeleton)
            if layers > len(stack):
                raise UserError("strategy.layers", f"{layers} layers to freeze, but the model has {len(stack)} ({stack_name})")
        names = [name for name, _ in skeleton.named_modules()]
        for prefix in self.options.modules:
            if not any(in_module(name, [prefix]) for name in names):
                raise UserError("strategy.modules", f"no module named {prefix!r} in {type(skeleton).__name__}")

    def select(self, model, task):
        frozen: set[str] = set()
        if self.options.layers is not None:
            groups = depth_groups(model, task.head_names(model))
            for group in groups[len(groups) - 1 - self.options.layers:]:  # bottom N layers + embeddings
                frozen.update(group)
        prefixes = self.options.modules
        frozen.update(name for name, _ in model.named_parameters() if in_module(name, prefixes))
        set_trainable(model, {name for name, _ in model.named_parameters() if name not in frozen})
        return model


@register
class Gradual(Full):
    """ULMFiT's gradual unfreezing: epoch 1 trains the head, each later epoch one more layer
    group from the top, until everything trains."""

    name = "gradual"

    def select(self, model, task):
        self.groups = depth_groups(model, task.head_names(model))
        return model

    def on_epoch_start(self, model, epoch):
        return set_trainable(model, {name for group in self.groups[:epoch] for name in group})


@register
class LinearProbeThenFineTune(Full):
    """LP-FT (Kumar et al. 2022): train the head alone for ``head_epochs``, then everything, so
    fine-tuning starts from a good head and distorts the pretrained features less."""

    name = "lp_ft"

    class Options(OwnOptions):
        head_epochs: int = Field(1, ge=1, description="epochs of linear probing (head only) before fine-tuning everything")

    def select(self, model, task):
        heads = task.head_names(model)
        self.head = {name for name, _ in model.named_parameters() if in_module(name, heads)}
        self.everything = {name for name, _ in model.named_parameters()}
        return model

    def on_epoch_start(self, model, epoch):
        return set_trainable(model, self.head if epoch <= self.options.head_epochs else self.everything)


# Adapter targets by model family, tried in order by ``adaptable_modules``: BERT-style attention,
# LLaMA/Whisper-style attention, then a CNN's pointwise convolutions (EfficientNet's names).
TARGET_FAMILIES = (("query", "value"), ("q_proj", "v_proj"), ("_expand_conv", "_project_conv"))


def adaptable_modules(skeleton: torch.nn.Module) -> list[str] | None:
    """The first family of ``TARGET_FAMILIES`` whose every name is a Linear or 1x1 Conv2d module of
    ``skeleton`` (LoRA's own check), or None: what a search can give LoRA on a model whose recipe names none."""
    for family in TARGET_FAMILIES:
        try:
            LoRA(LoRA.Options(method="lora", target_modules=list(family))).check_targets(skeleton)
        except UserError:
            continue
        return list(family)
    return None


@register
class LoRA(Full):
    """Low-rank adapters (peft) on ``target_modules`` (Linear layers, or a CNN's 1x1 convolutions);
    the base weights stay frozen, the head trains fully, and export merges the adapters into plain
    weights."""

    name = "lora"

    class Options(OwnOptions):
        rank: int = Field(8, ge=1, description="adapter rank")
        alpha: float = Field(16.0, gt=0, description="scaling numerator (scale = alpha / rank)")
        lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
        target_modules: Optional[list[str]] = Field(None, min_length=1, description="module names to adapt; default: attention query and value")
        lr_scale: float = Field(1.0, gt=0, le=100, description="the adapters' lr as a multiple of train.lr: adapters usually want "
                                "several times the rate that fine-tunes every weight")

    def targets(self) -> list[str]:
        return self.options.target_modules or ["query", "value"]

    def config(self, heads: list[str] | None):
        from peft import LoraConfig

        return LoraConfig(r=self.options.rank, lora_alpha=self.options.alpha, lora_dropout=self.options.lora_dropout,
                          target_modules=self.targets(), modules_to_save=heads)

    def check(self, skeleton):
        super().check(skeleton)
        self.check_targets(skeleton)

    def check_targets(self, skeleton):
        """Every target names Linear or pointwise (1x1, ungrouped) Conv2d modules only: peft's
        adapter for a wider convolution would not pad as a TensorFlow-style "same" convolution does."""
        targets = self.targets()
        fits, misfits = set(), set()
        for name, module in skeleton.named_modules():
            pointwise = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            (fits if isinstance(module, torch.nn.Linear) or pointwise else misfits).add(name.rsplit(".", 1)[-1])
        missing = [t for t in targets if t not in fits or t in misfits]
        if missing:
            raise UserError("strategy.target_modules", f"no Linear or 1x1 Conv2d module named {', '.join(missing)} in {type(skeleton).__name__} "
                            f"(or not every module of that name is one); candidates: {', '.join(sorted(fits - misfits))}")

    def select(self, model, task):
        from peft import get_peft_model

        model = get_peft_model(model, self.config(task.head_names(model)))
        if self.options.lr_scale != 1:
            scale_module_lr(model, ["lora_A", "lora_B"], self.options.lr_scale)
        return model

    def save_adapter(self, model, directory):
        """The adapters and the head alone (``adapter_config.json``, ``adapter_model.safetensors``)."""
        model.save_pretrained(directory, safe_serialization=True)

    def export(self, model):
        return model.merge_and_unload()
