"""The spec of `ntkrun generalization` (ntkrun.runners.generalization): its data, kernels, networks'
training and predictors."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from ntkrun.spec import (
    Model,
    NetworkSpec,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RunSpec,
    as_list,
)

TrainSizes = Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(as_list)]


class GenDataSpec(Model):
    dir: str | None = None  # IDX folder with train and test splits; else --data-dir, $NTKRUN_DATA_DIR
    scaling: Literal["unit", "standardize"] = "unit"  # pixel / 255 (choice), or per-pixel on the train points
    # the learning curve's training set sizes (nested sets: each the first points of the next)
    n_train: TrainSizes = [1000, 5000, 20000, 60000]
    n_test: PositiveInt | None = None  # test points (a seeded choice); None: the whole test split
    seed: NonNegativeInt = 0  # the seeded order of the training points (nested sets) and the test choice
    target_on: float = 0.9  # one-hot targets, centered (choice, Lee et al. 2018)
    target_off: float = -0.1  # the other classes' entry of the centered one-hot target


class GenKernelSpec(Model):
    ridge: NonNegativeFloat = 0.0  # relative to the mean diagonal; raised automatically if the solve fails
    # s^2 of the NNGP predictor, (Sigma + s^2 I)^-1, added to the ridge, relative (choice: the
    # 60000-point float32 Fashion-MNIST Sigma factored only from 1.2e-6 on; 1e-5 keeps a margin)
    nngp_noise: NonNegativeFloat = 1e-5
    dtype: Literal["auto", "float32", "float64"] = "auto"  # Gram storage; auto: float64 up to 20000 points
    checkpoint_rows: PositiveInt = 4096  # Gram rows per checkpointed block (larger Grams only)
    # Gram rows per unit: each Gram of more rows (training, and test rounded up to whole 1000s) is
    # split into row-block units that any executor spreads; None: one unit per fit (docs/science.md §5.6)
    rows_per_unit: PositiveInt | None = None
    # how (K + r I) alpha = Y is solved (docs/science.md §5.7): an in-place Cholesky, or conjugate
    # gradients preconditioned by a randomized Nystrom approximation of rank precond_rank, until the
    # relative residual is at most tol, in at most max_iter iterations; auto: by the measured rule
    solver: Literal["cholesky", "cg", "auto"] = "cholesky"
    precond_rank: PositiveInt = 500  # cg: rank of the Nystrom preconditioner
    tol: Annotated[float, Field(gt=0, lt=1)] = 1e-5  # cg: relative residual to stop at
    max_iter: PositiveInt = 1000  # cg: iterations at most (then the fit fails, saying so)
    # the Monte-Carlo limit of a network.module (docs/science.md §10): its networks' width (default:
    # the largest network.width) and how many are averaged
    limit_width: PositiveInt | None = None
    mc_samples: Annotated[int, Field(ge=2)] = 32  # networks averaged


class GenTrainingSpec(Model):
    n_train: PositiveInt = 1000  # the networks' training set: the first n_train training points
    # (choice) lr * lambda_max / N of the limiting NTK is ~0.9 on MNIST-like data at lr 10 (GD is
    # stable below 2); the paper's lr 1 would need 10x the steps for the same training time
    lr: PositiveFloat = 10.0
    steps: PositiveInt = 1000  # full-batch GD steps of every network
    center: bool = True  # predict f_t(x) - f_0(x): in the limit exactly the NTK predictor (choice)


class GenSpec(RunSpec):
    experiment: Literal["generalization"] = "generalization"
    seeds: PositiveInt = 4  # networks per width
    network: NetworkSpec = NetworkSpec(depth=4, width=[128, 512, 2048])
    data: GenDataSpec = GenDataSpec()
    kernels: GenKernelSpec = GenKernelSpec()
    training: GenTrainingSpec = GenTrainingSpec()
    # mlp_ntk, mlp_nngp: the MLP's kernels of the same depth, beside another architecture's
    predictors: Annotated[list[Literal["ntk", "nngp", "net", "mlp_ntk", "mlp_nngp"]], Field(min_length=1)] = [
        "ntk",
        "nngp",
        "net",
    ]
    n_boot: PositiveInt = 2000  # bootstrap resamples for the distance slope

    @model_validator(mode="after")
    def _consistent(self) -> GenSpec:
        if "net" in self.predictors and not self.network.width:
            raise ValueError("network.width is empty but the predictor 'net' is requested")
        baselines = [p for p in self.predictors if p.startswith("mlp_")]
        own = self.network.module is None and self.network.layers is None
        if baselines and self.network.arch == "mlp" and own:
            raise ValueError(
                f"predictors: {', '.join(baselines)} compare another network (arch, network.layers, "
                "network.module) with the MLP; this one is the MLP"
            )
        rank, smallest = self.kernels.precond_rank, min(self.data.n_train)
        if self.kernels.solver == "cg" and rank > smallest:
            raise ValueError(
                f"kernels.precond_rank: {rank} is more than the {smallest} training points of the "
                "smallest data.n_train (the preconditioner's rank is at most N)"
            )
        if len(set(self.data.n_train)) != len(self.data.n_train):
            raise ValueError(f"data.n_train has repeated sizes: {self.data.n_train}")
        return self
