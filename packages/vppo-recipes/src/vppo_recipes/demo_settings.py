"""The CPU demo's settings (`python -m vppo_recipes.demo`): every knob, what `nox -s demo` runs and the smoke test's."""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("vppo", "dapo", "grpo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; `full()` is what `nox -s demo` runs, `quick()` the smoke test.

    tasks / image_size / hint / reasoning / n_train / n_test: the synthetic task
        (vppo_eval.synthetic.build_visual_task; hint=None and reasoning=False give the plain colour question).
    rope_theta: the tiny decoder's M-RoPE base (None: build_tiny_checkpoint's 1e6, the real models' value); see
        `set_rope_theta` for why the demo lowers it.
    sft_steps, sft_lr: SFT warm start (batch 16). rl_steps, eval_every: RL steps per run and validation interval.
    k: samples per held-out item (avg@k). n_eval: held-out items scored (the first n_eval test rows).
    rl_lr: RL learning rate (the tiny model needs far more than the 7B's 1e-6).
    group_size, batch_prompts, update_prompts: rollout G, prompts per RL step, prompts per optimizer step.
    max_new_tokens: response budget (the chain-of-thought targets are 34-60 tokens).
    dependency_prompts: held-out prompts whose responses feed the dependency histograms / HTML page.
    anatomy_prompts: held-out prompts (x 2 samples) of `response_anatomy`, run on the warm start and every final model.
    n_boot: bootstrap replicates of the paired intervals.
    """

    algorithms: tuple[str, ...] = ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[str, ...] = ("colour",)
    image_size: int = 112
    hint: int | None = 3
    reasoning: bool = True
    n_train: int = 2048
    n_test: int = 256
    model_seed: int = 0
    rope_theta: float | None = 10.0
    sft_steps: int = 400
    sft_lr: float = 3e-3
    rl_steps: int = 20
    eval_every: int = 5
    rl_lr: float = 1e-3
    k: int = 4
    n_eval: int = 256
    group_size: int = 8
    batch_prompts: int = 8
    update_prompts: int = 4
    max_new_tokens: int = 64
    dependency_prompts: int = 16
    anatomy_prompts: int = 64
    n_boot: int = 10_000

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def quick(cls) -> DemoSettings:
        """Smoke version: every stage runs and every algorithm takes optimizer steps, on small sizes (the accuracy
        numbers are meaningless).

        Why these values: the online filter of VPPO / DAPO keeps only groups whose rewards differ, and a reward needs
        a `\\boxed{}` answer. The chain-of-thought targets (34-60 tokens) neither fit a short response budget nor
        are learnt in a few SFT steps, so the quick warm start learns the SFT config's one-line template
        (`reasoning=False`) for `sft_steps` steps, answers within `max_new_tokens`, and groups of 8 samples at
        temperature 1.0 then differ in accuracy.
        """
        return cls(
            seeds=(0,),
            reasoning=False,
            n_train=64,
            n_test=8,
            sft_steps=30,
            rl_steps=2,
            eval_every=1,
            k=2,
            n_eval=8,
            group_size=8,
            batch_prompts=2,
            update_prompts=2,
            max_new_tokens=24,
            dependency_prompts=2,
            anatomy_prompts=4,
            n_boot=200,
        )

    def check(self) -> None:
        """Raise ValueError naming the command-line flag and its valid range for a setting no stage could run with
        (`main` calls it before any work; a bad setting used to surface after the 20-45 s build, in a log file)."""
        unknown = [a for a in self.algorithms if a not in ("vppo", "dapo", "grpo", "pgpo")]
        if not self.algorithms or unknown:
            raise ValueError(f"--algorithms: expected a non-empty subset of vppo,dapo,grpo,pgpo, got {self.algorithms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds: give at least one seed >= 0, each once (e.g. --seeds 0,1,2), got {self.seeds}")
        for flag, value in (
            ("--sft-steps", self.sft_steps),
            ("--rl-steps", self.rl_steps),
            ("--eval-every", self.eval_every),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value}")
        if self.rl_steps % self.eval_every:
            raise ValueError(
                f"--rl-steps ({self.rl_steps}) must be a multiple of --eval-every ({self.eval_every}), so the last "
                "step is validated"
            )
        if self.n_eval > self.n_test:
            raise ValueError(f"n_eval ({self.n_eval}) must be <= n_test ({self.n_test})")

    def chance(self) -> float | None:
        """Accuracy of a uniform guess among the answers (colour: 4)."""
        return 0.25 if tuple(self.tasks) == ("colour",) else None

    def text_only_ceiling(self) -> float | None:
        """The best accuracy from the question text alone: follow the hint (w / (w + 3)), or chance without one."""
        if tuple(self.tasks) != ("colour",):
            return None
        return self.hint / (self.hint + 3) if self.hint else 0.25
