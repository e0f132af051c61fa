"""Checkpoint optimizer state of torchao's low-bit optimizers: each rank's shard as plain weights_only-safe data
(`sharded_optimizer_state`) and back on the same mesh (`load_sharded_optimizer_state`); why, in
`vppo_recipes.checkpointing`'s docstring."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["load_sharded_optimizer_state", "sharded_optimizer_state"]

# Quantized optimizer-state tensor subclasses a sharded optimizer file may name (rebuilt from their parts).
_STATE_SUBCLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
}


def _is_state_subclass(t: Any) -> bool:
    """True for a quantized optimizer state (a tensor subclass), whether or not wrapped in a DTensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return isinstance(local, torch.Tensor) and type(local) is not torch.Tensor


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter FQNs of each param group, in the optimizer's order (FSDP2 keeps the original names)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def _encode_state(value: Any) -> Any:
    """One optimizer-state entry as weights_only-loadable plain data: this rank's shard of it, on CPU."""
    if not isinstance(value, torch.Tensor):
        return value
    local = value.to_local() if isinstance(value, DTensor) else value
    if type(local) is torch.Tensor:
        return {"tensor": local.detach().cpu().clone(), "dtensor": isinstance(value, DTensor)}
    cls = type(local)
    names, attributes = local.__tensor_flatten__()
    return {
        "subclass": f"{cls.__module__}.{cls.__qualname__}",
        "parts": {n: getattr(local, n).detach().cpu().clone() for n in names},
        "attributes": [tuple(a) if isinstance(a, torch.Size) else a for a in attributes],
        "dtensor": isinstance(value, DTensor),
    }


def _decode_state(entry: Any, param: torch.Tensor, where: str) -> Any:
    """Inverse of `_encode_state`, placed like `param` (the same DTensor spec, device)."""
    if not isinstance(entry, dict) or not ("tensor" in entry or "subclass" in entry):
        return entry
    device = param.device
    if "tensor" in entry:
        local = entry["tensor"].to(device)
    else:
        name = entry["subclass"]
        if name not in _STATE_SUBCLASSES:
            raise ValueError(f"{where}: unknown optimizer-state type {name!r} (known: {sorted(_STATE_SUBCLASSES)})")
        module, qualname = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), qualname)
        parts = {k: v.to(device) for k, v in entry["parts"].items()}
        local = cls.__tensor_unflatten__(parts, list(entry["attributes"]), None, None)
    if not entry["dtensor"]:
        return local
    if not isinstance(param, DTensor):
        raise ValueError(f"{where}: saved from a sharded (FSDP2) model but loaded into an unsharded one")
    want = param.to_local().shape
    if local.shape != want:
        raise ValueError(
            f"{where}: this rank's saved shard has shape {tuple(local.shape)} but the parameter's shard is "
            f"{tuple(want)}: the checkpoint was written on another mesh; resume with the same world size and "
            "world.hsdp_replicas"
        )
    out = DTensor.from_local(
        local,
        device_mesh=param.device_mesh,
        placements=param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
    return out.to(device)  # from_local moves to the mesh's device type; keep CPU-offloaded states on CPU


def sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shard of the optimizer state, keyed by parameter FQN, as plain weights_only-safe data.

    Tensor subclasses (torchao's quantized states) are stored as their parts (`__tensor_flatten__`), DTensors as
    their local shard. Not collective. Returns `{"state": {fqn: {key: entry}}, "param_groups": [...]}` where each
    group's "params" lists FQNs.
    """
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, group_names in zip(sd["param_groups"], names):
        index_to_name.update(zip(group["params"], group_names))
    state = {index_to_name[i]: {k: _encode_state(v) for k, v in st.items()} for i, st in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": n} for g, n in zip(sd["param_groups"], names)]
    return {"state": state, "param_groups": groups}


def load_sharded_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, payload: Mapping[str, Any], *, where: str = "optimizer"
) -> None:
    """Inverse of `sharded_optimizer_state` on the same mesh; ValueError naming the entry on any mismatch."""
    names = _param_names(model, optimizer)
    saved_names = [list(g["params"]) for g in payload["param_groups"]]
    if saved_names != names:
        raise ValueError(f"{where}: saved for parameters {saved_names[:1]}... but the optimizer has {names[:1]}...")
    params = {n: p for g, gn in zip(optimizer.param_groups, names) for p, n in zip(g["params"], gn)}
    # Hyperparameters (and torchao's tensor lr) through the regular path, states placed by hand: load_state_dict
    # would cast every state to the parameter's dtype, which a quantized state cannot take.
    index = 0
    groups = []
    for g in payload["param_groups"]:
        groups.append({**g, "params": list(range(index, index + len(g["params"])))})
        index += len(g["params"])
    optimizer.load_state_dict({"state": {}, "param_groups": groups})
    for fqn, st in payload["state"].items():
        if fqn not in params:
            raise ValueError(f"{where}: state for {fqn!r}, which the model does not have")
        optimizer.state[params[fqn]] = {
            k: _decode_state(v, params[fqn], f"{where}[{fqn!r}][{k!r}]") for k, v in st.items()
        }
