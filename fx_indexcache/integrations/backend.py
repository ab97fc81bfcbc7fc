"""The IndexCache ``torch.compile`` backends: Inductor with the IndexCache pass as its post-grad custom pass.

* ``IndexCacheBackend(**keys)``: a configured backend object (IndexCache keys plus Inductor options, and
  optionally ``mode``). ``torch.compile(m, backend=IndexCacheBackend(index_topk_freq=4), mode="reduce-overhead")``
  works, because torch hands ``mode`` to a backend object while it refuses ``mode`` with ``options``.
  transformers' ``CompileConfig(backend=IndexCacheBackend(...))`` works too: copies of the object are the
  object (its reports stay reachable from ``.reports``), and it pickles.
* ``indexcache_backend``: the same as a plain function, ``options={...}`` carrying the keys (freq 4 when none
  is given); also registered as ``backend="indexcache"``.
* ``IndexCacheEagerBackend`` / ``indexcache_eager_backend``: the same rewrite on AOTAutograd's ATen graph,
  run eagerly (no Inductor code generation), for debugging and fast tests.

``mode`` has Inductor's meaning, read from Inductor's own table (``torch._inductor.list_mode_options``), and the
mode's options sit under the user's own options.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import IndexCacheConfig
from ..detection.frames import dynamo_graph_starts_at_first_layer
from ..detection.registry import LayerSource
from ..report.graph_report import IndexCacheReport, publish
from ..rewrite import cross_graph_build
from .graph_pass import FusionOnlyPass, IndexCachePass

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- modes


def _mode_table() -> dict[str, dict[str, Any]]:
    from torch._inductor import list_mode_options

    return list_mode_options()


def allowed_modes() -> list[str]:
    """The ``torch.compile`` modes Inductor knows, less those that switch off the post-grad passes (where this
    pass runs: torch 2.13's ``"lite"``): a mode that silently dropped IndexCache would be a wrong result."""
    return [mode for mode, options in _mode_table().items() if options.get("use_post_grad_passes", True)]


def mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor's options for ``mode`` (``{}`` for None / "default"); a mode outside ``allowed_modes()`` raises."""
    if mode is None:
        return {}
    allowed = allowed_modes()
    if mode not in allowed:
        why = " (it switches off the post-grad passes, so IndexCache would not run)" if mode in _mode_table() else ""
        raise ValueError(f"IndexCache backend: mode={mode!r} is not allowed{why}; mode must be one of {allowed}")
    return dict(_mode_table()[mode])


# ---------------------------------------------------------------------------------------------- pass chain


def _flat_passes(user_pass: Any) -> tuple:
    """A user's ``post_grad_custom_post_pass`` as a tuple of passes: Inductor accepts one pass or a list."""
    if user_pass is None:
        return ()
    if isinstance(user_pass, (list, tuple)):
        return tuple(p for entry in user_pass for p in _flat_passes(entry))
    return (user_pass,)


def _inference_aware(graph_pass: Any) -> bool:
    from torch._inductor import custom_graph_pass

    aware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)
    return aware is not None and isinstance(graph_pass, aware)


class _Chain(CustomGraphPass):
    """Our pass followed by the post-grad pass(es) the user already set, with a joint uuid.

    ``uuid()`` is None (Inductor then bypasses its FX graph cache) when any chained pass has none: a cache key
    that ignored one of them could serve a graph that pass never saw. An inference-aware user pass gets
    ``is_inference`` as Inductor would give it.
    """

    def __init__(self, *passes) -> None:
        self.passes = _flat_passes(passes)

    def __call__(self, graph, is_inference: bool | None = None) -> None:
        for graph_pass in self.passes:
            if _inference_aware(graph_pass):
                graph_pass(graph, is_inference=bool(is_inference))
            else:
                graph_pass(graph)

    def uuid(self):
        uuids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if None in uuids else repr(uuids)


def _chain_class(passes: tuple) -> type:
    """``_Chain``, or a subclass Inductor recognises as inference-aware when some chained pass is."""
    if not any(_inference_aware(p) for p in passes):
        return _Chain
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

    return type("_InferenceAwareChain", (_Chain, CustomInferenceAwareGraphPass), {"__module__": __name__})


def variant_pass(graph_pass: IndexCachePass, installed: Any) -> CustomGraphPass:
    """The post-grad pass(es) for the cross-graph variants, which are compiled already shared: our fusion alone,
    then the user's passes from ``installed`` (what ``install_pass`` set)."""
    user = tuple(p for p in _flat_passes(getattr(installed, "passes", installed)) if p is not graph_pass)
    passes = (FusionOnlyPass(graph_pass.config), *user)
    return passes[0] if not user else _chain_class(passes)(*passes)


