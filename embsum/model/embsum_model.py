"""EmbSum: a seq2seq backbone plus poly-attention on both sides (DESIGN.md, "The model").

Item side (CPE): item text -> encoder token states H -> Lambda = poly-attention with n codes
(padding masked) and the precomputable Lambda' = gelu(Lambda W_s).

User side (UPE): history -> sessions of p items, each session encoded on its own (p = 1: each
history item, so its encoding is shared with the item side) -> the token states of a user's
sessions concatenated (padding squeezed out) -> the decoder reads them through
cross-attention. It is trained to generate the user's interest summary (teacher forcing); its
hidden state at the first (start-token) position is the user's global vector. That position
sees only the start token and the history, so inference needs no summary. Gamma =
poly-attention with m codes over [global vector; history token states].

Item prior (`ModelConfig.item_prior`): a per-item scalar b from the item's content (a linear head
on its mean-pooled token states), appended as one extra column to every CPE vector, with 1
appended to every UPE vector and 0 to every CPE' vector. The poly weights sum to 1, so
s = sum_k w_k (K_k + b) = s_without_prior + b, the weights are untouched, and the vectors stay
plain precomputable vectors (d + 1 wide) for FAISS inner-product search and the certified top-N.

Aligned models (RoDPO, embsum/policy.py) add an MoE fusion layer (`fusion`, configured by
`ModelConfig.fusion`) that maps every pooled CPE/UPE vector right before the L2 normalisation.

The lower-level methods (`item_embeddings`, `user_embeddings`) take token states, so training
can encode every distinct text of a batch once, or reuse cached states of a frozen encoder.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embsum.config import ConfigError, ModelConfig
from embsum.model.backbone import hidden_size, mean_pool
from embsum.model.moe import MoEConfig, MoEFusion
from embsum.model.poly_attention import PolyAttention

# Parameters created by EmbSum itself (or by warm-starting a decoder): trained with the higher
# "new layers" learning rate.
NEW_PARAMETER_MARKERS = ("item_poly.", "user_poly.", "item_ws.", "item_proj.", "user_proj.",
                         "global_proj.", "fusion.", "item_prior.", "crossattention", "enc_to_dec_proj")

# What each top-level module is (a checkpoint's modules.json lists those that hold weights).
MODULE_ROLES = {
    "backbone": "seq2seq backbone (its HF config and tokenizer are in backbone/)",
    "item_poly": "item pooling: poly-attention with n codes (CPE)",
    "user_poly": "user pooling: poly-attention with m codes (UPE)",
    "item_proj": "item pooling: masked mean + linear map (CPE, pooling 'mean')",
    "user_proj": "user pooling: masked mean + linear map (UPE, pooling 'mean')",
    "item_ws": "W_s of the precomputed Lambda' = gelu(Lambda W_s)",
    "global_proj": "decoder width -> encoder width of the user's global (summary) vector",
    "fusion": "MoE fusion of every CPE/UPE vector (config: model_config.fusion)",
    "item_prior": "per-item score prior b: linear head on the mean-pooled item tokens (extra CPE column)",
}


def module_names(config: ModelConfig) -> tuple[set[str], set[str]]:
    """(modules holding weights that a model of `config` always has, those it may have): what a
    checkpoint's weights can be checked against before any model is built. `global_proj` holds
    weights only when the decoder is wider or narrower than the encoder."""
    pooling = {"item_poly", "user_poly"} if config.pooling == "poly" else {"item_proj", "user_proj"}
    fusion = {"fusion"} if config.fusion else set()
    prior = {"item_prior"} if config.item_prior != "none" else set()
    return {"backbone", "item_ws", *pooling, *fusion, *prior}, {"global_proj"}


@dataclass
class UserOutput:
    upe: torch.Tensor  # [B, m, d]
    summary_nll: torch.Tensor | None  # mean token NLL over users with a summary, None if none given


def _identity_linear(d: int) -> nn.Linear:
    layer = nn.Linear(d, d)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d))
        layer.bias.zero_()
    return layer


@contextmanager
def _head_rows(backbone: nn.Module, rows: torch.Tensor):
    """Within the block the backbone's LM head computes logits only for the decoder positions
    where `rows` [B, T] is True: its input [B, T, d] is cut to [N, d] by a forward pre-hook, so
    the logits come back [N, vocab] (a bias added after the head, e.g. BART's
    final_logits_bias [1, vocab], still broadcasts)."""
    head = backbone.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _head_inputs(backbone: nn.Module, rows: torch.Tensor):
    """Within the block the backbone's LM head computes no logits at all: its input at the
    positions where `rows` [B, T] is True is kept ([N, d], in the list this yields) and it returns
    a [N, vocab] view of one zero, so that `losses.linear_nll` can score those rows in vocabulary
    slices (a quarter of a goodreads_cpu train step was this head: see linear_nll).

    Only for a head that is a plain nn.Linear (BERT2BERT, T5, BART; BART's final_logits_bias,
    added after the head, is `head_bias` below); any other head (a LoRA-wrapped one, say)
    computes its logits on those rows as `_head_rows` does, and the list stays empty."""
    head = backbone.get_output_embeddings()
    if type(head) is not nn.Linear:
        with _head_rows(backbone, rows):
            yield []
        return
    kept: list[torch.Tensor] = []

    def forward(x):
        kept.append(x[rows])
        return x.new_zeros(()).expand(len(kept[-1]), head.out_features)

    with _forwards_swapped([head], lambda _own: forward):
        yield kept


def head_bias(backbone: nn.Module) -> torch.Tensor | None:
    """The bias the LM head's logits get: its own, plus a bias the model adds after it (BART)."""
    bias = backbone.get_output_embeddings().bias
    extra = getattr(backbone, "final_logits_bias", None)
    if extra is None:
        return bias
    return extra[0] if bias is None else bias + extra[0]


