"""The Dictionary base class: a sparse dictionary's parameters and its math.

Plain torch only (no I/O, no nnsight), so a dictionary can be shipped by value
to a remote trace. Files live in ``nnsight_sae.files``; training in
``nnsight_sae.train``.
"""

# Annotations stay strings: a ``str | None`` object would make a remote request import functools.
from __future__ import annotations

import torch

from .errors import OptionError
from .options import REQUIRED, Option, Options


def activity(f) -> dict:
    """``fired`` (which features are active on any row) and ``l0`` (active per row) of
    dense feature activations f (rows, d_sae), for the trainer's statistics."""
    active = f.detach() != 0
    return {"fired": active.any(0), "l0": active.sum(-1).float().mean()}


class DictionaryConfig(Options):
    """What every dictionary has; each type's config adds its hyper-parameters."""

    d_in = Option(int, REQUIRED, "width of the activation it reads", min=1, cli=False)
    d_sae = Option(int, REQUIRED, "number of features", min=1, cli=False)
    site = Option(str, REQUIRED, "the site it reads, e.g. resid_post.6", cli=False)
    model = Option(str, None, "the model it was made for", cli=False)
    dtype = Option(str, "float32", "weights' dtype", choices=("float32", "float64", "float16", "bfloat16"), cli=False)
    apply_b_dec_to_input = Option(bool, True, "subtract the decoder bias from the input before encoding", cli=False)
    training_tokens = Option(int, None, "activation rows it was trained on", cli=False)
    # Any type can predict another site than the one it reads (a transcoder): then its decoder
    # bias is the output's, never subtracted from the input.
    out_site = Option(str, None, "the site it predicts, if not the one it reads", cli=False)
    d_out = Option(int, None, "width of what it predicts (default d_in)", min=1, cli=False)
    skip = Option(bool, False, "add a linear skip term from input to output", cli=False)

    def check(self):
        if self.out_site is not None and self.apply_b_dec_to_input:
            raise OptionError(f"a dictionary predicting {self.out_site} from {self.site} cannot subtract its decoder "
                              f"bias (the output's) from its input: set apply_b_dec_to_input false")
        if (self.d_out not in (None, self.d_in) or self.skip) and self.out_site is None:
            raise OptionError("d_out and skip are for dictionaries that predict another site (out_site)")

    def hyper_parameters(self) -> dict:
        """The type's own settings a user chooses (the options on the command line)."""
        return {name: getattr(self, name) for name, option in self.declared().items() if option.cli}


