"""One config schema for every entry point.

Keys are flat and kebab-case (``num-clients``), exactly as in ``[tool.flwr.app.config]``
of ``pyproject.toml``, in preset files under ``configs/`` and in ``--set key=value``.
They are parsed once into the frozen :class:`RunConfig`, which rejects unknown keys and
bad values with a :class:`ConfigError` that names the culprit and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# Values that some keys may take; the registries that implement them are checked
# against these sets in the tests, so the two cannot drift apart.
DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder")
PARTITIONINGS = ("dirichlet", "iid")
ARMS = ("real", "oversample", "noise", "diffusion")
SAMPLERS = ("ddim", "ddpm", "dpm-solver")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
AGGREGATIONS = ("weighted", "uniform")
STEMS = ("cifar", "imagenet")
NORMS = ("group", "batch")
EVALUATIONS = ("server", "clients", "both")
SERVER_OPTS = ("fedavg", "fedavgm", "fedadam")
LABEL_AGGREGATIONS = ("samples", "class-counts")
GENERATIONS = ("sample", "sdedit")
SD_WHERE = ("clients", "server")
TDCL_FORMS = ("per-sample", "batch-pooled")
FEATURE_SOURCES = ("sd", "ddpm")
# Phase kinds whose client weights are averaged: central DP is set per model.
DP_MODELS = ("classify", "diffusion")


class ConfigError(ValueError):
    """A user mistake in the configuration: reported in one line, without a traceback."""


def _key(help: str, *, choices: tuple[str, ...] = (), low: float | None = None,
         high: float | None = None, low_open: bool = False, many: bool = False) -> dict:
    return {"help": help, "choices": choices, "low": low, "high": high,
            "low_open": low_open, "many": many}


def knob(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field carrying its documentation and validation rules."""
    return field(default=default, metadata=_key(help, **rules))


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field ``num_clients`` is config key ``num-clients``."""

    # --- what to run
    method: str = knob("fed-diff-aug", "Algorithm from the registry METHODS in "
                       "fedgen/methods.py (which checks the name): fed-diff-aug, fedavg, "
                       "fedddpm, fedddpm-plus, gen-fedsd, fedprox, collafuse, feddifrc.")
    arms: str = knob("real,oversample,noise,diffusion",
                     "Comma-separated arms compared on one partition (methods.md A.6).",
                     choices=ARMS, many=True)
    seed: int = knob(0, "Seed of the partition, model inits, training and sampling.", low=0)
    # --- data
    dataset: str = knob("digits", "Data set; digits and mnist5k ship inside packages.",
                        choices=DATASETS)
    data_dir: str = knob("", "Local folder of cifar10/cifar100/imagefolder data.")
    image_size: int = knob(0, "Resize images to this many pixels (0 = native size).", low=0)
    test_fraction: float = knob(0.2, "Stratified test share for sets without a test split; "
                                "with evaluation=clients/both also each node's held-out share.",
                                low=0.0, high=0.9, low_open=True)
    class_names: str = knob("", "Comma-separated class names fixing the run's label space "
                            "(sites' own folders map onto it); empty = the data set's names.")
    # --- federation and partition
    num_clients: int = knob(10, "Number of clients (partitions, SuperNodes).", low=1)
    partitioning: str = knob("dirichlet", "Label split across clients.", choices=PARTITIONINGS)
    alpha: float = knob(0.1, "Dirichlet concentration; smaller = more skewed.",
                        low=0.0, low_open=True)
    min_partition_size: int = knob(10, "Re-draw the Dirichlet split until every client has "
                                   "at least this many samples.", low=0)
    fraction_fit: float = knob(1.0, "Share of clients sampled per training round.",
                               low=0.0, high=1.0, low_open=True)
    min_fit_fraction: float = knob(0.5, "Share of a round's sampled nodes whose replies it "
                                   "needs; fewer fails the run with a clear message.",
                                   low=0.0, high=1.0, low_open=True)
    max_update_norm_ratio: float = knob(10.0, "A client's weight update whose norm "
                                        "||w_client - w_sent|| exceeds this multiple of the "
                                        "round's median update norm is rejected (recorded "
                                        "in results.json, left out of the average), as are "
                                        "updates with NaN/Inf or wrong shapes; 0 = no norm "
                                        "rule.", low=0.0)
    round_timeout: float = knob(0.0, "Seconds a round waits for replies before counting the "
                                "missing nodes as timed out (0 = no limit).", low=0.0)
    node_wait_timeout: float = knob(120.0, "Seconds the first round waits for num-clients "
                                    "nodes to connect; then it goes on with those connected.",
                                    low=0.0)
    evaluation: str = knob("server", "Where the classifier is evaluated: server (its test "
                           "split), clients (each node's held-out test-fraction), or both.",
                           choices=EVALUATIONS)
    # --- federated DDPM
    diffusion_rounds: int = knob(8, "FedAvg rounds over the UNet (0 = use diffusion-init "
                                 "as is).", low=0)
    diffusion_epochs: int = knob(5, "Local epochs per diffusion round.", low=1)
    diffusion_batch_size: int = knob(32, "Local batch size of DDPM training.", low=1)
    diffusion_lr: float = knob(2e-3, "AdamW learning rate of DDPM training.",
                               low=0.0, low_open=True)
    diffusion_aggregation: str = knob("weighted", "UNet averaging: sample-weighted, or "
                                      "uniform (the original's compat).", choices=AGGREGATIONS)
    label_embedding_aggregation: str = knob(
        "samples", "How the UNet's class-embedding rows are averaged: samples = like every "
        "other weight (each client by its sample count), class-counts = row c by each "
        "client's count of class c (the null class by sample count), so the clients that "
        "lack a class, whose copy of its row never moved, do not shrink its update.",
        choices=LABEL_AGGREGATIONS)
    diffusion_server_opt: str = knob("fedavg", "Server update of the UNet from the "
                                     "clients' average (Reddi et al. 2021): fedavg takes it, "
                                     "fedavgm adds momentum, fedadam an adaptive step.",
                                     choices=SERVER_OPTS)
    diffusion_server_lr: float = knob(1.0, "Server learning rate of that update (1 with "
                                      "fedavg = plain averaging; fedadam wants ~1e-2).",
                                      low=0.0, low_open=True)
    diffusion_server_momentum: float = knob(0.9, "Momentum of fedavgm; beta1 of fedadam.",
                                            low=0.0, high=0.999)
    diffusion_proximal_mu: float = knob(0.0, "FedProx drift term mu/2 ||w - w_global||^2 "
                                        "on the clients' DDPM loss (0 = off).", low=0.0)
    min_snr_gamma: float = knob(0.0, "Min-SNR loss weighting (Hang et al. 2023): each "
                                "timestep's denoising loss weighted min(SNR, gamma)/SNR, "
                                "which down-weights the near-clean timesteps; 0 = off "
                                "(uniform, Ho et al.'s L_simple), 5 in the paper.", low=0.0)
    cfg_dropout: float = knob(0.1, "Share of DDPM training labels replaced by the null class "
                              "(classifier-free guidance, Ho & Salimans 2022; 0 = always "
                              "conditioned).", low=0.0, high=0.9)
    guidance_scale: float = knob(3.0, "Classifier-free guidance w at sampling: eps_u + w "
                                 "(eps_c - eps_u); 1 = plain conditional (one UNet pass), "
                                 ">1 needs cfg-dropout > 0.", low=0.0)
    ema_decay: float = knob(0.0, "Server-side EMA of the global UNet per diffusion round, "
                            "used for sampling (0 = off).", low=0.0, high=0.999)
    diffusion_init: str = knob("", "Folder saved by save_pretrained (UNet) to start from "
                               "(federated fine-tuning; `python -m fedgen.pretrain` "
                               "writes one); empty = random init.")
    unet_channels: str = knob("16,32", "Comma-separated block_out_channels of the UNet.")
    unet_layers_per_block: int = knob(1, "ResNet layers per UNet block.", low=1)
    unet_attention_levels: int = knob(0, "How many of the lowest-resolution UNet levels "
                                      "get self-attention.", low=0)
    unet_norm_groups: int = knob(8, "GroupNorm groups in the UNet.", low=1)
    num_train_timesteps: int = knob(1000, "Diffusion timesteps T.", low=2)
    beta_schedule: str = knob("linear", "Noise schedule, shared by training and sampling.",
                              choices=BETA_SCHEDULES)
    prediction_type: str = knob("epsilon", "What the UNet predicts: epsilon (the noise, Ho et "
                                "al. 2020) or v_prediction (v = sqrt(abar) noise - sqrt(1 - "
                                "abar) x_0, Salimans & Ho 2022), in training, every sampler "
                                "and min-snr-gamma's weights.", choices=PREDICTION_TYPES)
    beta_start: float = knob(1e-4, "First beta of the schedule.", low=0.0, low_open=True)
    beta_end: float = knob(0.02, "Last beta of the schedule.", low=0.0, low_open=True)
    # --- FedDDPM / FedDDPM+ (methods.md C; constants the abstract does not give)
    local_ddpm_steps: int = knob(300, "FedDDPM: optimiser steps of each client's local DDPM, "
                                 "trained once before FL and uploaded once. Steps, not "
                                 "epochs, so a 19-image client trains as long as a 500-image "
                                 "one; 300 x 10 clients is about 1.7x the default diffusion "
                                 "phase's client steps.", low=1)
    aux_size: int = knob(1000, "FedDDPM: images in the auxiliary set D_aux the server samples "
                         "from the local DDPMs, each client's share proportional to its "
                         "size, its classes as in its histogram (1000: about 70 % of the "
                         "default training set).", low=2)
    aux_holdout: float = knob(0.2, "FedDDPM: share of D_aux held out (never trained on) to "
                              "monitor the global DDPM's denoising loss; FedDDPM+ watches it "
                              "for stalls.", low=0.0, high=0.9, low_open=True)
    correction_steps: int = knob(50, "FedDDPM: server steps of the denoising loss on D_aux "
                                 "per correction (50: about a quarter of the clients' "
                                 "combined steps per default round, 1437 x 5 / 32).", low=1)
    correction_lr: float = knob(1e-3, "FedDDPM: AdamW learning rate of the server "
                                "correction (half diffusion-lr: it runs after every "
                                "aggregation and should not overwrite the clients' average).",
                                low=0.0, low_open=True)
    stall_delta: float = knob(0.02, "FedDDPM+: a round stalls when the held-out D_aux loss "
                              "improves by less than this relative amount.", low=0.0)
    stall_patience: int = knob(2, "FedDDPM+: after this many stalled rounds in a row, one "
                               "correction (then the count restarts).", low=1)
    # --- Gen-FedSD (methods.md B): a pretrained text-to-image pipeline fills the gaps
    sd_model_path: str = knob("", "Gen-FedSD and FedDifRC: local folder of a Stable "
                              "Diffusion pipeline (diffusers save_pretrained layout); nothing "
                              "is downloaded.")
    sd_prompts: str = knob("a photo of a {}.|a black and white photo of a {}.|a low "
                           "resolution photo of a {}.|a close-up photo of a {}.|a blurry "
                           "photo of a {}.", "Gen-FedSD: '|'-separated prompt templates, {} "
                           "= the class name (class-names); image i of a class uses "
                           "template i mod their number (CLIP-style, for diversity).")
    sd_steps: int = knob(25, "Gen-FedSD: denoising steps of the pipeline.", low=1)
    sd_guidance_scale: float = knob(7.5, "Gen-FedSD: the pipeline's classifier-free "
                                    "guidance (its usual default).", low=0.0)
    sd_resolution: int = knob(0, "Gen-FedSD: pixels generated before the resize to the "
                              "task's size (0 = the pipeline's native size, 512 for SD 1.5).",
                              low=0)
    sd_batch_size: int = knob(8, "Gen-FedSD: prompts per pipeline call.", low=1)
    sd_where: str = knob("clients", "Gen-FedSD: who runs the pipeline: clients (as in the "
                         "paper: the server sends each its counts) or server (it generates "
                         "on the clients' behalf and ships the batches).", choices=SD_WHERE)
    sd_cache_dir: str = knob("", "Gen-FedSD: cache of generated images, so a rerun does not "
                             "generate again; empty = ~/.cache/fedgen/gen-fedsd.")
    # --- generation round
    generation: str = knob("sample", "How the diffusion arm's batches are made: sample = the "
                           "server samples the global DDPM class-conditionally and ships each "
                           "client its batch; sdedit = each client noises its OWN images to "
                           "sdedit-t and denoises them with the global DDPM, keeping labels "
                           "(no image leaves a client; only classes it holds are filled).",
                           choices=GENERATIONS)
    sdedit_t: int = knob(200, "SDEdit: the timestep own images are noised to (the original "
                         "used 199 of 1000); more = further from the source image.", low=1)
    cut_ratio: str = knob("0.2", "CollaFuse (method=collafuse): cut point c of the split, "
                          "t_c = round(c * num-train-timesteps); each client's private "
                          "denoiser learns t <= t_c, the shared server one the rest. One "
                          "value, or a comma list with one per client in node order; 0 = "
                          "server only (clients send clean images), 1 = client only (nothing "
                          "sent); the paper used 0.2.")
    sampler: str = knob("ddim", "Sampler built from the training scheduler's config.",
                        choices=SAMPLERS)
    sampling_steps: int = knob(5, "Denoising steps of the sampler (DDIM-5 beat DDIM-10 in "
                               "fidelity on the default model: docs/RESULTS.md).", low=1)
    generation_batch_size: int = knob(500, "Samples denoised at once on the server.", low=1)
    augment_ratio: float = knob(1.0, "r in the fill-to-max rule s = round(r * (M - n)).",
                                low=0.0)
    samples_every: int = knob(1, "Every this many diffusion rounds (and after the last) "
                              "the server samples a grid (samples/round-NNN.png) and records "
                              "its fidelity; 0 = never.", low=0)
    noise_sigma: float = knob(0.1, "Pixel noise of the noise arm, in [-1, 1] units.", low=0.0)
    augment_loss_weight: float = knob(1.0, "Weight of a classifier's cross-entropy on the "
                                      "rows a client trains on beyond its own images (the "
                                      "diffusion arm's synthetic images, the oversample and "
                                      "noise arms' copies), relative to its own images' 1; "
                                      "0 = those rows add no loss.", low=0.0)
    augment_filter: float = knob(0.0, "Screen the rows a client adds to its own images "
                                 "(synthetic, copied, noisy) with the global classifier it "
                                 "receives: from classify round augment-filter-from on, a "
                                 "row whose label that model gives a softmax probability "
                                 "below this is left out of the round's training; 0 = off.",
                                 low=0.0, high=1.0)
    augment_filter_from: int = knob(2, "First classify round (within an arm) of "
                                    "augment-filter; round 1's global model is the untrained "
                                    "initial classifier.", low=1)
    synthetic_judge: str = knob("", "Screen the generative arm's synthetic rows on the "
                                "server with the final global classifier of this earlier "
                                "arm (a federated model, no central data): a row whose "
                                "label it gives a softmax probability below "
                                "synthetic-judge-threshold is left out of every classify "
                                "round of the generative arm (results.json "
                                "synthetic_screen); the arm must come before the generative "
                                "one in arms; empty = off.",
                                choices=("", "real", "oversample", "noise"))
    synthetic_judge_threshold: float = knob(0.5, "Probability below which synthetic-judge "
                                            "leaves a synthetic row out.", low=0.0, high=1.0)
    synthetic_judge_floor: float = knob(0.0, "Share of each class's synthetic rows per client "
                                        "that synthetic-judge keeps whatever they score (its "
                                        "best-scored ones), so a class the judge knows badly "
                                        "is thinned, not removed; 0 = the threshold alone.",
                                        low=0.0, high=1.0)
    synthetic_judge_pool: int = knob(1, "With synthetic-judge: the server generates this many "
                                     "times each client's deficits and the judge keeps the "
                                     "best-scored rows of each class up to the deficit "
                                     "(generation time grows with it); 1 = no pool.", low=1)
    # --- classifier
    classifier_rounds: int = knob(4, "FedAvg rounds of ResNet-18 per arm.", low=1)
    local_epochs: int = knob(1, "Local epochs per classifier round.", low=1)
    batch_size: int = knob(32, "Local batch size of classifier training.", low=1)
    lr: float = knob(0.01, "SGD learning rate of the classifier.", low=0.0, low_open=True)
    momentum: float = knob(0.9, "SGD momentum of the classifier.", low=0.0, high=1.0)
    weight_decay: float = knob(5e-4, "SGD weight decay of the classifier.", low=0.0)
    proximal_mu: float = knob(0.01, "FedProx (method=fedprox): mu of the drift term "
                              "mu/2 ||w - w_global||^2 on the classifier's local loss (Li et "
                              "al. 2020 tried 0.001-1); other methods ignore it.", low=0.0)
    # --- FedDifRC (methods.md E): Stable Diffusion decoder features regularise the classifier
    feature_t: int = knob(150, "FedDifRC: timestep the NDCR target's latent is noised to "
                          "(the paper's best of its sweep).", low=0)
    difrc_resolution: int = knob(224, "FedDifRC: pixels the task images are resized to "
                                 "before the VAE (224 in the paper).", low=8)
    difrc_negatives: int = knob(10, "FedDifRC: negative class prompts per image for TDCL "
                                "(all other classes when there are fewer; a seeded choice "
                                "per image otherwise).", low=1)
    difrc_pca_sample: int = knob(512, "FedDifRC: images of the data set (seeded sample) the "
                                 "per-layer PCA bases are fitted on, once.", low=1)
    difrc_prompt: str = knob("a photo of a {}", "FedDifRC: prompt template, {} = the class "
                             "name (class-names).")
    difrc_tau: float = knob(0.06, "FedDifRC: temperature of the TDCL InfoNCE over cosine "
                            "similarities.", low=0.0, low_open=True)
    difrc_ndcr_weight: float = knob(1.0, "FedDifRC: weight of the NDCR term (KL divergence "
                                    "between the softmaxes of the L2-normalised target r_d "
                                    "and embedding z); 0 = off.", low=0.0)
    difrc_tdcl_weight: float = knob(1.0, "FedDifRC: weight of the TDCL term; 0 = off.",
                                    low=0.0)
    difrc_tdcl_form: str = knob("per-sample", "FedDifRC: TDCL as the paper's eq. 11 "
                                "(per-sample InfoNCE, batch mean) or batch-pooled (the "
                                "released code's form: one InfoNCE over the batch, negatives "
                                "misaligned; for comparison).", choices=TDCL_FORMS)
    difrc_feature_source: str = knob("sd", "FedDifRC: the representation model: sd (the "
                                     "Stable Diffusion pipeline at sd-model-path, as in the "
                                     "paper) or ddpm (the run's own federated class-"
                                     "conditional DDPM, saved by the server after the "
                                     "diffusion phase and read by the nodes from its out-dir; "
                                     "the class label replaces the prompt; a shared disk, "
                                     "i.e. the simulation).", choices=FEATURE_SOURCES)
    difrc_cache_dir: str = knob("", "FedDifRC: cache of the PCA bases and every node's "
                                "targets, so a rerun does not load the pipeline; empty = "
                                "~/.cache/fedgen/difrc.")
    classifier_stem: str = knob("cifar", "ResNet-18 stem: cifar (3x3, stride 1, no "
                                "max-pool) or imagenet (compat).", choices=STEMS)
    classifier_norm: str = knob("group", "ResNet-18 normalisation: group (GroupNorm, robust "
                                "to FedAvg on non-IID data) or batch (BatchNorm; running "
                                "stats averaged like weights).", choices=NORMS)
    # --- differential privacy (README "Differential privacy"; fedgen/privacy.py)
    histogram_epsilon: float = knob(0.0, "Local DP of the label histogram each client "
                                    "reports in the stats round: Laplace noise of scale "
                                    "1/epsilon on every count (L1 sensitivity 1: adding or "
                                    "removing ONE image), rounded, clipped at 0; the server "
                                    "(deficit plans, D_aux shares, results.json) only sees "
                                    "the noisy counts. Does not hide the client's size "
                                    "(each reply's example count); 0 = exact counts.", low=0.0)
    dp_clipping_norm: str = knob("", "Central DP of the averaged weight updates: each "
                                 "client's update (reply - global) is clipped to this L2 "
                                 "norm (Flower's compute_clip_model_update), the clipped "
                                 "updates are averaged UNIFORMLY, and Gaussian noise of std "
                                 "noise-multiplier x norm / updates is added. One number for "
                                 "every averaged model, or per model: diffusion=0.05,"
                                 "classify=5 (UNet and classifier updates differ by orders "
                                 "of magnitude); empty/0 = off.")
    dp_noise_multiplier: str = knob("", "Central DP: the noise multiplier z (noise std / "
                                    "sensitivity) per averaged model, same form as "
                                    "dp-clipping-norm; needs a clipping norm for that model. "
                                    "0 with a norm = clipping only (no guarantee: epsilon "
                                    "reported as inf).")
    dp_delta: float = knob(1e-5, "Central DP: the delta at which the RDP accountant "
                           "(opacus) reports each model's epsilon, composed over its rounds "
                           "with sampling rate = the share of nodes asked per round.",
                           low=0.0, high=0.1, low_open=True)
    dp_sgd_noise_multiplier: float = knob(0.0, "Sample-level DP-SGD (opacus) of the "
                                          "clients' DDPM training (diffusion and local-ddpm "
                                          "phases): Poisson batches, per-image gradients "
                                          "clipped to dp-sgd-max-grad-norm, Gaussian noise "
                                          "of this multiplier; each client's spent epsilon "
                                          "(at dp-delta) goes to results.json; 0 = off.",
                                          low=0.0)
    dp_sgd_max_grad_norm: float = knob(1.0, "DP-SGD: the per-image gradient clipping norm.",
                                       low=0.0, low_open=True)
    dp_seeded_noise: bool = knob(False, "Draw all DP noise (histograms, updates) from the "
                                 "run seed, so runs repeat exactly: anyone who knows the seed "
                                 "can subtract the noise, so the guarantee is VOID; for "
                                 "measurements only (results.json says so). false = fresh "
                                 "OS entropy.")
    # --- compute
    mixed_precision: str = knob("no", "bf16 = the DDPM's and the classifier's training "
                                "forward passes and all sampling run under torch.autocast "
                                "in bfloat16 (weights, gradients, optimiser states, the "
                                "sampler's arithmetic and every evaluation stay float32). "
                                "It pays where the hardware has bfloat16 units (CUDA from "
                                "Ampere; CPUs with AVX-512 BF16 or AMX); docs/RESULTS.md "
                                "section 3k measures it.", choices=("no", "bf16"))
    # --- where things go
    out_dir: str = knob("", "Output folder (absolute for flwr run); empty = "
                        "outputs/<time>-<method>.")
    cache_dir: str = knob("", "Client-side cache of synthetic batches; empty = a folder "
                          "under the system temp dir, removed after the last round.")
    resume_from: str = knob("", "Output folder of an interrupted run to continue from its "
                            "last checkpoint (<folder>/checkpoint.pkl, written after every "
                            "round); the run then writes into that folder. Every other key "
                            "must equal the saved run's (the differing ones are named). "
                            "run_simulation.py takes --resume DIR instead.")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "RunConfig | None" = None
                     ) -> "RunConfig":
        """Build a config from kebab-case keys over ``base`` (defaults if None)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parsed = dataclasses.asdict(base) if base is not None else {}
        for key, raw in values.items():
            name = str(key).replace("-", "_")
            if name not in fields or "_" in str(key):
                raise ConfigError(_unknown_key_message(str(key)))
            parsed[name] = _coerce(str(key), raw, fields[name])
        cfg = cls(**parsed)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case run config (what ``flwr run --run-config`` takes)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_rules(f.name.replace("_", "-"), getattr(self, f.name), f.metadata)
        if not self.arm_list:
            raise ConfigError("arms: give at least one of " + ", ".join(ARMS))
        try:
            channels = self.unet_channel_list
        except ValueError:
            raise ConfigError(f"unet-channels: expected comma-separated positive integers, "
                              f"got {self.unet_channels!r}") from None
        if not channels or min(channels) < 1:
            raise ConfigError(f"unet-channels: expected positive integers, got "
                              f"{self.unet_channels!r}")
        bad = [c for c in channels if c % self.unet_norm_groups]
        if bad:
            raise ConfigError(f"unet-channels: {bad} not divisible by unet-norm-groups="
                              f"{self.unet_norm_groups}")
        if self.unet_attention_levels > len(channels):
            raise ConfigError(f"unet-attention-levels: at most {len(channels)} (the number "
                              f"of UNet levels), got {self.unet_attention_levels}")
        if self.sdedit_t >= self.num_train_timesteps:
            raise ConfigError(f"sdedit-t ({self.sdedit_t}) must be below num-train-timesteps "
                              f"({self.num_train_timesteps})")
        try:
            cuts = self.cut_ratio_list
        except ValueError:
            raise ConfigError(f"cut-ratio: expected comma-separated numbers in [0, 1], got "
                              f"{self.cut_ratio!r}") from None
        if not cuts or any(not 0.0 <= c <= 1.0 for c in cuts):
            raise ConfigError(f"cut-ratio: expected comma-separated numbers in [0, 1], got "
                              f"{self.cut_ratio!r}")
        if len(cuts) not in (1, self.num_clients):
            raise ConfigError(f"cut-ratio: {len(cuts)} values for num-clients="
                              f"{self.num_clients}; give one, or one per client")
        if not self.sd_prompt_list or any("{}" not in t for t in self.sd_prompt_list):
            raise ConfigError(f"sd-prompts: every '|'-separated template needs {{}} for the "
                              f"class name, got {self.sd_prompts!r}")
        if self.difrc_prompt.count("{}") != 1:
            raise ConfigError(f"difrc-prompt: the template needs one {{}} for the class "
                              f"name, got {self.difrc_prompt!r}")
        if self.beta_end <= self.beta_start:
            raise ConfigError(f"beta-end ({self.beta_end}) must exceed beta-start "
                              f"({self.beta_start})")
        if self.sampling_steps > self.num_train_timesteps:
            raise ConfigError(f"sampling-steps ({self.sampling_steps}) exceeds "
                              f"num-train-timesteps ({self.num_train_timesteps})")
        if self.dataset in ("cifar10", "cifar100") and not self.data_dir:
            raise ConfigError(f"data-dir: dataset={self.dataset} reads a local folder; "
                              f"set data-dir to it")
        if self.dataset == "imagefolder" and not self.data_dir and not self.class_list:
            raise ConfigError("data-dir: dataset=imagefolder reads a local folder; set "
                              "data-dir to it, or class-names for a server without data "
                              "(each SuperNode then reads its own node-config data-dir)")
        if len(set(self.class_list)) != len(self.class_list):
            raise ConfigError(f"class-names: names repeat in {self.class_names!r}")
        if self.guidance_scale != 1.0 and self.cfg_dropout == 0.0 and not self.diffusion_init:
            raise ConfigError(f"guidance-scale={self.guidance_scale:g} needs cfg-dropout > 0 "
                              f"(the null class is never trained otherwise); or set "
                              f"guidance-scale=1")
        self.central_dp   # per-model DP settings: parsed and checked (ConfigError)
        if self.prediction_type != "epsilon" and self.method == "collafuse":
            raise ConfigError("prediction-type=v_prediction: CollaFuse's server trains on "
                              "noised images (denoising score matching from x_s), which is "
                              "derived for epsilon prediction; use prediction-type=epsilon")
        if self.label_embedding_aggregation != "samples" and "diffusion" in self.central_dp:
            raise ConfigError("label-embedding-aggregation=class-counts cannot run under "
                              "central DP for the diffusion model (dp-clipping-norm): the "
                              "noise is calibrated to the plain mean of the clipped updates")
        if "diffusion" in self.arm_list and self.diffusion_rounds == 0 \
                and not self.diffusion_init:
            raise ConfigError("diffusion-rounds=0 needs diffusion-init (a trained UNet "
                              "folder) for the diffusion arm")

    # ------------------------------------------------------------------ derived
    @property
    def arm_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.arms.split(",") if a.strip())

    @property
    def class_list(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.class_names.split(",") if c.strip())

    @property
    def sd_prompt_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.sd_prompts.split("|") if t.strip())

    @property
    def cut_ratio_list(self) -> tuple[float, ...]:
        return tuple(float(c) for c in self.cut_ratio.split(",") if c.strip())

    @property
    def central_dp(self) -> dict[str, tuple[float, float]]:
        """Model (a phase kind whose weights are averaged: classify, diffusion) -> its
        central-DP (clipping norm, noise multiplier); models without a norm are absent."""
        clip = _per_model("dp-clipping-norm", self.dp_clipping_norm)
        noise = _per_model("dp-noise-multiplier", self.dp_noise_multiplier)
        out = {}
        for model in DP_MODELS:
            c, z = clip.get(model, clip.get("*", 0.0)), noise.get(model, noise.get("*", 0.0))
            if z > 0 and c == 0:
                raise ConfigError(f"dp-noise-multiplier: model {model} has noise but no "
                                  f"dp-clipping-norm (the noise is calibrated to the norm); "
                                  f"set one, or name the models: e.g. classify=1")
            if c > 0:
                out[model] = (c, z)
        return out

    @property
    def unet_channel_list(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.unet_channels.split(",") if c.strip())