def install_pass(graph_pass: IndexCachePass, inductor_options: dict[str, Any]) -> dict[str, Any]:
    """Inductor options with ``graph_pass`` as the post-grad custom pass, before any the user set (in the options
    or in ``torch._inductor.config``)."""
    patches = dict(inductor_options)
    user = _flat_passes(patches.pop("post_grad_custom_post_pass", None))
    if not user:
        user = _flat_passes(torch._inductor.config.post_grad_custom_post_pass)
    passes = (graph_pass, *user)
    patches["post_grad_custom_post_pass"] = graph_pass if not user else _chain_class(passes)(*passes)
    return patches


# ---------------------------------------------------------------------------------------------- backends


class IndexCacheBackend:
    """A ``torch.compile`` backend: Inductor (C++ on CPU, Triton on GPU) plus the IndexCache pass.

    ``IndexCacheBackend(index_topk_freq=4, mode=None, **inductor_options)``: the IndexCache keys of
    ``IndexCacheConfig`` (freq 4 when none is given), any Inductor option, and optionally a ``mode``. A
    ``mode`` or ``options`` given to ``torch.compile`` itself is honoured as well (options there override the
    object's; two different modes are an error). ``reports`` lists the report of every graph it compiled.

    A backend is a compiler handle, like a function: ``copy.copy`` / ``copy.deepcopy`` return the object
    itself, so the compiles transformers makes from its copies of a ``GenerationConfig`` report here, and
    equal configs compare equal (transformers recompiles when its compile config compares unequal).
    Pickling keeps the configuration and starts an empty report list.
    """

    #: The name torch.compile, dynamo's logs and error messages show.
    __name__ = "IndexCacheBackend"

    def __init__(self, mode: str | None = None, **options: Any) -> None:
        from ..tools.pattern_choice import pattern_file_options

        options = pattern_file_options(options)  # pattern_file="p.json" -> its index_topk_pattern and num_layers
        mode_options(mode)  # bad modes and keys fail here, not at the first compile
        IndexCacheConfig.from_options(options)
        self.mode = mode
        self.options = dict(options)
        self._init_state()

    def _init_state(self) -> None:
        self.reports: list[IndexCacheReport] = []
        self._used_cudagraphs = False
        self._warned_decode_only = False

    # ------------------------------------------------------------------ the backend call
    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None,
                 mode: str | None = None, config_patches: Mapping[str, Any] | None = None):
        mode = self.resolve_mode(mode)
        config, inductor_options = IndexCacheConfig.from_options(
            {**self.options, **(options or {}), **(config_patches or {})}
        )
        graph_pass = IndexCachePass(config, graph_starts_at_first_layer=dynamo_graph_starts_at_first_layer())
        compiled = self._compile(gm, example_inputs, graph_pass, mode, inductor_options)
        if not graph_pass.reports:
            _report_cache_hit(graph_pass)
        self._note_compiled_path(graph_pass.reports)
        self.reports.extend(graph_pass.reports)
        return compiled

    def resolve_mode(self, call_mode: str | None) -> str | None:
        """The mode in force: torch.compile's, else the object's; two different ones are an error."""
        if call_mode is not None and self.mode is not None and call_mode != self.mode:
            raise ValueError(
                f"{self!r}: torch.compile passed mode={call_mode!r} but the backend was made with mode={self.mode!r}; "
                "give the mode in one place (transformers' CompileConfig passes its own mode, 'reduce-overhead' by default)"
            )
        mode = call_mode if call_mode is not None else self.mode
        mode_options(mode)
        return mode

    def _compile(self, gm, example_inputs, graph_pass: IndexCachePass, mode: str | None, inductor_options):
        from torch._inductor.compile_fx import compile_fx

        patches = install_pass(graph_pass, {**mode_options(mode), **inductor_options})
        self._used_cudagraphs |= bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
        variants = variant_pass(graph_pass, patches["post_grad_custom_post_pass"])
        inner = cross_graph_build.inductor_inner_compile(graph_pass, variants)
        return compile_fx(gm, example_inputs, config_patches=patches, inner_compile=inner)

    def _note_compiled_path(self, graph_reports: list[IndexCacheReport]) -> None:
        """Say so (once, and in the reports) when this compile is transformers' decode-step-only compile."""
        from .transformers_compile import decode_only_note

        note = decode_only_note(self)
        if note is None:
            return
        for report in graph_reports:
            report.other_notes.append(note)
        if not self._warned_decode_only:
            self._warned_decode_only = True
            log.warning("fx_indexcache: %s", note)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()``: drop CUDA-graph trees, as torch's own Inductor backend does."""
        if self._used_cudagraphs:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()

    # ------------------------------------------------------------------ value semantics
    def _key(self) -> tuple:
        return type(self), self.mode, repr(sorted(self.options.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexCacheBackend) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        keys = [f"{key}={value!r}" for key, value in self.options.items()]
        if self.mode is not None:
            keys.append(f"mode={self.mode!r}")
        return f"{type(self).__name__}({', '.join(keys)})"

    def __copy__(self) -> IndexCacheBackend:
        return self

    def __deepcopy__(self, memo: dict) -> IndexCacheBackend:
        return self

    def __getstate__(self) -> dict:
        return {"mode": self.mode, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()

    # ------------------------------------------------------------------ from a model config or a pattern file
    @classmethod
    def from_config(cls, config: Any, *, pattern_file: Any = None, mode: str | None = None, **options: Any):
        """The backend for the model ``config`` describes: its IndexCache keys as vLLM and SGLang read them and its
        layer count (``num_hidden_layers``), or the default freq 4 for that layer count; ``pattern_file`` (checked
        against the config's model type and layer count) replaces the config's pattern; ``options`` win."""
        from ..tools.pattern_choice import options_from_config

        return cls(mode, **options_from_config(config, pattern_file, options))


class IndexCacheEagerBackend(IndexCacheBackend):
    """The same rewrite on AOTAutograd's ATen graph, run eagerly (no Inductor code generation).

    For debugging and fast tests: the graph the pass sees is the pre-Inductor ATen graph, so a difference
    between this and ``IndexCacheBackend`` points at Inductor, not the pass. ``mode`` is checked and has
    nothing to tune here; Inductor options are refused.
    """

    __name__ = "IndexCacheEagerBackend"

    def __init__(self, mode: str | None = None, **options: Any) -> None:
        super().__init__(mode, **options)
        self._refuse_inductor_options(IndexCacheConfig.from_options(self.options)[1])

    def _refuse_inductor_options(self, rest: Mapping[str, Any]) -> None:
        """Options that are not IndexCache keys (at construction or from torch.compile) have no meaning here."""
        if rest:
            raise ValueError(f"{type(self).__name__}: unknown options {sorted(rest)}; only IndexCache keys apply")

    def _compile(self, gm, example_inputs, graph_pass: IndexCachePass, mode: str | None, inductor_options):
        self._refuse_inductor_options(inductor_options)

        rewrite = _running(graph_pass)
        variants = _running(FusionOnlyPass(graph_pass.config))  # variants are already shared: our fusion alone
        inference = cross_graph_build.eager_inference_compiler(rewrite, graph_pass, variants)
        return aten_graph_backend(rewrite, inference_compiler=inference)(gm, example_inputs)


def _running(graph_pass) -> Callable:
    """``module -> forward`` after ``graph_pass`` edited the module's graph (the eager backend's compile step)."""
    def rewrite(module: torch.fx.GraphModule):
        graph_pass(module.graph)
        module.recompile()
        return module.forward

    return rewrite


def indexcache_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, *,
                       mode: str | None = None, config_patches: Mapping[str, Any] | None = None):
    """A ``torch.compile`` backend: Inductor (C++ on CPU, Triton on GPU) plus the IndexCache pass."""
    return IndexCacheBackend()(gm, example_inputs, options, mode=mode, config_patches=config_patches)


def indexcache_eager_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, *,
                             mode: str | None = None):
    """``IndexCacheEagerBackend`` as a plain function (options carry the IndexCache keys)."""
    return IndexCacheEagerBackend()(gm, example_inputs, options, mode=mode)