class Dictionary(torch.nn.Module):
    """Base of every dictionary type.

    Parameters follow SAELens names and shapes: ``W_enc`` (d_in, d_sae),
    ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_out), ``b_dec`` (d_out). ``cfg`` is an
    instance of the type's ``config_class`` (checked when made; a dict of its options
    is accepted too). The decoder is linear (``f @ W_dec + b_dec``) for every type,
    which is what lets feature edits leave the error term untouched.

    A type sets ``type_name`` and ``config_class``, implements ``encode``, and owns how
    it is trained (``training_loss``, ``dead_features``) and saved in SAELens' layout
    (``to_saelens`` / ``from_saelens``).
    """

    type_name = ""
    help = ""  # one line for `nnsight-sae info`
    config_class = DictionaryConfig
    #: how the trainer revives dead features: "resample", "auxk" (in the loss) or "none"
    dead_features = "resample"
    #: parameters that scale with the feature activations (divided when an input scale is folded in)
    feature_scaled = ("b_enc",)
    #: the trainer starts b_dec at the first batch's mean target (always, for a dictionary predicting
    #: another site), rather than at zero
    b_dec_from_mean = False

    def __init__(self, cfg):
        super().__init__()
        if type(cfg) is not self.config_class:
            cfg = self.config_class(**(cfg.as_dict() if isinstance(cfg, Options) else cfg))
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = torch.nn.Parameter(torch.empty(self.d_in, self.d_sae, dtype=dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.W_dec = torch.nn.Parameter(torch.empty(self.d_sae, self.d_out, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(self.d_out, dtype=dtype))
        if cfg.skip:
            self.W_skip = torch.nn.Parameter(torch.zeros(self.d_out, self.d_in, dtype=dtype))
        self.reset_parameters()

    # -- shape ------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of what it writes (d_in, except for some transcoders)."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def site(self) -> str:
        return self.cfg.site

    @property
    def out_site(self) -> str | None:
        """The site it predicts when that is not the one it reads (transcoders), else None."""
        return self.cfg.out_site

    # -- init -------------------------------------------------------------
    def reset_parameters(self, seed=None):
        """Random unit-norm decoder rows, encoder = decoder transpose, zero biases."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g, dtype=self.W_dec.dtype)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            if self.W_enc.shape == (self.W_dec.shape[1], self.W_dec.shape[0]):
                self.W_enc.copy_(self.W_dec.T)
            else:
                self.W_enc.copy_(torch.randn(self.W_enc.shape, generator=g, dtype=self.W_enc.dtype)
                                 / self.W_enc.shape[0] ** 0.5)
            for p in (self.b_enc, self.b_dec):
                if p is not None:
                    p.zero_()

    # -- math -------------------------------------------------------------
    def pre_acts(self, x):
        """Encoder pre-activations; the decoder bias is subtracted from the input
        first unless ``apply_b_dec_to_input`` is false (as for transcoders)."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x):
        """Feature activations (..., d_sae) of activations x (..., d_in)."""
        raise NotImplementedError

    def encode_train(self, x):
        """Feature activations during training; by default the same as encode."""
        return self.encode(x)

    def decode(self, f):
        """Reconstruction (..., d_out) of feature activations f (..., d_sae)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x)) + self.skip_term(x)

    def decoder_directions(self):
        """(d_sae, d_out) feature directions written into the site."""
        return self.W_dec

    @torch.no_grad()
    def normalize_decoder(self):
        """Project decoder rows back to unit norm (after an optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # -- training ---------------------------------------------------------
    def sparsity_penalty(self, x, f):
        """The sparsity term before its coefficient: mean L1 of the features."""
        return f.abs().sum(-1).mean()

    def training_loss(self, x, target, *, sparsity_scale=1.0, dead=None, sparse=True):
        """{loss, recon, mse, fired, l0} for 2-D x (rows, d_in) and target (rows, d_out): the
        per-element MSE to ``target`` plus the sparsity coefficient (scaled by the trainer's
        warm-up) times the penalty; ``fired`` (d_sae,) marks the features active on any row,
        ``l0`` is the mean number active per row. ``dead`` is a bool mask of features the
        trainer considers dead; ``sparse`` allows a backward over the active entries only
        (types that have one use it, on the devices where the trainer finds it faster)."""
        f = self.encode_train(x)
        recon = self.decode(f) + self.skip_term(x)
        mse = (recon - target).pow(2).mean()
        # types without an l1_coefficient option train on the reconstruction alone
        coefficient = getattr(self.cfg, "l1_coefficient", 0.0) * sparsity_scale
        loss = mse + coefficient * self.sparsity_penalty(x, f) if coefficient else mse
        return {"loss": loss, "recon": recon, "mse": mse, **activity(f)}

    def skip_term(self, x):
        """The linear skip path from input to output besides the features (zero without one)."""
        return x @ self.W_skip.T if self.cfg.skip else 0

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float, scale_out: float):
        """Make a dictionary trained on (scale_in * x -> scale_out * y) work on raw
        x -> y. Features shrink by scale_out, so unit-norm decoder rows stay unit norm."""
        self.W_enc.mul_(scale_in / scale_out)
        for name in self.feature_scaled:
            p = getattr(self, name, None)
            if p is not None:
                p.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.cfg.skip:
            self.W_skip.mul_(scale_in / scale_out)

    @torch.no_grad()
    def resample(self, dead, inputs, errors, generator):
        """Re-initialise dead features (bool mask) towards inputs the dictionary
        reconstructs worst (picked with probability proportional to squared error)."""
        n = int(dead.sum())
        if n == 0:
            return
        pick = torch.multinomial(errors.pow(2) + 1e-12, n, replacement=n > len(errors), generator=generator)
        directions = inputs[pick] - (self.b_dec if self.cfg.apply_b_dec_to_input else 0)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else 1.0
        if self.W_dec.shape[1] == directions.shape[1]:
            self.W_dec[dead] = directions
        self.W_enc[:, dead] = directions.T * enc_norm * 0.2
        if self.b_enc is not None:
            self.b_enc[dead] = 0.0

    # -- files ------------------------------------------------------------
    def to_saelens(self) -> dict:
        """This type's fields of a SAELens cfg.json (``architecture``, as a transcoder too when it
        has an out_site, and its own fields, e.g. ``k``); a ``metadata`` dict is merged into the
        file's metadata. Types SAELens has no class for keep their own name as the architecture
        (only this library reads them)."""
        return {"architecture": self.type_name}

    @classmethod
    def saelens_weights(cls, cfg: dict, weights: dict) -> dict:
        """The weights of a SAELens file of this type as this type uses them (a type whose file
        asks for an inference-time transform folds it in here)."""
        return weights

    def file_state(self) -> dict:
        """The tensors a file holds (the state dict; a type with derived copies refreshes them)."""
        return self.state_dict()

    @classmethod
    def from_saelens(cls, cfg: dict) -> dict | None:
        """This type's options for a SAELens cfg.json it reads (the common ones, sites and
        widths included, are read by ``nnsight_sae.files``), or None when the file is not of
        this type."""
        return None

    def extra_repr(self):
        return f"{self.type_name}: d_in={self.d_in}, d_sae={self.d_sae}, site={self.site!r}"