# ---------------------------------------------------------------------- helpers
def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), RunConfig.keys(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; known keys: {', '.join(RunConfig.keys())}"


def _per_model(key: str, text: str) -> dict[str, float]:
    """``"5"`` -> {"*": 5.0}; ``"diffusion=0.05,classify=5"`` -> one value per model."""
    out: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        model, sep, value = item.rpartition("=")
        model = model.strip() if sep else "*"
        if model != "*" and model not in DP_MODELS:
            raise ConfigError(f"{key}: unknown model {model!r} in {text!r}; allowed: "
                              f"{', '.join(DP_MODELS)} (or one number for all)")
        if model in out or (out and ("*" in out or model == "*")):
            raise ConfigError(f"{key}: give one number, or each model once as "
                              f"model=value, got {text!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number for {model if sep else 'every model'}, "
                              f"got {value.strip()!r}") from None
        if not number >= 0 or number == float("inf"):
            raise ConfigError(f"{key}: values must be finite and >= 0, got {value.strip()!r}")
        out[model] = number
    return out


def _coerce(key: str, raw: Any, f: dataclasses.Field) -> Any:
    """Turn a raw value (TOML/YAML scalar or --set string) into the field's type."""
    kind = type(f.default)
    if isinstance(raw, str) and kind is not str:
        text = raw.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            return kind(text) if kind is float else int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    if kind is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)   # a number for a text key (dp-clipping-norm = 5, cut-ratio = 0.2)
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if kind is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}")
    return raw


