"""What a matrix module is, and how users name layers: one rule for the whole package.

The routing of :func:`specopt.build_optimizer`, the PC layer (:func:`specopt.apply_pc`)
and the :class:`specopt.SpectralMonitor` all ask the same questions of a model: which
tensors are weight matrices, which way round they are stored, what their fan-in and
fan-out are, which block of the network they belong to, and which of them a user's glob
pattern names. This module answers them once. It imports nothing from specopt and only
``torch`` otherwise (transformers' ``Conv1D`` and MoE expert modules are recognised
duck-typed, without importing transformers).

Matrix kinds (:func:`matrix_spec`), with ``(out, in)`` the orientation of the operator
``y = W x`` (``out`` = fan-out, ``in`` = fan-in):

============  ====================================  ===================  ================
kind          tensor                                stored as            matrix layout
============  ====================================  ===================  ================
linear        ``nn.Linear.weight`` (and subclasses)  ``(out, in)``        ``"matrix"``
transposed    transformers ``Conv1D.weight``         ``(in, out)``        ``"matrix"``
              (GPT-2, GPT-1; a module named
              ``Conv1D`` with int ``nf``, ``nx``)
conv          ``nn.Conv1d/2d/3d.weight`` (any        ``(out, in/g, *k)``  ``"flatten"``:
              ``_ConvNd``)                                                ``(out, in/g*k)``
embedding     ``nn.Embedding`` / ``EmbeddingBag``    ``(num, dim)``       ``"matrix"``, read
              weight (a lookup table)                                     as stored (the
                                                                          tied-head view)
experts       any other parameter with ndim >= 3:    ``(E, out, in)``;    ``"batch"``: E
              a batch of matrices (MoE experts)      ``(E, in, out)``     matrices
                                                     when the owner has
                                                     ``is_transposed``
matrix        any other 2-D parameter (bare)         ``(out, in)``        ``"matrix"``
vector        ndim < 2 (biases, norm gains, gains)   --                   --
============  ====================================  ===================  ================

``is_transposed`` is transformers' flag on its MoE expert modules (GPT-OSS, Aria); expert
tensors of other modules follow the ``nn.Linear`` convention ``(E, out, in)``, which is how
transformers' Mixtral/Qwen-MoE/DeepSeek store them.

Block labels (:func:`block_of`) from the module path, lower-cased, split on ``.``, with
wrapper prefixes (``module``, ``_orig_mod``, ``_fsdp_wrapped_module``,
``_checkpoint_wrapped_module``) dropped; the first rule that applies wins:

1. ``"embedding"``: the tensor is an embedding table (``nn.Embedding``).
2. ``"head"``: the first or the last component is one of :data:`HEAD_NAMES`
   (``lm_head``, ``output``, ``classifier``, ``score``, ``embed_out``, ...).
3. ``"embedding"``: a component contains ``embed`` or is one of :data:`EMBEDDING_NAMES`
   (``wte``, ``wpe``, ``shared``), e.g. a ViT's ``patch_embeddings.projection`` conv.
4. Scanning components left to right, the first one that names a block: one containing
   ``attn`` or ``attention`` (``self_attn``, ``SelfAttention``, ``EncDecAttention``,
   ``attention``) -> ``"attention"``; one of :data:`MLP_NAMES` (``mlp``, ``feed_forward``,
   ``DenseReluDense``, ``intermediate``, ``experts``, ...) or an inner ``output`` (BERT's
   ``layer.N.output.dense`` is the FFN's second matrix) -> ``"mlp"``.
5. The last component alone: a q/k/v/output projection name (``q_proj``, ``c_attn``,
   ``query``, ...) -> ``"attention"``; an FFN matrix name (``fc1``, ``w1``, ``c_fc``,
   ``up_proj``, ``dense_h_to_4h``, ALBERT's ``ffn_output``, ConvNeXt's ``pwconv1``,
   ``nn.TransformerEncoderLayer``'s ``linear1``, ...) -> ``"mlp"``.
6. ``"other"``.

Selection (one vocabulary for ``include`` / ``exclude`` everywhere): a pattern is a glob
string (``fnmatch``: ``*`` also matches dots, case-sensitive) matched against the whole
name, or a compiled regex (``re.Pattern``) matched with ``search``. A module is named by
its path in ``model.named_modules()``; a parameter by its full name, its layer name (a
parametrization path collapsed: ``fc.parametrizations.weight.original`` -> ``fc.weight``)
and (for a matrix) its module's path, so ``"layers.*.mlp.*"`` selects the same layers for
all three.
A pattern that matches nothing is an error (:func:`no_match_error`) naming the argument,
the pattern and a few close candidate names: a typo never silently selects nothing.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Union

from torch import Tensor, nn

__all__ = [
    "ATTENTION_LEAF_NAMES",
    "BLOCKS",
    "EMBEDDING_NAMES",
    "HEAD_NAMES",
    "KINDS",
    "MLP_LEAF_NAMES",
    "MLP_NAMES",
    "MatrixSpec",
    "Pattern",
    "as_matrices",
    "block_of",
    "check_patterns",
    "is_embedding_path",
    "is_head_path",
    "is_transposed_linear",
    "matches",
    "matrix_spec",
    "no_match_error",
    "path_components",
    "require_all_matched",
]

#: Matrix kinds, see the module docstring.
KINDS: tuple[str, ...] = (
    "linear", "transposed", "conv", "embedding", "experts", "matrix", "vector",
)
#: Block labels :func:`block_of` returns.
BLOCKS: tuple[str, ...] = ("attention", "mlp", "embedding", "head", "other")

#: Module names of an output / classifier head (first or last component of the path).
HEAD_NAMES: tuple[str, ...] = (
    "output", "lm_head", "head", "classifier", "classification_head", "embed_out", "score",
    "cls",
)
#: Component names of embedding tables besides those containing "embed".
EMBEDDING_NAMES: tuple[str, ...] = ("wte", "wpe", "shared")
#: Component names of an FFN / MoE block (lower-cased).
MLP_NAMES: tuple[str, ...] = (
    "mlp", "ffn", "feed_forward", "feedforward", "densereludense", "densegatedactdense",
    "intermediate", "experts", "moe", "block_sparse_moe", "shared_expert",
)
#: Last components that name an attention projection (lower-cased).
ATTENTION_LEAF_NAMES: tuple[str, ...] = (
    "wq", "wk", "wv", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "qkv_proj",
    "c_attn", "query", "key", "value", "query_key_value", "q", "k", "v", "o",
)
#: Last components that name an FFN matrix (lower-cased).
MLP_LEAF_NAMES: tuple[str, ...] = (
    "fc1", "fc2", "c_fc", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1", "fc_in", "fc_out",
    "ffn_output", "pwconv1", "pwconv2", "linear1", "linear2",
)

_WRAPPERS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module",
                       "_checkpoint_wrapped_module"})

Pattern = Union[str, "re.Pattern[str]"]


# ----------------------------------------------------------------------- matrix kinds


def is_transposed_linear(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``).

    Duck-typed so transformers need not be imported: a module whose class is named
    ``Conv1D`` with int ``nf`` (out) and ``nx`` (in) and a weight of shape ``(nx, nf)``.
    """
    # The MRO: a parametrized module's class is a generated subclass (ParametrizedConv1D).
    if not any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        return False
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if not (isinstance(nf, int) and isinstance(nx, int)):
        return False
    # Read the stored tensor (a parametrized module's raw weight keeps the shape).
    w = _stored_weight(module)
    return isinstance(w, Tensor) and tuple(w.shape) == (nx, nf)


