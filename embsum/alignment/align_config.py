"""`embsum align` settings (TOML `[align]`, CLI flags). Torch-free, so the command's --help
is instant: the LoRA and MoE settings it validates are imported only when a config is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from embsum.config import OPTIMIZERS, ConfigError, _Base, _check, best_checkpoint_field, check_best_checkpoint

# The negative strategies of embsum.alignment.dpo (kept here too: that module imports torch).
STRATEGIES = ("rodpo", "hard", "random")
# Which batch items the NCE anchor takes as negatives (AlignConfig.nce_in_batch).
NCE_IN_BATCH = ("all", "chosen", "none")


@dataclass
class AlignConfig(_Base):
    out: str = field(default="runs/align", metadata={"help": "Output directory (OUT/best, OUT/last: resumable, OUT/adapters)."})
    strategy: str = field(default="rodpo", metadata={"choices": STRATEGIES, "help": (
        "Rejected items: 'rodpo' (sampled from the policy's top-K, positives excluded), 'hard' "
        "(deterministic top-1 of that pool), 'random' (uniform over the catalog).")})
    beta: float = field(default=20.0, metadata={"help": (
        "DPO beta. Scores are cosines in [-1, 1]: beta plays the role of 1/temperature (SFT "
        "trains with NCE temperature 0.05, i.e. 20).")})
    label_smoothing: float = field(default=0.0, metadata={"help": (
        "Conservative DPO: each pair's label counts as wrong with this probability, so the loss has "
        "its minimum at a finite margin, log((1 - eps) / eps) / beta, and a rejected item that was a "
        "false negative is pushed down only so far. 0: plain DPO. Below 0.5.")})
    pool_size: int = field(default=50, metadata={"help": "K: size of each user's top-K negative pool."})
    pool_fraction: float = field(default=0.0, metadata={"help": (
        "Cap K at this fraction of the catalog: K = min(pool_size, round(fraction x items)), at "
        "least 1. A pool as deep as the top tenth of a small catalog holds the items a user reads "
        "next and rejects them. 0: K is pool_size whatever the catalog.")})
    pool_refresh: int = field(default=50, metadata={"help": "A user's pool is rebuilt once it is this many steps old."})
    pool_shortlist: int = field(default=0, metadata={"help": (
        "Rank pools exactly only among the union of each refreshed user's S items of highest "
        "mean-vector score (the mean of the m x n dots, plus the prior; 1/(2mn) of the exact "
        "score's cost), not the whole catalog. 0: exact over the catalog. Not a bound: "
        "benchmarks/pool_shortlist.py measures how much of the exact pool a shortlist keeps.")})
    pool_temperature: float = field(default=0.0, metadata={"help": (
        "rodpo sampling inside the pool: 0 uniform, > 0 softmax(score / temperature).")})
    pool_prior: bool = field(default=False, metadata={"help": (
        "Rank each user's top-K pool by the score the recommender serves: the SFT model's "
        "popularity prior w * log(1 + n_i) (n_i over the train users) added, so rejected items are "
        "what it would show, popular ones included. Off (or w = 0): the poly-score alone.")})
    negative_popularity: float = field(default=0.0, metadata={"help": (
        "Exponent a of a popularity weight (n_i + 1)^a on rejected-item draws (n_i: train users "
        "whose history holds item i, the weight the pop candidate list draws its negatives with "
        "at a = 1): inside the top-K pool for 'rodpo' (times the temperature's weights), over the "
        "catalog for 'random'. 0: unweighted. 'hard' picks deterministically: no effect there.")})
    dislike_share: float = field(default=0.0, metadata={"help": (
        "Probability that an example whose user has explicit dislikes (label-0 interactions) takes "
        "one of them as its rejected item instead of the strategy's pick: a dislike is a sure "
        "negative. 0: off (catalogs without dislikes are unaffected either way).")})
    catalog_share: float = field(default=0.0, metadata={"help": (
        "Probability that an example's rejected item is drawn uniformly over the catalog (positives "
        "excluded, as 'random' draws) instead of from the strategy's pool: the pool's near-misses "
        "teach the pop list, uniform draws keep the target above far-away items (the uniform list). "
        "0: off. No effect for 'random'.")})
    popularity_tilt_weight: float = field(default=0.0, metadata={"help": (
        "Weight of a penalty on the popularity tilt of the policy's score changes: each step, the "
        "least-squares slope, over the batch's items, of (policy minus reference score, averaged over "
        "the batch's users) on log(1 + n_i), squared. Aligned scores that fall with popularity move "
        "the model off the popularity prior it keeps from the SFT model (the target falls among the "
        "rare items of a uniform list). 0: off.")})
    aux_weight: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    nce_weight: float = field(default=0.0, metadata={"help": "Weight of the SFT NCE loss kept during alignment (0: off)."})
    nce_temperature: float = field(default=0.05, metadata={"help": "NCE softmax temperature (as in training)."})
    nce_in_batch: str = field(default="all", metadata={"choices": NCE_IN_BATCH, "help": (
        "The NCE anchor's negatives besides its nce_negatives uniform draws: 'all' the batch's other "
        "chosen and rejected items, 'chosen' the other chosen items only, 'none' no batch item. "
        "Batch items come by popularity (chosen items follow the users, rejected ones the top-K "
        "pools), so as negatives they push popular items down; uniform draws alone keep each target "
        "above random items, what a list of uniformly drawn candidates asks.")})
    nce_negatives: int = field(default=32, metadata={"help": (
        "Uniform catalog items added to each batch for the NCE term (beside the batch items "
        "nce_in_batch keeps), so it also keeps read items above random ones.")})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input."})
    lora_targets: str = field(default="", metadata={"help": "Comma-separated modules to adapt ('' = per architecture)."})
    lora_scope: str = field(default="all", metadata={"choices": ("all", "decoder"), "help": (
        "Where the adapters go: 'all' (encoder and decoder attention) or 'decoder' (user side "
        "only; the encoder stays frozen, its token states are computed once and cached: the "
        "item side then changes through the MoE only, and a step costs no encoder pass).")})
    experts: int = field(default=4, metadata={"help": "MoE experts (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts per vector."})
    expert_hidden: int = field(default=0, metadata={"help": "Expert FFN width (0: model width)."})
    moe_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the experts."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training examples (fractions allowed)."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimizer steps (0: from epochs)."})
    batch_size: int = field(default=16, metadata={"help": "Examples per step."})
    lr: float = field(default=2e-5, metadata={"help": (
        "Learning rate of the LoRA adapters. DPO needs small steps: at 5e-4 the Goodreads dev "
        "nDCG@10 fell below the SFT model's within 75 steps.")})
    moe_lr: float = field(default=5e-5, metadata={"help": "Learning rate of the MoE layer."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": (
        "'adamw', 'apollo' or 'apollo-mini' (low-rank optimizer state for the adapter and expert "
        "matrices; vectors stay on AdamW: embsum/training/apollo.py).")})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of linear warmup, then linear decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    examples: str = field(default="prefixes", metadata={"choices": ("prefixes", "last"),
                                                        "help": "'prefixes' (every prefix -> next item) or 'last'."})
    train_users: int = field(default=0, metadata={"help": "Use only this many train users (0: all; deterministic subset)."})
    bf16: str = field(default="auto", metadata={"choices": ("auto", "on", "off"), "help": "bf16 autocast: 'auto', 'on', 'off'."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda'."})
    encode_batch: int = field(default=64, metadata={"help": "Texts per forward when building the item bank."})
    eval_every: int = field(default=0, metadata={"help": "Dev evaluation every N steps (0: at the end only)."})
    save_every: int = field(default=100, metadata={"help": "Write OUT/last (checkpoint + train state) every N steps."})
    dev_users: int = field(default=200, metadata={"help": "Dev users in the evaluation (0: all)."})
    log_every: int = field(default=10, metadata={"help": "Log losses and expert shares every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed for the adapters' and MoE's initial weights, shuffling and negative sampling."})
    resume: bool = field(default=True, metadata={"help": "Continue from OUT/last when it holds a train state."})
    best_checkpoint: str = best_checkpoint_field()

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        _check(self.beta > 0, "beta must be > 0")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        _check(self.pool_size >= 1 and self.pool_refresh >= 1, "pool_size and pool_refresh must be >= 1")
        _check(self.pool_shortlist == 0 or self.pool_shortlist >= self.pool_size,
               f"pool_shortlist must be 0 (exact) or >= pool_size ({self.pool_size}), not {self.pool_shortlist}")
        _check(0.0 <= self.pool_fraction <= 1.0, "pool_fraction must be in [0, 1]")
        _check(self.pool_temperature >= 0, "pool_temperature must be >= 0")
        _check(self.negative_popularity >= 0, "negative_popularity must be >= 0")
        for name in ("dislike_share", "catalog_share"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        _check(self.aux_weight >= 0 and self.nce_weight >= 0 and self.popularity_tilt_weight >= 0,
               "aux_weight, nce_weight and popularity_tilt_weight must be >= 0")
        _check(self.nce_temperature > 0, "nce_temperature must be > 0")
        _check(self.nce_in_batch in NCE_IN_BATCH,
               f"nce_in_batch must be one of {', '.join(NCE_IN_BATCH)}, not {self.nce_in_batch!r}")
        _check(self.epochs > 0 or self.max_steps > 0, "epochs or max_steps must be > 0")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0 and self.moe_lr > 0, "learning rates must be > 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(self.examples in ("prefixes", "last"), f"examples must be 'prefixes' or 'last', not {self.examples!r}")
        _check(self.bf16 in ("auto", "on", "off"), f"bf16 must be auto/on/off, not {self.bf16!r}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        check_best_checkpoint(self.best_checkpoint)
        for name in ("nce_negatives", "max_steps", "train_users", "eval_every", "save_every", "dev_users", "log_every"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        try:  # the nested settings validate their own ranges
            self.lora_settings()
            self.moe_config()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def with_strategy(self, strategy: str) -> AlignConfig:
        """The same recipe with another negative strategy, drawn as that strategy is named: the
        baselines RoDPO is compared with ('hard': the pool's top-1, 'random': uniform over the
        catalog) take no popularity weighting of their draws, no share of catalog draws and no share
        of explicit dislikes: each stays the one strategy its name says. The loss (beta,
        label_smoothing) is theirs too."""
        if strategy == "rodpo":
            return self.replace(strategy=strategy)
        return self.replace(strategy=strategy, negative_popularity=0.0, catalog_share=0.0, dislike_share=0.0)

    def pool_size_for(self, num_items: int) -> int:
        """K on a catalog of num_items items: pool_size, capped at pool_fraction of the catalog."""
        if self.pool_fraction == 0:
            return self.pool_size
        return max(1, min(self.pool_size, round(self.pool_fraction * num_items)))

    def lora_settings(self):
        from embsum.model.lora import LoraSettings

        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            target_modules=self.lora_targets, scope=self.lora_scope)

    def moe_config(self, d_model: int = 384):
        from embsum.model.moe import MoEConfig

        return MoEConfig(d_model=d_model, num_experts=self.experts, top_k=self.top_k,
                         hidden=self.expert_hidden, dropout=self.moe_dropout)