def _check_rules(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    choices = rules.get("choices") or ()
    if choices:
        items = [v.strip() for v in value.split(",")] if rules.get("many") else [value]
        for item in items:
            if item not in choices:
                raise ConfigError(f"{key}: unknown value {item!r}; allowed: "
                                  f"{', '.join(choices)}")
    low, high = rules.get("low"), rules.get("high")
    if low is not None and (value < low or (rules.get("low_open") and value == low)):
        op = ">" if rules.get("low_open") else ">="
        raise ConfigError(f"{key} must be {op} {low:g}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high:g}, got {value}")


def read_preset(path: str | Path) -> dict[str, Any]:
    """Read a preset file (TOML, or YAML) into raw key/value pairs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: not valid {p.suffix.lstrip('.') or 'toml'}: {exc}") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise ConfigError(f"{p}: expected flat key = value pairs (the run-config keys)")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse ``--set key=value`` strings."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip().strip("'\"")
    return out


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset file, then ``--set`` overrides."""
    values: dict[str, Any] = read_preset(preset) if preset else {}
    values.update(parse_overrides(overrides or []))
    return RunConfig.from_mapping(values)


def markdown_table() -> str:
    """The README's table of keys, from the schema itself (``python -m fedgen.config``)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        allowed = f" One of: {', '.join(meta['choices'])}." if meta["choices"] else ""
        default = f'"{f.default}"' if isinstance(f.default, str) else f"{f.default:g}" \
            if isinstance(f.default, float) else str(f.default)
        rows.append(f"| `{f.name.replace('_', '-')}` | `{default}` | {meta['help']}{allowed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