def _stored_weight(module: nn.Module) -> Tensor | None:
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return getattr(params["weight"], "original", None)
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) else None


@dataclass(frozen=True)
class MatrixSpec:
    """How one tensor reads as a matrix (or a batch of matrices).

    Attributes:
        kind: one of :data:`KINDS`.
        shape: the stored shape.
        transposed: each matrix is stored ``(in, out)`` (transformers' ``Conv1D``, expert
            modules with ``is_transposed``); the operator is its transpose.
        layout: ``"matrix"`` (2-D), ``"flatten"`` (conv kernel read as
            ``(shape[0], prod(shape[1:]))``), ``"batch"`` (leading dims index matrices of
            the last two dims), or ``"none"`` for vectors.
        fan_out, fan_in: rows and columns of each matrix in the true ``(out, in)``
            orientation (``in`` of a conv is ``in / groups * prod(kernel)``).
        count: number of matrices (``prod(shape[:-2])`` for ``"batch"``, else 1).
    """

    kind: str
    shape: tuple[int, ...]
    transposed: bool
    layout: str
    fan_out: int
    fan_in: int
    count: int = 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(fan_out, fan_in)`` of each matrix, in the true orientation."""
        return (self.fan_out, self.fan_in)

    @property
    def stored_matrix_shape(self) -> tuple[int, int]:
        """Shape of each matrix as stored (``(fan_in, fan_out)`` when transposed)."""
        return (self.fan_in, self.fan_out) if self.transposed else (self.fan_out, self.fan_in)

    @property
    def is_matrix(self) -> bool:
        """True for every kind but ``"vector"``."""
        return self.kind != "vector"

    @property
    def has_unit_dim(self) -> bool:
        """A matrix with a size-1 side: a vector in matrix form (e.g. ``(1, D)`` tokens)."""
        return self.is_matrix and min(self.fan_out, self.fan_in) == 1


def matrix_spec(module: nn.Module | None, name: str, tensor: Tensor) -> MatrixSpec:
    """The :class:`MatrixSpec` of ``module.<name>`` = ``tensor`` (rules: module docstring).

    ``module`` is the layer that owns the tensor (for a parametrized weight, the layer, not
    its ``ParametrizationList``); ``None`` for a tensor without an owner.
    """
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) < 2:
        n = shape[0] if shape else 1
        return MatrixSpec("vector", shape, False, "none", n, 1)
    is_weight = name == "weight"
    if is_weight and isinstance(module, nn.Linear):
        return MatrixSpec("linear", shape, False, "matrix", shape[0], math.prod(shape[1:]))
    if is_weight and module is not None and len(shape) == 2 and is_transposed_linear(module):
        return MatrixSpec("transposed", shape, True, "matrix", shape[1], shape[0])
    if is_weight and isinstance(module, nn.modules.conv._ConvNd):
        return MatrixSpec("conv", shape, False, "flatten", shape[0], math.prod(shape[1:]))
    if is_weight and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return MatrixSpec("embedding", shape, False, "matrix", shape[0], math.prod(shape[1:]))
    if len(shape) >= 3:
        transposed = bool(getattr(module, "is_transposed", False))
        rows, cols = shape[-2], shape[-1]
        out, inp = (cols, rows) if transposed else (rows, cols)
        return MatrixSpec("experts", shape, transposed, "batch", out, inp,
                          count=math.prod(shape[:-2]))
    return MatrixSpec("matrix", shape, False, "matrix", shape[0], shape[1])


def as_matrices(tensor: Tensor, spec: MatrixSpec) -> Tensor:
    """``tensor`` viewed as its matrices in the true orientation: ``(out, in)`` for one
    matrix, ``(count, out, in)`` for a batch. A view (no copy) except for non-contiguous
    conv kernels; ``spec`` must come from a tensor of this shape."""
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not match its spec "
                         f"{spec.shape}")
    if spec.layout == "none":
        raise ValueError(f"a {spec.kind} of shape {spec.shape} is not a matrix")
    if spec.layout == "flatten":
        return tensor.reshape(spec.shape[0], -1)
    if spec.layout == "batch":
        t = tensor.reshape(spec.count, *spec.shape[-2:])
        return t.mT if spec.transposed else t
    return tensor.mT if spec.transposed else tensor


# --------------------------------------------------------------------- block labels


def path_components(path: str) -> list[str]:
    """Lower-cased components of a module path with wrapper prefixes dropped."""
    parts = [p.lower() for p in path.split(".") if p] if path else []
    while parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return [p for p in parts if p not in _WRAPPERS]


def is_head_path(path: str, head_names: Sequence[str] = HEAD_NAMES) -> bool:
    """True when the first or last component of ``path`` is a head name (case-insensitive)."""
    parts = path_components(path)
    names = {n.lower() for n in head_names}
    return bool(parts) and (parts[0] in names or parts[-1] in names)


def is_embedding_path(path: str) -> bool:
    """True when a component of ``path`` contains ``embed`` or is in :data:`EMBEDDING_NAMES`."""
    return any("embed" in p or p in EMBEDDING_NAMES for p in path_components(path))


def block_of(path: str, kind: str | None = None) -> str:
    """Block label of the module at ``path`` (one of :data:`BLOCKS`; rule in the module
    docstring). ``kind``: the tensor's :class:`MatrixSpec` kind, if known."""
    parts = path_components(path)
    if kind == "embedding":
        return "embedding"
    if is_head_path(path):
        return "head"
    if is_embedding_path(path):
        return "embedding"
    for i, p in enumerate(parts):
        if "attn" in p or "attention" in p:
            return "attention"
        if p in MLP_NAMES or (p == "output" and 0 < i < len(parts) - 1):
            return "mlp"
    leaf = parts[-1] if parts else ""
    if leaf in ATTENTION_LEAF_NAMES:
        return "attention"
    if leaf in MLP_LEAF_NAMES:
        return "mlp"
    return "other"


