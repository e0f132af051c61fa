"""One whole RL step of the recipe against a plain computation written here (in process, one rank).

The recipe's `rl_step` samples, grades, builds micro-batches, runs its no-grad passes through FSDP and
`logprobs_from_hidden`, shapes the advantages and updates in micro-batches with the global token count. The test
takes the same rollouts (the recipe's collated micro-batches and graded groups) and does everything after sampling
the plain way: a plain transformers model with the same starting weights, log-probs from the full logits, group
advantages from the rewards, VPPO's TAS and TGF or PGPO's weights on the whole mini-batch, one `policy_loss` call on
the concatenated mini-batch, autograd, the same gradient clipping and AdamW step. The parameters after the step and
every logged loss metric must agree. A bug in the glue (a metric divided twice, a token count per micro-batch instead
of per mini-batch, α computed per micro-batch, a mask applied twice) fails here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
import plain_vapo
from _warm_start import warm_assets
from plain_cppo import plain_cppo_term
from plain_vgpo import plain_vgpo_focus, plain_vgpo_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
# AdamW divides each gradient element by its own running RMS, so float32 rounding of a near-zero gradient element
# (full logits here, chunked hidden-state log-probs in the recipe) can move that parameter by a visible fraction of
# lr = 1e-4. Measured after two updates, over the 12 cases of one rank: at most 2 elements differ by more than 1e-6
# in any case, the largest by 5.3e-6 (CGPO, one element: its token selection zeroes half the policy terms, so more
# gradient elements are near zero); 2.1e-6 for GRPO. A bug in the glue moves thousands of elements.
PARAM_ATOL = 1e-5
PARAM_MOVED_ABOVE, PARAM_MOVED_MAX = 1e-6, 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return warm_assets(tmp_path_factory.mktemp("rl_step"))


def _config(assets, out: Path, name: str, overrides: dict):
    from vppo_recipes.config_schema import validate_config

    small = {
        "output_dir": out,
        "model.path": assets["warm"],
        "data.source": assets["task"],
        "world.nproc_per_node": 1,
        "validation.every_n_steps": 0,
        "rollout.group_size": 4,
        "rollout.batch_prompts": 4,
        "rollout.max_filter_draws": 6,
        "rollout.max_new_tokens": 16,
        "batch.update_prompts": 2,  # two mini-batches: the second is off-policy after the first update
        "batch.micro_batch_size": 2,  # four micro-batches per mini-batch
        "metric_logger.log_dir": out / "logs",
    }
    raw = OmegaConf.merge(
        OmegaConf.load(CONFIGS / f"{name}.yaml"),
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in {**small, **overrides}.items()]),
    )
    return validate_config(raw, "rl")


def _full_state(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def capture_step(recipe, monkeypatch) -> dict:
    """Run one `rl_step` of a set-up recipe; return what it saw, as plain data (tensors, lists, dicts).

    {"before", "after": full state dicts, "metrics", "reward" / "accuracy" / "format": [mini][response] of this
     rank's groups,
     "minis": [mini][micro] -> {"inputs", "altered" (or None), "responses", "mask", "prompt_length", "lp_old",
     "lp_alt" (or None)}}. Every rank calls it (gathering the full weights is collective).
    """
    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.methods.views import CounterfactualAttention

    seen = {}
    Recipe = rl.RLRecipeDistributed
    generate_rollouts, prepare_minibatches, no_grad_passes = (
        Recipe.generate_rollouts, Recipe.prepare_minibatches, Recipe.no_grad_passes
    )  # fmt: skip

    def recording(name, phase):
        def method(self, *args):
            seen[name] = phase(self, *args)
            return seen[name]

        return method

    monkeypatch.setattr(Recipe, "generate_rollouts", recording("rollouts", generate_rollouts))
    monkeypatch.setattr(Recipe, "prepare_minibatches", recording("minis", prepare_minibatches))
    monkeypatch.setattr(Recipe, "no_grad_passes", recording("passes", no_grad_passes))
    before = _full_state(recipe.model)
    metrics = recipe.rl_step()
    after = _full_state(recipe.model)
    (minis, _), (steps, _), groups = seen["minis"], seen["passes"], seen["rollouts"].groups
    per_mini = len(groups) // len(minis)
    own_views = len(recipe.method.views())  # the loss reads them (not the diagnostics' view)

    def score(scores):  # the method's one per-token score, by its own name
        return next((scores[k] for k in ("abs_log_ratio", "vepo_score", "prior", "focus") if k in scores), None)

    def entropy(scores):
        return next((scores[k] for k in ("top_p_entropy", "entropy") if k in scores), None)

    return {
        "before": before,
        "after": after,
        "metrics": metrics,
        **{
            key: [
                [r for g in groups[i * per_mini : (i + 1) * per_mini] for r in getattr(g, key)]
                for i in range(len(minis))
            ]
            for key in ("reward", "accuracy", "format")
        },
        "minis": [
            [
                {
                    "inputs": dict(mb.inputs),
                    "altered": recipe.view_inputs(mb, 0).inputs if own_views else None,
                    "responses": mb.responses,
                    "mask": mb.mask,
                    "prompt_length": mb.prompt_length,
                    "lp_old": s.no_grad.lp_old,
                    "lp_alt": s.no_grad.lp_views[0] if s.no_grad.lp_views else None,
                    # every altered view's inputs and prompt length (ToR's has no image: another length); not the
                    # counterfactual view, whose change is inside the forward
                    "views": [
                        [v.inputs, v.prompt_length]
                        for i in range(len(recipe.views))
                        if not isinstance(recipe.views[i], CounterfactualAttention)
                        for v in [recipe.view_inputs(mb, i)]
                    ],
                    "lp_alt2": s.no_grad.lp_views[1] if len(s.no_grad.lp_views) > 1 else None,
                    "score": score(s.no_grad.scores),
                    "entropy": entropy(s.no_grad.scores),
                    "uids": list(mb.uids),  # the row's prompt (VGPO's response groups, DyCo's z-score groups)
                    "response_index": list(mb.response_index),
                    "texts": list(mb.texts),  # what a scorer reads (Perceval)
                    "questions": [p.question for p in mb.prompts],
                    "scores": dict(s.no_grad.scores),
                    "entropy_alt": s.no_grad.scores.get("entropy_alt"),  # CPPO's negative view
                    "vapo": plain_vapo.capture(recipe, mb, s.no_grad.scores),  # VAPO's probe, else None
                }
                for mb, s in zip(mini, mini_steps)
            ]
            for mini, mini_steps in zip(minis, steps)
        ],
    }


def _plain_logprobs(model, inputs, responses, prompt_length: int, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of every response token, from the model's full logits."""
    logits = model(**inputs, use_cache=False).logits.float()
    L = responses.shape[1]
    lp = F.log_softmax(logits[:, prompt_length - 1 : prompt_length - 1 + L] / temperature, dim=-1)
    return lp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [b, L_i] tensors along rows, zero-padding each to the longest L."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])