def _report_cache_hit(graph_pass: IndexCachePass) -> None:
    """Inductor served the graph from its FX graph cache, so the pass did not run: say so."""
    note = (
        "served from Inductor's FX graph cache: the pass ran when the entry was made, under this "
        f"same config and code (uuid {graph_pass.uuid()[:12]}); no per-layer detail this time"
    )
    report = IndexCacheReport(graph_pass.config, [], LayerSource.FX_GRAPH_CACHE, 0, [note], "cached graph")
    report.cross_graph = getattr(graph_pass, "cross_graph_plan", None)  # decided outside the cached graph
    graph_pass.reports.append(report)
    publish(report)


def aten_graph_backend(compile_graph: Callable[[torch.fx.GraphModule], Callable], **aot_options: Any):
    """A ``torch.compile`` backend that runs AOTAutograd's forward ATen graph eagerly, no Inductor.

    ``compile_graph(module)`` may inspect or edit the graph module and returns what to call
    instead (usually ``module.forward`` after ``module.recompile()``). The debugging backend,
    the pattern tools and the tests all build on it.
    """

    def backend(gm: torch.fx.GraphModule, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def forward_compiler(module: torch.fx.GraphModule, inputs):
            return make_boxed_func(compile_graph(module))

        return aot_autograd(fw_compiler=forward_compiler, **aot_options)(gm, example_inputs)

    return backend