# ------------------------------------------------------------------------ selection


def check_patterns(arg: str, value: Pattern | Iterable[Pattern] | None) -> tuple[Pattern, ...]:
    """Validate a user's ``include`` / ``exclude``-style argument; returns the patterns.

    ``value``: ``None`` (no patterns), one glob string or compiled regex, or an iterable
    of them. Raises ``TypeError`` naming ``arg`` for anything else (an empty string too).
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, re.Pattern)) else value
    try:
        out = tuple(items)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{arg} must be a glob string, a compiled regex or a list of them, "
            f"got {type(value).__name__}"
        ) from None
    for p in out:
        if isinstance(p, re.Pattern):
            continue
        if not isinstance(p, str) or not p:
            raise TypeError(
                f"{arg} must be a glob string, a compiled regex or a list of them; got the "
                f"entry {p!r} ({type(p).__name__})"
            )
    return out


def _match_one(pattern: Pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatchcase(name, pattern)


def matches(patterns: Iterable[Pattern], names: Iterable[str]) -> list[Pattern]:
    """The patterns that match at least one of ``names`` (in ``patterns`` order)."""
    names = list(names)
    return [p for p in patterns if any(_match_one(p, n) for n in names)]


def _shown(pattern: Pattern) -> str:
    return f"re.compile({pattern.pattern!r})" if isinstance(pattern, re.Pattern) else repr(pattern)


def no_match_error(arg: str, pattern: Pattern, candidates: Sequence[str],
                   what: str = "name") -> ValueError:
    """The one error for a pattern that matches nothing: names the argument, the pattern,
    and up to five candidates (the closest to the pattern first)."""
    cands = list(dict.fromkeys(candidates))
    key = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    close = difflib.get_close_matches(key, cands, n=5, cutoff=0.3)
    shown = close + [c for c in cands if c not in close][: max(0, 5 - len(close))]
    more = f" (of {len(cands)})" if len(cands) > len(shown) else ""
    listed = ", ".join(repr(c) for c in shown) if shown else "none"
    return ValueError(
        f"{arg} pattern {_shown(pattern)} matches no {what} of the model; candidates{more}: "
        f"{listed}"
    )


def require_all_matched(arg: str, patterns: Iterable[Pattern], used: Iterable[Pattern],
                        candidates: Sequence[str], what: str = "name") -> None:
    """Raise :func:`no_match_error` for the first of ``patterns`` not in ``used``."""
    used = set(used)
    for p in patterns:
        if p not in used:
            raise no_match_error(arg, p, candidates, what)