# The decoder's cross-attention projections of its memory (keys and values), by backbone family:
# BERT2BERT (the packaged MiniLM), T5, BART.
MEMORY_PROJECTIONS = ("crossattention.self.key", "crossattention.self.value", "EncDecAttention.k",
                      "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")


@contextmanager
def _memory_rows(backbone: nn.Module, memory_mask: torch.Tensor):
    """Within the block the decoder's cross-attention key and value projections run over the
    memory's real tokens only (`memory_mask` [B, T], 1 = token); padded positions get zeros.

    A batch's memory is padded to its longest user (goodreads_cpu: 5,526 real tokens of 12,208
    rows, a median step of benchmarks/train_step.py), and those rows cost two d x d products a
    layer forward and two backward for keys and values the attention mask weighs with exactly 0:
    1.14x a whole step there. The same math up to float rounding. Not used when
    a user has no token at all (the attention then spreads evenly over padding, whose keys and
    values would change)."""
    valid = memory_mask.bool()
    if bool(valid.all()) or not bool(valid.any(1).all()):
        yield
        return
    layers = [m for name, m in backbone.named_modules() if name.endswith(MEMORY_PROJECTIONS)]

    def packed(layer_forward):
        def forward(x, *args, **kwargs):
            if x.shape[:-1] != valid.shape:  # not this memory (e.g. a layer shared with self-attention)
                return layer_forward(x, *args, **kwargs)
            rows = layer_forward(x[valid], *args, **kwargs)
            return rows.new_zeros((*valid.shape, rows.shape[-1])).index_put((valid,), rows)
        return forward

    with _forwards_swapped(layers, packed):
        yield


@contextmanager
def _forwards_swapped(modules: list[nn.Module], make_forward):
    """Within the block each module's forward is `make_forward(its forward)`; afterwards each has
    the forward it had before (an instance's own, if one was set, else its class's)."""
    before = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = make_forward(module.forward)
    try:
        yield
    finally:
        for module, forward in zip(modules, before):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _append_column(vectors: torch.Tensor, value) -> torch.Tensor:
    """[B, k, d] -> [B, k, d + 1]: `value` (a number, or [B, 1, 1] per row) as the last column."""
    column = vectors.new_zeros((*vectors.shape[:-1], 1)) + value
    return torch.cat([vectors, column], dim=-1)


class EmbSumModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer  # not a module: saved beside the weights by checkpoint.py
        d = hidden_size(backbone.get_encoder().config)
        decoder_config = getattr(backbone.config, "decoder", backbone.config)
        d_dec = hidden_size(decoder_config)
        self.d = d
        self.global_proj = nn.Identity() if d_dec == d else nn.Linear(d_dec, d)
        if config.pooling == "poly":
            poly = {"init": config.poly_init, "noise": config.poly_init_noise, "out_proj": config.poly_out_proj}
            self.item_poly = PolyAttention(config.item_codes, d, **poly)
            self.user_poly = PolyAttention(config.user_codes, d, **poly)
        else:
            self.item_proj = _identity_linear(d)
            self.user_proj = _identity_linear(d)
        self.item_ws = nn.Linear(d, d, bias=False)  # W_s of Lambda' = gelu(Lambda W_s)
        if config.pair_weight_init:
            # After the default init, so every later draw is the same with or without it.
            with torch.no_grad():
                self.item_ws.weight.copy_(torch.eye(d) * config.pair_weight_init)
        self.item_prior: nn.Linear | None = None
        if config.item_prior == "content":
            # Zero-initialised: b = 0 at first, so the model starts where the one without a prior is.
            self.item_prior = nn.Linear(d, 1)
            nn.init.zeros_(self.item_prior.weight)
            nn.init.zeros_(self.item_prior.bias)
        # Width of the stored CPE/UPE vectors: d, plus the prior's column.
        self.vector_dim = d + (self.item_prior is not None)
        self.fusion: MoEFusion | None = None
        if config.fusion:
            self.set_fusion(MoEFusion(MoEConfig(**config.fusion)))
        bt = backbone.config
        self.start_token_id = int(bt.decoder_start_token_id)
        self.pad_token_id = int(bt.pad_token_id if bt.pad_token_id is not None else 0)
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = int(eos if eos is not None else self.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if any(m in name for m in NEW_PARAMETER_MARKERS)}

    def set_fusion(self, fusion: MoEFusion | None) -> None:
        """Attach (or with None remove) the MoE fusion layer. The config follows, so a saved
        checkpoint rebuilds the same model."""
        if fusion is not None and fusion.config.d_model != self.d:
            raise ConfigError(f"fusion d_model {fusion.config.d_model} does not match the model's width {self.d}")
        self.fusion = fusion
        self.config = self.config.replace(fusion=fusion.config if fusion is not None else {})

    def describe_modules(self) -> list[dict]:
        """The top-level modules holding weights, in order (a checkpoint's modules.json): name,
        class, role, and the key prefix of their tensors in model.safetensors."""
        prefixes = {key.split(".", 1)[0] for key in self.state_dict()}
        return [{"name": name, "type": f"{type(module).__module__}.{type(module).__qualname__}",
                 "role": MODULE_ROLES.get(name, ""), "weights": f"{name}."}
                for name, module in self.named_children() if name in prefixes]

    # -- tokenization -----------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                               max_length=max_tokens or self.config.item_max_tokens)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def session_text(self, item_texts: list[str]) -> str:
        """p item texts -> one session text (p > 1), separated by the tokenizer's separator."""
        sep = self.tokenizer.sep_token or self.tokenizer.eos_token or "|"
        return f" {sep} ".join(item_texts)

    def summary_batch(self, summaries: list[str | None]) -> dict[str, torch.Tensor]:
        """Teacher forcing: decoder input [start, s1..sT], labels [s1..sT, eos] (-100 on padding).
        A user without a summary gets the start token only and no labels."""
        limit = self.config.summary_max_tokens - 1
        tokens = [self.tokenizer(s, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
                  if s else [] for s in summaries]
        length = 1 + max((len(t) for t in tokens), default=0)
        inputs = torch.full((len(tokens), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(tokens), length), -100, dtype=torch.long)
        mask = torch.zeros((len(tokens), length), dtype=torch.long)
        for row, tok in enumerate(tokens):
            inputs[row, 0] = self.start_token_id
            inputs[row, 1:1 + len(tok)] = torch.tensor(tok, dtype=torch.long)
            mask[row, :1 + len(tok)] = 1
            if tok:
                labels[row, :len(tok) + 1] = torch.tensor(tok + [self.eos_token_id], dtype=torch.long)
        return {"decoder_input_ids": inputs, "decoder_attention_mask": mask, "labels": labels}

    # -- encoder ----------------------------------------------------------------------------
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder token states H [B, L, d]."""
        out = self.backbone.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1) if self.config.normalize else x.float()

    def _output_vectors(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vectors [B, k, d] -> CPE/UPE vectors: the fusion layer (if any), then L2
        normalisation. Its aux loss stays with the layer (MoEFusion.pop_aux)."""
        if self.fusion is not None:
            pooled, _aux = self.fusion(pooled)
        return self._normalize(pooled)

    # -- item side (CPE) ----------------------------------------------------------------------
    def item_embeddings(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, d] -> (Lambda, Lambda') each [B, n, d] (float32)."""
        if self.config.pooling == "poly":
            lam = self.item_poly(states, mask)
        else:
            lam = self.item_proj(mean_pool(states, mask)).unsqueeze(1)
        lam = self._output_vectors(lam)
        lam_prime = F.gelu(self.item_ws(lam.to(states.dtype))).float()
        if self.item_prior is not None:
            prior = self.item_prior(mean_pool(states, mask).to(self.item_prior.weight.dtype)).float()  # [B, 1]
            lam = _append_column(lam, prior.unsqueeze(1))
            lam_prime = _append_column(lam_prime, 0.0)  # the weights get no prior
        return lam, lam_prime

    def encode_items(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenized item texts -> (cpe, cpe_prime), each [B, n, d]."""
        return self.item_embeddings(self.encode_tokens(input_ids, attention_mask), attention_mask)

    # -- user side (UPE) ----------------------------------------------------------------------
    @staticmethod
    def user_memory(states: torch.Tensor, mask: torch.Tensor, user_sessions: torch.Tensor):
        """Concatenate each user's session states, squeezing out padding.

        states [S, L, d] / mask [S, L] of the distinct sessions; user_sessions [B, P] indexes them
        (-1: no session). -> memory [B, T, d], memory_mask [B, T] with T the longest user's tokens.
        Only real tokens are copied (a padded [B, P*L, d] gather would be mostly zeros)."""
        n_users, n_sessions = user_sessions.shape
        device = states.device
        lengths = mask.sum(1)
        starts = torch.cumsum(lengths, 0) - lengths  # each session's first token in `flat`
        flat = states[mask.bool()]  # [N_tokens, d], sessions one after another
        idx = user_sessions.clamp(min=0)
        seg_len = torch.where(user_sessions >= 0, lengths[idx], 0).flatten()  # [B*P]
        seg_start = starts[idx].flatten()
        total = int(seg_len.sum())
        seg_out = torch.cumsum(seg_len, 0) - seg_len  # where each segment starts in the output stream
        within = torch.arange(total, device=device) - torch.repeat_interleave(seg_out, seg_len)
        src = torch.repeat_interleave(seg_start, seg_len) + within
        counts = seg_len.view(n_users, n_sessions).sum(1)
        user = torch.repeat_interleave(torch.arange(n_users, device=device), counts)
        pos = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        width = max(1, int(counts.max()) if n_users else 1)
        memory = states.new_zeros((n_users, width, states.shape[-1]))
        memory[user, pos] = flat[src]
        memory_mask = (torch.arange(width, device=device).unsqueeze(0) < counts.unsqueeze(1)).long()
        return memory, memory_mask

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, summaries: dict | None = None):
        """Decoder over the history memory -> (global vector [B, d], summary NLL or None)."""
        from transformers.modeling_outputs import BaseModelOutput

        n_users = memory.shape[0]
        if summaries is None:
            dec_in = torch.full((n_users, 1), self.start_token_id, dtype=torch.long, device=memory.device)
            dec_mask = torch.ones_like(dec_in)
            labels = None
        else:
            dec_in = summaries["decoder_input_ids"].to(memory.device)
            dec_mask = summaries["decoder_attention_mask"].to(memory.device)
            labels = summaries["labels"].to(memory.device)
        # The LM head only sees the positions that have a label (none at inference): its rows are
        # 30k-word logits, and those of padding (a third of a goodreads batch) or of an inference
        # pass were computed only to be thrown away (benchmarks/train_step.py times the step without
        # it). Those it sees are scored by linear_nll, vocabulary slice by slice.
        scored = labels != -100 if labels is not None else torch.zeros(dec_in.shape, dtype=torch.bool,
                                                                         device=memory.device)
        with _head_inputs(self.backbone, scored) as head_input, _memory_rows(self.backbone, memory_mask):
            out = self.backbone(
                encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=memory_mask,
                decoder_input_ids=dec_in, decoder_attention_mask=dec_mask,
                output_hidden_states=True, use_cache=False, return_dict=True,
            )
        global_vec = self.global_proj(out.decoder_hidden_states[-1][:, 0])
        nll = None
        if labels is not None and bool(scored.any()):
            from embsum.training.losses import linear_nll, summary_nll

            if head_input:
                head = self.backbone.get_output_embeddings()
                # 1,024-word slices keep each one's logits in a CPU core's cache; a GPU gains
                # nothing from that and pays ~500 more kernel launches a step (its step is bound by
                # launching: README, GPU recipe), so there the vocabulary is one slice (unmeasured).
                chunk = 1024 if head.weight.device.type == "cpu" else head.weight.shape[0]
                nll = linear_nll(head_input[0], head.weight, head_bias(self.backbone), labels[scored], chunk)
            else:  # [N scored positions, vocab]; [B, T, vocab] from a backbone without an output layer
                nll = summary_nll(out.logits, labels[scored] if out.logits.dim() == 2 else labels)
        return global_vec, nll

    def user_embeddings(self, states: torch.Tensor, mask: torch.Tensor, user_sessions: torch.Tensor,
                        summaries: dict | None = None) -> UserOutput:
        """Session token states + which sessions each user has -> UPE [B, m, d] (+ summary NLL)."""
        memory, memory_mask = self.user_memory(states, mask, user_sessions)
        return self.users_from_memory(memory, memory_mask, summaries)

    def users_from_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                          summaries: dict | None = None) -> UserOutput:
        """Each user's concatenated history token states [B, T, d] (mask [B, T]) -> UPE (+ NLL)."""
        global_vec, nll = self.decode(memory, memory_mask, summaries)
        keys = torch.cat([global_vec.unsqueeze(1).to(memory.dtype), memory], dim=1)
        keys_mask = torch.cat([torch.ones_like(memory_mask[:, :1]), memory_mask], dim=1)
        if self.config.pooling == "poly":
            gamma = self.user_poly(keys, keys_mask)
        else:
            gamma = self.user_proj(mean_pool(keys, keys_mask)).unsqueeze(1)
        upe = self._output_vectors(gamma)
        if self.item_prior is not None:
            upe = _append_column(upe, 1.0)  # picks up the item's b in every dot product
        return UserOutput(upe=upe, summary_nll=nll)

    def encode_users(self, session_input_ids: torch.Tensor, session_attention_mask: torch.Tensor,
                     user_sessions: torch.Tensor, summaries: dict | None = None) -> torch.Tensor:
        """Tokenized distinct sessions [S, L] + user_sessions [B, P] (-1 padding) -> UPE [B, m, d]."""
        states = self.encode_tokens(session_input_ids, session_attention_mask)
        return self.user_embeddings(states, session_attention_mask, user_sessions, summaries).upe