def _plain_logits(model, inputs, prompt_length: int, length: int, temperature: float) -> torch.Tensor:
    """[B, L, V] float64 logits / T at the positions that predict the response tokens, from the full logits."""
    logits = model(**inputs, use_cache=False).logits
    return logits[:, prompt_length - 1 : prompt_length - 1 + length].double() / temperature


def _plain_entropy(z: torch.Tensor) -> torch.Tensor:
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def _plain_top_p_entropy(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Entropy of the renormalised nucleus: sorted probabilities kept while the mass before them is < top_p."""
    p = torch.softmax(z, -1).sort(-1, descending=True).values
    kept = torch.where(p.cumsum(-1) - p < top_p, p, torch.zeros_like(p))
    k = kept / kept.sum(-1, keepdim=True)
    return -(k * torch.log(torch.where(k > 0, k, torch.ones_like(k)))).sum(-1)


def _plain_jsd(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    p, q = torch.softmax(za, -1), torch.softmax(zb, -1)
    m = (p + q) / 2
    kl = lambda x: (x * (torch.log(torch.where(x > 0, x, torch.ones_like(x))) - torch.log(m))).sum(-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def _plain_visual_prior(model, inputs, prompt_length: int, length: int, image_token_id: int) -> torch.Tensor:
    """PEPO's prior the plain way: every layer's full [T, n_visual] cosine matrix, averaged over the visual tokens,
    then over the layers, at the response tokens' own positions."""
    states = model.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    out = torch.zeros(inputs["input_ids"].shape[0], length, dtype=torch.float64)
    for b in range(out.shape[0]):
        visual = inputs["input_ids"][b] == image_token_id
        for h in states:
            x = F.normalize(h[b].double(), dim=-1)
            out[b] += (x[prompt_length : prompt_length + length] @ x[visual].T).mean(-1)
    return out / len(states)


METHODS_AFTER_VPPO = ("papo", "dvrp", "tor", "cgpo", "vepo", "pepo", "vgpo", "noisyrollout", "cppo")
# methods without token weights of their own (their terms are added to the loss, or only the sampling changes)
UNWEIGHTED = ("papo", "dvrp", "noisyrollout", "cppo")


def _plain_method_weights(model, cfg, minis: list[list[dict]]) -> list[list[torch.Tensor]]:
    """The §9 methods' token weights of every micro-batch, [mini][micro], after checking the recipe's no-grad
    values against plain full-logit ones. As for TGF, the selections are then made from the recipe's values (a
    1e-7 difference at a near-tie would pick another token), over the whole batch in data order where the method
    says so (ToR, CGPO), with vppo-core's functions: what is checked is the glue around them."""
    from vppo_core.dependency import token_dependency, trajectory_dependency, vepo_token_scores
    from vppo_core.masking import top_fraction_mask
    from vppo_core.shaping import cgpo_response_factors, pepo_token_weights, tor_token_weights

    a, T = cfg.algorithm, float(cfg.rollout.temperature)
    flat = [mb for mini in minis for mb in mini]

    def close(got, want, mask, atol, what):
        assert torch.allclose(got.double() * mask, want.double() * mask, atol=atol), what

    with torch.no_grad():
        for mb in flat:
            mask, L = mb["mask"], mb["responses"].shape[1]
            for j, (inputs, prompt_length) in enumerate(mb["views"]):
                # the view holds the same responses after its own prompt (ToR's has no image: another length)
                span = inputs["input_ids"][:, prompt_length : prompt_length + L]
                assert torch.equal(span[mask > 0], mb["responses"][mask > 0]), f"view {j} holds other responses"
                alt = _plain_logprobs(model, inputs, mb["responses"], prompt_length, T)
                close(mb["lp_alt" if j == 0 else "lp_alt2"], alt, mask, 2e-5, f"altered view {j}")
            if cfg.algorithm.name in ("tor", "cgpo", "vepo", "pepo", "cppo"):
                z = _plain_logits(model, mb["inputs"], mb["prompt_length"], L, T)
            if cfg.algorithm.name == "tor":
                close(mb["entropy"], _plain_top_p_entropy(z, a.tor_entropy_top_p), mask, 1e-4, "top-p entropy")
                close(mb["score"], (mb["lp_old"] - mb["lp_alt"]).abs(), mask, 0, "ToR score")
            if cfg.algorithm.name in ("cgpo", "pepo"):
                close(mb["entropy"], _plain_entropy(z), mask, 1e-4, "entropy")
            if cfg.algorithm.name == "vepo":
                inputs, prompt_length = mb["views"][0]
                zb = _plain_logits(model, inputs, prompt_length, L, T)
                jsd, h, h_alt = _plain_jsd(z, zb), _plain_entropy(z), _plain_entropy(zb)
                close(
                    mb["score"],
                    vepo_token_scores(jsd, h, h_alt - h, mask, jsd_weight=a.vepo_jsd_weight),
                    mask,
                    1e-3,
                    "VEPO",
                )
            if cfg.algorithm.name == "cppo":  # both entropies of the perception-token mask
                inputs, prompt_length = mb["views"][0]  # the negative view
                close(mb["entropy"], _plain_entropy(z), mask, 1e-4, "CPPO clean entropy")
                zb = _plain_logits(model, inputs, prompt_length, L, T)
                close(mb["entropy_alt"], _plain_entropy(zb), mask, 1e-4, "CPPO negative-view entropy")
            if cfg.algorithm.name == "pepo":
                prior = _plain_visual_prior(
                    model, mb["inputs"], mb["prompt_length"], L, int(model.config.image_token_id)
                )
                close(mb["score"], prior, mask, 1e-5, "PEPO prior")
            if cfg.algorithm.name == "vgpo":
                focus = plain_vgpo_focus(model, mb["inputs"], mb["prompt_length"], L, int(model.config.image_token_id))
                close(mb["score"], focus, mask, 1e-5, "VGPO focus")

    def batch_set(values: list[torch.Tensor], fraction: float, which: int) -> list[torch.Tensor]:
        """The set over the whole batch in data order, ties broken by the recipe's seeded draw (step 0)."""
        from vppo_recipes.methods.base import TIE_BREAK_SALT
        from vppo_recipes.seeding import mix_seed

        flat_values = torch.cat([v[mb["mask"] > 0] for mb, v in zip(flat, values)])[None]
        ties = torch.Generator().manual_seed(mix_seed(int(cfg.seed), 0, TIE_BREAK_SALT, which))
        top = top_fraction_mask(
            flat_values, torch.ones_like(flat_values), fraction=fraction, scope="batch", generator=ties
        )[0]
        out, start = [], 0
        for mb in flat:
            valid = mb["mask"] > 0
            chosen = torch.zeros_like(valid)
            chosen[valid] = top[start : start + int(valid.sum())]
            out.append(chosen)
            start += int(valid.sum())
        return out

    name = cfg.algorithm.name
    if name in UNWEIGHTED:
        weights = [None] * len(flat)
    elif name == "tor":
        reasoning = batch_set([mb["entropy"] for mb in flat], a.tor_entropy_fraction, 0)
        perception = batch_set([mb["score"] for mb in flat], a.tor_perception_fraction, 1)
        weights = [
            tor_token_weights(r, q, mb["mask"], reasoning_weight=a.tor_reasoning_weight,
                              perception_weight=a.tor_perception_weight)
            for mb, r, q in zip(flat, reasoning, perception)
        ]  # fmt: skip
    elif name == "cgpo":
        S = [token_dependency(mb["lp_old"], mb["lp_alt"], mb["mask"]) for mb in flat]
        entropic = batch_set([mb["entropy"] for mb in flat], a.cgpo_entropy_fraction, 0)
        perception = batch_set(S, a.cgpo_perception_fraction, 1)
        traj = torch.cat([trajectory_dependency(s, mb["mask"]) for s, mb in zip(S, flat)])
        valid = torch.cat([mb["mask"].sum(1) > 0 for mb in flat])
        alpha = cgpo_response_factors(traj, valid, coef=a.cgpo_coef).split([mb["mask"].shape[0] for mb in flat])
        weights = [
            torch.where(q, al[:, None], torch.ones_like(mb["mask"])) * (e | q).float() * mb["mask"]
            for mb, al, e, q in zip(flat, alpha, entropic, perception)
        ]
    elif name == "vepo":  # the top fraction of each response, the policy term a mean over the selected tokens
        weights = []
        for mini in minis:
            chosen = [top_fraction_mask(mb["score"], mb["mask"], fraction=a.vepo_fraction) for mb in mini]
            if cfg.loss.aggregation == "token-mean":  # of the whole mini-batch
                scale = sum(float(mb["mask"].sum()) for mb in mini) / sum(float(c.sum()) for c in chosen)
                weights += [c.float() * scale for c in chosen]
            else:  # of each response
                for mb, c in zip(mini, chosen):
                    n, k = mb["mask"].sum(1, keepdim=True), c.sum(1, keepdim=True).clamp(min=1)
                    weights.append(c.float() * n / k)
    elif name == "vgpo":  # from the recipe's focus, every row of the rollout batch at once
        weights = plain_vgpo_weights([mb["score"] for mb in flat], [mb["mask"] for mb in flat],
                                     [mb["uids"] for mb in flat], a)  # fmt: skip
    else:  # pepo, its schedule at this (first) step
        total = int(cfg.training.max_steps)
        progress = 1.0 if total <= 1 else 0.0
        weights = [
            pepo_token_weights(mb["score"], mb["entropy"], mb["mask"], gate_alpha=a.pepo_gate_alpha,
                               temperature=a.pepo_temperature, progress=progress)
            for mb in flat
        ]  # fmt: skip
    out, start = [], 0
    for mini in minis:
        out.append(weights[start : start + len(mini)])
        start += len(mini)
    return out


class PlainLoRALinear(torch.nn.Module):
    """y = W x + b + scaling · B (A x), written out: the frozen layer and A [r, in], B [out, r] under peft's names
    (`base_layer`, `lora_A.default`, `lora_B.default`) so the recipe's state dict loads into it; no peft code."""

    def __init__(self, base: torch.nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer, self.scaling = base.requires_grad_(False), scaling
        self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.empty(rank, base.in_features))})
        self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.empty(base.out_features, rank))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * (x @ self.lora_A["default"].T) @ self.lora_B["default"].T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # peft's `lora_A.default.weight` names
        for ab in ("lora_A", "lora_B"):
            key = f"{prefix}{ab}.default.weight"
            if key in state_dict:
                state_dict[f"{prefix}{ab}.default"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def plain_lora(model: torch.nn.Module, before: dict, cfg) -> None:
    """Freeze `model` and put a PlainLoRALinear at every layer the recipe's state dict `before` adapted."""
    lora = cfg.model.lora
    scaling = float(lora.alpha if lora.alpha is not None else lora.rank) / int(lora.rank)
    model.requires_grad_(False)
    for key in before:
        if key.endswith(".lora_A.default.weight"):
            path = key.removesuffix(".lora_A.default.weight")
            parent, name = path.rsplit(".", 1)
            setattr(model.get_submodule(parent), name, PlainLoRALinear(model.get_submodule(path), lora.rank, scaling))


def _data_order(mini: list[dict]) -> torch.Tensor:
    """Per row of the concatenated micro-batches, its index in the mini-batch's data order (prompt, response
    index): the identity for fixed micro-batches; micro-batches by token budget take the rows longest first."""
    keys = [k for mb in mini for k in zip(mb["uids"], mb["response_index"])]
    index = {k: n for n, k in enumerate(sorted(keys))}
    return torch.tensor([index[k] for k in keys])


def plain_step(cfg, warm: Path, before: dict, ranks: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The step after sampling, the plain way, on the micro-batches of all `ranks` (captures of `capture_step`).

    Returns (parameters after the step, the expected loss and actor/* metrics).
    """
    from vppo_core.advantages import group_advantages
    from vppo_core.dependency import token_dependency, trajectory_dependency
    from vppo_core.losses import kl_penalty, policy_loss
    from vppo_core.masking import tgf_mask
    from vppo_core.shaping import pgpo_token_weights, tas_scale
    from vppo_rollout.loading import load_policy

    model = load_policy(warm)
    if cfg.model.lora.rank:
        plain_lora(model, before, cfg)
    model.load_state_dict(before)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    T, G, name, a, L_ = (
        float(cfg.rollout.temperature),
        int(cfg.rollout.group_size),
        cfg.algorithm.name,
        cfg.algorithm,
        cfg.loss,
    )
    n_minis = len(ranks[0]["minis"])
    # global mini-batch i = every rank's share of it (ranks own whole groups)
    minis = [[mb for r in ranks for mb in r["minis"][i]] for i in range(n_minis)]
    rewards = [[x for r in ranks for x in r["reward"][i]] for i in range(n_minis)]
    if name == "vapo":  # VAPO's own reward, from the plain perception score of every response
        rewards = [
            plain_vapo.rewards(
                a, [x for r in ranks for x in r["accuracy"][i]], [x for r in ranks for x in r["format"][i]],
                [p for mb in minis[i] for p in plain_vapo.perception(model, a, mb["vapo"])],
            )
            for i in range(n_minis)
        ]  # fmt: skip

    # lp_old (and the altered pass) of every micro-batch, before any update
    with torch.no_grad():
        plain_old = [[_plain_logprobs(model, mb["inputs"], mb["responses"], mb["prompt_length"], T) for mb in mini]
                     for mini in minis]  # fmt: skip
        plain_alt = None
        if name in ("vppo", "pgpo"):  # the altered inputs are the recipe's (perturbation / text-only mask)
            plain_alt = [[_plain_logprobs(model, mb["altered"], mb["responses"], mb["prompt_length"], T)
                          for mb in mini] for mini in minis]  # fmt: skip

    method_weights = _plain_method_weights(model, cfg, minis) if name in METHODS_AFTER_VPPO else None
    if name == "dyco":  # its advantage factors, from transformers' eager attention (plain_dyco.py)
        from plain_dyco import dyco_factors

        factors = dyco_factors(model, cfg, minis)

    losses, mini_metrics = [], []
    for i, mini in enumerate(minis):
        mask = _cat([mb["mask"] for mb in mini])
        # The recipe's no-grad passes agree with the full-logit values; from here on its lp_old / lp_alt are the
        # inputs, because TGF's top-k and PGPO's threshold turn a 1e-7 difference in a near-tie into another token
        # choice (measured: S agrees to 1.2e-7, yet some TGF masks differ when recomputed from the plain values).
        old = _cat([mb["lp_old"] for mb in mini])
        assert torch.allclose(_cat(plain_old[i]) * mask, old * mask, atol=2e-5), "lp_old differs from the full logits"
        # in the rows' order in the micro-batches: data order, or longest first with a token budget
        adv = group_advantages(torch.tensor(rewards[i]), G)[_data_order(mini)]
        if name == "dyco":
            adv = adv * factors[i]
        weights = None
        if name in ("vppo", "pgpo"):
            alt = _cat([mb["lp_alt"] for mb in mini])
            assert torch.allclose(_cat(plain_alt[i]) * mask, alt * mask, atol=2e-5), (
                "lp_alt differs from the full logits"
            )
            S = token_dependency(old, alt, mask)
            if name == "vppo":
                if a.tas:
                    adv = adv * tas_scale(trajectory_dependency(S, mask), beta_min=a.beta_min, valid=mask.sum(1) > 0)
                if a.tgf:
                    weights = tgf_mask(S, mask, fraction=a.tgf_fraction).float()
            else:
                weights = pgpo_token_weights(S, mask, tau=a.pgpo_tau, beta=a.pgpo_beta)
        if name == "perceval":  # Â − α·|Â| on the flagged tokens, as [B, L] advantages, no token weights
            from plain_perceval import plain_perceval_advantages

            adv = plain_perceval_advantages(cfg, warm, adv, mini)
        aux = {}
        if name in METHODS_AFTER_VPPO:
            weights = _cat(method_weights[i]) if name not in UNWEIGHTED else None
            z = [_plain_logits(model, mb["inputs"], mb["prompt_length"], mb["responses"].shape[1], T) for mb in mini]
            new = _cat([F.log_softmax(x, -1).gather(-1, mb["responses"][..., None])[..., 0] for x, mb in zip(z, mini)])
            if name in ("papo", "dvrp"):  # k3 of each altered view against the policy, the views constant
                coef = a.visual_kl_coef if name == "papo" else a.necessity_kl_coef
                key = "visual_kl" if name == "papo" else "necessity_kl"
                aux[key] = (-coef, kl_penalty(new, _cat([mb["lp_alt"] for mb in mini]), "k3"))
            if name == "dvrp":
                aux["robustness_kl"] = (a.robustness_kl_coef, kl_penalty(new, _cat([mb["lp_alt2"] for mb in mini])))
            if name == "cppo":  # from the recipe's entropies and views (the mask as for TGF), the rest plain
                aux["cpl"] = (a.cpl_coef, plain_cppo_term(new, mini, adv, a, L_.aggregation))
            if name == "vepo":
                aux["entropy_bonus"] = (-a.vepo_entropy_bonus, _cat([_plain_entropy(x) for x in z]))
            if name == "noisyrollout":  # on the clean images: the micro-batches' inputs (checked in test_noisyrollout)
                aux["entropy_bonus"] = (-a.noisyrollout_entropy_bonus, _cat([_plain_entropy(x) for x in z]))
        else:
            new = _cat([_plain_logprobs(model, mb["inputs"], mb["responses"], mb["prompt_length"], T) for mb in mini])
        loss, m = policy_loss(
            new, old, adv, mask, token_weights=weights, loss_type=L_.loss_type, clip_low=L_.clip_low,
            clip_high=L_.clip_high, dual_clip=L_.dual_clip, entropy_coef=L_.entropy_coef, aggregation=L_.aggregation,
            aux_terms=aux,
        )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(cfg.training.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        valid = mask > 0
        active = valid if weights is None else valid & (weights != 0)
        losses.append(float(loss))
        mini_metrics.append((m, float(valid.sum()), float(active.sum())))

    # losses averaged over the updates, means weighted by the tokens they are over
    expected = {"loss": sum(losses) / len(losses), "actor/loss": sum(losses) / len(losses)}
    expected["actor/pg_loss"] = sum(float(m["pg_loss"]) for m, _, _ in mini_metrics) / len(mini_metrics)
    for key in ("entropy", "approx_kl", "ratio_mean", "token_weight_nonzero_frac"):
        tokens = sum(n for _, n, _ in mini_metrics)
        expected[f"actor/{key}"] = sum(float(m[key]) * n for m, n, _ in mini_metrics) / tokens
    for key in ("clipfrac_high", "clipfrac_low", "clipfrac_dual"):
        total = sum(k for _, _, k in mini_metrics)
        expected[f"actor/{key}"] = sum(float(m[key]) * k for m, _, k in mini_metrics) / total if total else math.nan
    expected["actor/ratio_max"] = max(float(m["ratio_max"]) for m, _, _ in mini_metrics)
    for key in (k for k in mini_metrics[0][0] if k.startswith("aux/")):
        tokens = sum(n for _, n, _ in mini_metrics)
        expected[f"actor/{key}"] = sum(float(m[key]) * n for m, n, _ in mini_metrics) / tokens
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k.replace(".lora_A.default", ".lora_A.default.weight").replace(".lora_B.default", ".lora_B.default.weight")
            if ".lora_" in k else k: v for k, v in params.items()}, expected  # fmt: skip


def assert_step_matches(before, after, metrics, plain_params, expected) -> None:
    for key, value in expected.items():  # first: a wrong metric says more than a moved parameter
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert plain_params.keys() == after.keys()
    diffs = {k: (after[k].float() - v.float()).abs() for k, v in plain_params.items()}
    worst = max(d.max().item() for d in diffs.values())
    moved = sum(int((d > PARAM_MOVED_ABOVE).sum()) for d in diffs.values())
    assert worst <= PARAM_ATOL and moved <= PARAM_MOVED_MAX, (
        f"max |param diff| {worst:.3g}; {moved} elements differ by more than {PARAM_MOVED_ABOVE:g}"
    )
    lora = [k for k in after if ".lora_B." in k]
    if lora:  # LoRA: the adapters train (B starts at 0, so it moves first), the base and the vision tower do not
        assert all(".language_model.layers." in k for k in lora) and len(lora) == 14  # 7 projections x 2 layers
        assert all(torch.equal(after[k], before[k]) for k in after if ".lora_" not in k), "a frozen weight moved"
        assert max((after[k] - before[k]).abs().max() for k in lora) > 1e-5, "nothing trained"
        return
    assert (after["lm_head.weight"] - before["lm_head.weight"]).abs().max() > 1e-5, "nothing trained"


CASES = [
    ("tiny_vppo", {}),
    ("tiny_pgpo", {}),
    ("tiny_dapo", {}),
    ("tiny_grpo", {}),
    ("tiny_dapo", {"loss.loss_type": "gspo", "loss.aggregation": "seq-mean-token-mean", "loss.dual_clip": "null"}),
    # ALGORITHMS.md §9 (CFPO's loss is PAPO's; its counterfactual forward is tested in test_counterfactual.py)
    ("tiny_papo", {}),
    ("tiny_dvrp", {}),
    ("tiny_tor", {}),
    ("tiny_cgpo", {}),
    ("tiny_vepo", {}),
    ("tiny_vepo", {"loss.aggregation": "seq-mean-token-mean"}),  # VEPO's per-response mean over its selection
    ("tiny_pepo", {"training.max_steps": 1}),  # a 1-step run's schedule is at λ = 1: the weights are not all 1
    ("tiny_vgpo", {}),
    ("tiny_noisyrollout", {}),  # G = 4: 2 responses on the clean image, 2 on its noised copy, one group
    ("tiny_perceval", {}),  # the stand-in scorer's flags (ALGORITHMS.md §9.14)
    ("tiny_dyco", {}),
    # CPPO's published coefficient 0.01 moves the tiny model too little to tell a wrong term from a right one
    ("tiny_cppo", {"algorithm.cpl_coef": 1.0}),
    ("tiny_cppo", {"algorithm.cpl_coef": 1.0, "loss.aggregation": "seq-mean-token-mean"}),
    ("tiny_vapo", {}),  # its own reward (the policy's verdicts on the task's claims): its own group advantages
    # LoRA: the plain side adapts its own layers (PlainLoRALinear) and trains A and B alone; alpha != rank so a wrong
    # scaling shows. Its lr is LoRA's usual 10x the full fine-tuning one, so that the adapters move visibly.
    ("tiny_vppo", {"model.lora.rank": 4, "model.lora.alpha": 8, "optimizer.lr": 1e-3}),
]
IDS = ["vppo", "pgpo", "dapo", "grpo", "gspo", "papo", "dvrp", "tor", "cgpo", "vepo", "vepo_seq", "pepo"]
IDS += ["vgpo", "noisyrollout", "perceval", "dyco", "cppo", "cppo_seq", "vapo", "vppo_lora"]


@pytest.mark.parametrize(("config", "overrides"), CASES, ids=IDS)
def test_one_rl_step_equals_a_plain_computation(assets, tmp_path, monkeypatch, config, overrides):
    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl

    cfg = _config(assets, tmp_path / "run", config, overrides)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        captured = capture_step(recipe, monkeypatch)
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    metrics = captured["metrics"]
    assert metrics["filter/groups_kept"] == 4 and len(captured["minis"]) == 2, "the rollout batch must be full"
    plain_params, expected = plain_step(cfg, assets["warm"], captured["before"], [captured])
    assert_step_matches(captured["before"], captured["after"], metrics, plain_params, expected)


@pytest.mark.distributed
@pytest.mark.parametrize(("config", "overrides"), CASES, ids=IDS)
def test_one_rl_step_on_two_ranks_equals_a_plain_computation(assets, tmp_path, config, overrides):
    """The same check with the step run by 2 processes (FSDP2 over gloo): the plain computation sees the union of
    both ranks' micro-batches as each global mini-batch."""
    import os
    import subprocess

    from _rl_launch import ENV

    cfg = _config(assets, tmp_path / "run", config, {**overrides, "world.nproc_per_node": 2})
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    out = tmp_path / "captured"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("rl_step_worker.py")), str(tmp_path / "config.yaml"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    metrics = ranks[0]["metrics"]
    assert metrics["filter/groups_kept"] == 4 and len(ranks[0]["minis"]) == 2, "the rollout batch must be full"
    plain_params, expected = plain_step(cfg, assets["warm"], ranks[0]["before"], ranks)
    assert_step_matches(ranks[0]["before"], ranks[0]["after"], metrics, plain_params, expected)


# --------------------------------------------------------------------------------------------------------------------
# Micro-batches by token budget (batch.max_tokens_per_micro_batch): the same step whatever the split
# --------------------------------------------------------------------------------------------------------------------

# VPPO (token-mean) and GSPO's sequence-mean loss; the task's prompts are 79 tokens, so with data.max_prompt_length=80
# budgets from 96 positions are accepted: 192 holds about 2 rows (of 80-95 positions), 400 about 4.
BUDGET_CASES = {
    "vppo": ("tiny_vppo", {}),
    "gspo": (
        "tiny_dapo",
        {"loss.loss_type": "gspo", "loss.aggregation": "seq-mean-token-mean", "loss.dual_clip": "null"},
    ),
}
BUDGETS = (192, 400)
# cap: up to 8 rows per micro-batch (the fixed split of the cases above is 2 rows in data order)
BUDGET_SETTINGS = {"data.max_prompt_length": 80, "batch.micro_batch_size": 8}


def step_with_rollouts(cfg, rollouts=None):
    """Set up a recipe from `cfg` (in the current process group) and capture one `rl_step` (`capture_step`) on
    `rollouts` (a previous step's `Rollouts`, sampled from the same weights), or on its own when None. Returns
    (captured, the rollouts it trained on)."""
    import vppo_recipes.rl.rl_distributed as rl

    sample = rl.RLRecipeDistributed.generate_rollouts
    used = {}

    def rollouts_of(self):
        used["rollouts"] = sample(self) if rollouts is None else rollouts
        return used["rollouts"]

    recipe = rl.RLRecipeDistributed(cfg)
    recipe.setup(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl.RLRecipeDistributed, "generate_rollouts", rollouts_of)
        captured = capture_step(recipe, mp)
    recipe.metric_logger.close()
    return captured, used["rollouts"]


def _plain_padding_fraction(ranks: list[dict]) -> float:
    """Padding positions / computed positions of the captured micro-batches, counted position by position."""
    computed = padding = 0
    for r in ranks:
        for mini in r["minis"]:
            for mb in mini:
                for row in mb["inputs"]["attention_mask"].tolist():
                    computed += len(row)
                    padding += row.count(0)
    return padding / computed


def assert_budget_split(ranks: list[dict], budget: int) -> None:
    """The captured micro-batches hold the budget and the row cap, are not the fixed split in data order, every
    rank ran as many, and the step's padding metrics are the plain count of their positions."""
    micro = [mb for r in ranks for mini in r["minis"] for mb in mini]
    assert all(mb["inputs"]["input_ids"].numel() <= budget and mb["mask"].shape[0] <= 8 for mb in micro)
    keys = [k for r in ranks for mini in r["minis"] for mb in mini for k in zip(mb["uids"], mb["response_index"])]
    sizes = [mb["mask"].shape[0] for mb in micro]
    assert keys != sorted(keys) or sizes != [2] * len(sizes), "the budget gave the fixed split"
    for i in range(len(ranks[0]["minis"])):
        assert len({len(r["minis"][i]) for r in ranks}) == 1, "the ranks ran different numbers of forwards"
    metrics = ranks[0]["metrics"]
    assert metrics["throughput/padding_fraction"] == pytest.approx(_plain_padding_fraction(ranks), abs=1e-12)
    assert metrics["throughput/largest_micro_batch_positions"] == max(mb["inputs"]["input_ids"].numel() for mb in micro)


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_one_rl_step_with_token_budgets_equals_a_plain_computation(assets, tmp_path, case):
    """Micro-batches of at most 192 and 400 padded positions (longest rows first, up to 8 rows) instead of 2 rows in
    data order: the step still equals the plain computation on the whole mini-batch (1 rank; the second budget
    trains on the first one's rollouts, from the same weights)."""
    import torch.distributed as dist

    config, overrides = BUDGET_CASES[case]
    rollouts = None
    for budget in BUDGETS:
        settings = {**overrides, **BUDGET_SETTINGS, "batch.max_tokens_per_micro_batch": budget}
        cfg = _config(assets, tmp_path / f"run{budget}", config, settings)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            captured, rollouts = step_with_rollouts(cfg, rollouts)
        finally:
            dist.destroy_process_group()
        assert captured["metrics"]["filter/groups_kept"] == 4 and len(captured["minis"]) == 2
        assert_budget_split([captured], budget)
        plain_params, expected = plain_step(cfg, assets["warm"], captured["before"], [captured])
        assert_step_matches(captured["before"], captured["after"], captured["metrics"], plain_params, expected)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_one_rl_step_with_token_budgets_on_two_ranks_equals_a_plain_computation(assets, tmp_path, case):
    """Both budgets on 2 processes (FSDP2 over gloo), each rank splitting its half of every mini-batch, as many
    micro-batches on both."""
    import os
    import subprocess

    from _rl_launch import ENV

    config, overrides = BUDGET_CASES[case]
    cfg = _config(assets, tmp_path / "run", config, {**overrides, **BUDGET_SETTINGS, "world.nproc_per_node": 2})
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    out = tmp_path / "captured"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("rl_step_worker.py")), str(tmp_path / "config.yaml"), str(out),
           *map(str, BUDGETS)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for budget in BUDGETS:
        ranks = [torch.load(out / f"rank{r}_budget{budget}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["metrics"]["filter/groups_kept"] == 4
        assert_budget_split(ranks, budget)
        cfg.batch.max_tokens_per_micro_batch = budget
        plain_params, expected = plain_step(cfg, assets["warm"], ranks[0]["before"], ranks)
        assert_step_matches(ranks[0]["before"], ranks[0]["after"], ranks[0]["metrics"], plain_params, expected)


def test_cgpo_counterfactual_view_fills_exactly_the_named_boxes(assets, tmp_path):
    """The recipe's CGPO view on a micro-batch whose first response names a box: that row's pixel_values change on
    exactly the ViT patches the box covers, to the processor's rows of the box's mean colour; the other rows
    (responses naming nothing) keep the clean image. The tiny model never writes <region>, so the runs above only
    ever see the no-region case."""
    import dataclasses

    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.regions import filled_region_images

    cfg = _config(assets, tmp_path / "run", "tiny_cgpo", {})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        mb = recipe.prepare_minibatches(recipe.generate_rollouts().groups)[0][0][0]
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    region = '<region name="left half" image_idx="0" id="0">[[0, 0, 500, 1000]]</region>'
    texts = [region + " " + mb.texts[0]] + ["no region"] * (len(mb.texts) - 1)
    view = recipe.view_inputs(dataclasses.replace(mb, texts=texts), 0)  # CGPO's one view: its regions filled
    inputs, prompt_length = view.inputs, view.prompt_length
    assert prompt_length == mb.prompt_length and torch.equal(inputs["input_ids"], mb.inputs["input_ids"])
    clean, filled = mb.inputs["pixel_values"], inputs["pixel_values"]
    per_image = mb.inputs["image_grid_thw"].prod(-1).tolist()
    first = slice(0, per_image[0])
    assert torch.equal(filled[per_image[0] :], clean[per_image[0] :]), "rows naming no box keep the clean image"
    assert not torch.equal(filled[first], clean[first]), "the named box changed nothing"
    # independently: fill the box on the prompt's image and process it the way collation does
    image = filled_region_images(mb.prompts[0].images, region)
    want = model_inputs(collate_rollout(recipe.processor, [dataclasses.replace(mb.prompts[0], images=image)],
                                        [mb.responses[0, :1].tolist()], config=recipe.model_config))  # fmt: skip
    assert torch.equal(filled[first], want["pixel_values"])


def _lora_methods() -> list[str]:
    from vppo_recipes.methods import BUILTIN_METHODS

    return list(BUILTIN_METHODS)


@pytest.mark.parametrize("method", _lora_methods())
def test_every_method_trains_with_lora_adapters_alone(assets, tmp_path, method):
    """Issue 27: every built-in method runs one RL step with `model.lora.rank=4` on its tiny config: its no-grad views
    run on the adapted model (no method reads a frozen reference), the update is finite, every adapter's B moved off
    its zero start and no base weight moved. One mini-batch, to keep it cheap; the plain computation of a LoRA step is
    the `vppo_lora` case above."""
    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl

    lora = {
        "model.lora.rank": 4, "model.lora.alpha": 8, "optimizer.lr": 1e-3,
        "batch.update_prompts": 4, "batch.micro_batch_size": 16,  # one mini-batch of one micro-batch: one pass each
    }  # fmt: skip
    cfg = _config(assets, tmp_path / "run", f"tiny_{method}", lora)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        before = _full_state(recipe.model)
        metrics = recipe.rl_step()
        after = _full_state(recipe.model)
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    assert metrics["filter/groups_kept"] == 4 and recipe.optimizer_steps == 1 and math.isfinite(metrics["loss"])
    assert all(torch.equal(after[k], before[k]) for k in after if ".lora_" not in k), "a frozen weight moved"
    moved = [(after[k] - before[k]).abs().max().item() for k in after if ".lora_B." in k]
    assert len(moved) == 14 and min(moved) > 0, moved
