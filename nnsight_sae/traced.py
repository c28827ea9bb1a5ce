"""Code that runs inside an nnsight trace.

Everything here is plain torch on tensors so that it can run on NDIF, whose
server allows only a short list of imports: this module imports torch and
nothing else (``nnsight_sae.remote_check`` enforces that in the tests).
"""

import torch


class Site:
    """A resolved place in one model where activations are read and written.

    Built by :func:`nnsight_sae.resolve_site`; use ``read()`` and ``write(x)``
    inside ``with model.trace(...)``. ``head_out`` sites read the per-head
    residual contributions (batch, pos, n_heads, d_model) from the output
    projection's input and weight, and write by summing them plus the bias into
    the projection's output.
    """

    def __init__(self, name, envoy, io, *, layer=None, d_in=None, n_heads=None, weight_layout="linear"):
        self.name = name
        self.envoy = envoy
        self.io = io
        self.layer = layer
        self.d_in = d_in
        self.n_heads = n_heads
        self.weight_layout = weight_layout

    def __repr__(self):
        return f"Site({self.name!r})"

    @property
    def is_heads(self):
        return self.n_heads is not None

    @property
    def heads_width(self) -> int:
        """A ``head_out`` site's per-head input width, n_heads * d_head (the projection's input)."""
        shape = self.envoy._module.weight.shape
        return shape[1] if self.weight_layout == "linear" else shape[0]

    @property
    def device(self):
        """The device of the module the site belongs to."""
        return self.envoy.device

    def read(self):
        """The site's activation (inside a trace)."""
        if self.is_heads:
            return split_heads(self.envoy.input, self._weight(), self.n_heads)
        value = self.envoy.output if self.io == "output" else self.envoy.input
        return value[0] if isinstance(value, tuple) else value

    def write(self, value):
        """Replace the site's activation (inside a trace), after any read()."""
        if self.is_heads:
            bias = self.envoy.bias
            total = value.sum(dim=-2)
            self.envoy.output = total if bias is None else total + bias
        elif self.io == "output":
            current = self.envoy.output
            self.envoy.output = (value,) + tuple(current[1:]) if isinstance(current, tuple) else value
        else:
            self.envoy.input = value

    def _weight(self):
        weight = self.envoy.weight
        if weight.device.type == "meta":
            weight = offloaded_weight(self.envoy._module)
        # nn.Linear stores (d_out, d_in); GPT-2's Conv1D stores (d_in, d_out).
        return weight if self.weight_layout == "linear" else weight.T


def offloaded_weight(module):
    """The weight of a module accelerate offloads to the CPU: its hook holds the real tensor
    and puts it in place only while the module's own forward runs, so hooks see meta."""
    hook = module._hf_hook
    for h in getattr(hook, "hooks", [hook]):
        weights = getattr(h, "weights_map", None)
        if weights is not None:
            return weights["weight"].to(h.execution_device)
    raise RuntimeError(f"{type(module).__name__}'s weight is on the meta device and no offload hook holds it")


def split_heads(z, weight, n_heads):
    """Per-head outputs of a projection: z (b, p, n_heads*d_head) and weight
    (d_model, n_heads*d_head) -> (b, p, n_heads, d_model). Their sum over heads
    is ``z @ weight.T``."""
    d_model = weight.shape[0]
    z = z.reshape(*z.shape[:-1], n_heads, -1)
    w = weight.reshape(d_model, n_heads, -1)
    return torch.einsum("...hd,mhd->...hm", z, w)


def edit_features(f, ablate=None, clamp=None, add=None):
    """A copy of feature activations f with features zeroed (ablate: indices),
    set (clamp: {index: value}) or shifted (add: {index: value})."""
    f = f.clone()
    if ablate:
        f[..., list(ablate)] = 0
    for index, value in (clamp or {}).items():
        f[..., index] = value
    for index, value in (add or {}).items():
        f[..., index] = f[..., index] + value
    return f


def at_positions(mask, new, old):
    """new where mask (batch, pos) is true, else old; new everywhere without a mask."""
    if mask is None:
        return new
    mask = mask.to(new.device).bool()
    return torch.where(mask.reshape(*mask.shape, *([1] * (new.dim() - mask.dim()))), new, old)


def toward(r, z, alpha, mask):
    """z moved to ``alpha`` of the way from r (1: z itself) where mask (batch, pos, 1) is 1."""
    return z + ((1 - alpha) * mask.to(z.device) * (r.to(z.device, torch.float32) - z.float())).to(z.dtype)


class Attached:
    """A dictionary bound to its site(s) in one model, for use inside traces.

    Nothing is added to the model's module tree: the dictionary runs as plain
    torch on the site's tensors, so traces stay remote-safe. Built by
    :func:`nnsight_sae.attach`.
    """

    def __init__(self, dictionary, site, out_site=None, mlp=None):
        self.dictionary = dictionary
        self.site = site
        self.out_site = out_site
        self.mlp = mlp

    def __repr__(self):
        return f"Attached({self.dictionary.type_name!r} at {self.site.name!r})"

    def features(self):
        """The feature activations of the site (read only)."""
        x = self.site.read()
        return self._on(x).encode(x)

    def _on(self, x):
        """The dictionary, on x's device: already so locally (``attach`` placed it); on NDIF it
        arrives on the CPU while the activations are on the server's GPU."""
        d = self.dictionary
        if d.W_dec.device != x.device:
            d.to(x.device)
        return d

    def splice(self, *, error=True, ablate=None, clamp=None, add=None, mask=None):
        """Replace the site by the dictionary's reconstruction and return the features.

        error=True keeps the error term (x - x_hat), so with no edits the model
        runs as if untouched (to float tolerance); feature edits then change the
        activation by exactly the edited features' decoder contributions.
        error=False writes the bare (edited) reconstruction. mask (batch, pos),
        if given, limits the change to positions where it is true.
        """
        x = self.site.read()
        d = self._on(x)
        f = d.encode(x)
        edited = edit_features(f, ablate, clamp, add) if (ablate or clamp or add) else f
        if error:
            out = x if edited is f else x + (edited - f) @ d.decoder_directions()
        else:
            out = d.decode(edited)
        self.site.write(at_positions(mask, out, x))
        return edited

    def replace_mlp(self, *, error=False, ablate=None, clamp=None, add=None, mask=None):
        """Replace the MLP's output by the transcoder's prediction and return its features.

        error=False skips the MLP's own compute where the family has a single MLP
        module (and no mask is given); error=True runs the MLP and keeps the
        transcoder's error term. mask as in splice.
        """
        x = self.site.read()
        d = self._on(x)
        f = d.encode(x)
        edited = edit_features(f, ablate, clamp, add) if (ablate or clamp or add) else f
        prediction = d.decode(edited) + d.skip_term(x)
        if self.mlp is not None and not error and mask is None:
            self.mlp.skip(prediction)
            return edited
        target = self.out_site.read()
        out = target + (edited - f) @ d.decoder_directions() if error else prediction
        self.out_site.write(at_positions(mask, out, target))
        return edited
