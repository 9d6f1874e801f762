"""Finding the layer stack of an arbitrary transformer, so freezing works without a per-model table."""

from __future__ import annotations

from torch import nn


def largest_layer_stack(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the most parameters: the encoder's blocks in every HF model."""
    best_name, best, best_size = "", None, -1
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best_name, best, best_size = name, child, size
    if best is None:
        raise ValueError(f"{type(module).__name__} has no stack of layers (nn.ModuleList)")
    return best_name, best


class ParameterGroup(nn.Module):
    """Several modules treated as one layer group (e.g. embeddings, or a final norm with the top block)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(modules)


def stack_layer_groups(model: nn.Module) -> list[nn.Module]:
    """[everything below the stack] + one group per block, with anything above merged into the top block.

    The returned groups reference the model's own modules (no copies), so ``requires_grad`` changes
    on them act on the model.
    """
    stack_name, stack = largest_layer_stack(model)
    in_stack = {id(p) for p in stack.parameters()}
    below, above = [], []
    seen_stack = False
    for name, child in model.named_modules():
        if name == stack_name:
            seen_stack = True
            continue
        direct = list(child.parameters(recurse=False))
        if not direct or any(id(p) in in_stack for p in direct):
            continue
        (above if seen_stack else below).append(child)
    groups: list[nn.Module] = []
    if below:
        groups.append(ParameterGroup(_whole_modules(model, below)))
    blocks = list(stack)
    if above:
        blocks[-1] = ParameterGroup([blocks[-1], *above])
    groups.extend(blocks)
    return groups


def _whole_modules(model: nn.Module, parts: list[nn.Module]) -> list[nn.Module]:
    """The largest submodules made only of ``parts``' parameters (e.g. BERT's ``embeddings`` for its word,
    position and type embeddings and LayerNorm), so a frozen group also holds their parameterless dropout and
    ``group.eval()`` turns it off."""
    inside = {id(p) for part in parts for p in part.parameters()}
    whole, taken = [], []
    for name, child in model.named_modules():  # parents come before their children
        if child is model or any(name.startswith(t + ".") for t in taken):
            continue
        parameters = list(child.parameters())
        if parameters and all(id(p) in inside for p in parameters):
            whole.append(child)
            taken.append(name)
    return whole


LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layers", "num_layers")


def keep_bottom_layers(model: nn.Module, keep: int) -> int:
    """Drop all but the ``keep`` lowest blocks of a transformers model, in place; returns the original count.

    The model's config is updated too, so the saved config rebuilds the shorter model. Keeping the
    bottom layers of a pretrained encoder gives a smaller, faster student that starts from pretrained
    weights (Sajjad et al. 2023, "On the effect of dropping layers of pre-trained transformer models";
    DistilBERT initialises its student from the teacher's layers the same way).
    """
    from ..errors import UserError

    name, stack = largest_layer_stack(model)
    config = getattr(model, "config", None)
    field = next((f for f in LAYER_COUNT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if field is None:
        raise UserError(f"'keep_layers' needs a transformers model whose config counts its layers; "
                        f"{type(model).__name__} does not: drop keep_layers")
    total = len(stack)
    if not 1 <= keep <= total:
        raise UserError(f"'keep_layers' is {keep} but the model has {total} layers: choose 1 to {total}")
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.ModuleList(list(stack)[:keep]))
    setattr(config, field, keep)
    for per_layer in ("layer_types",):  # configs that describe each layer (e.g. attention types) shrink too
        if isinstance(getattr(config, per_layer, None), list):
            setattr(config, per_layer, getattr(config, per_layer)[:keep])
    return total
