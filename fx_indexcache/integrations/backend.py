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

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import CONFIG_KEYS, PATTERN_KEYS, IndexCacheConfig, check_keys, read_config_keys
from ..context import GraphContext, model_layer_count
from ..crossgraph import build as crossgraph_build
from ..crossgraph.runtime import LayerCall, modules_on_stack
from ..detection.frames import compiled_frame_modules, compiled_frame_values, dynamo_graph_starts_at_first_layer
from ..detection.registry import Detection, LayerSource
from ..report.graph_report import IndexCacheReport
from ..session import IndexCacheSession, default_session
from ..rewrite.shard_rows import SHARD_ROWS_KEY
from .block_guards import pin_listed_blocks
from .cache_key import numbering_digest
from .graph_pass import FusionOnlyPass, IndexCachePass, check_shard_rows
from .ledger_effects import LedgerEffectsStore, effects_key, new_entries

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


@contextlib.contextmanager
def swapped_pass(old: IndexCachePass, new: IndexCachePass) -> Iterator[None]:
    """For one Inductor compile, ``new`` in place of ``old`` in the installed post-grad pass chain (the same pass
    with this graph's context: its cross-graph plan, or that it is a training graph)."""
    installed = torch._inductor.config.post_grad_custom_post_pass
    passes = tuple(new if p is old else p for p in _flat_passes(getattr(installed, "passes", installed)))
    replacement = passes[0] if len(passes) == 1 else _chain_class(passes)(*passes)
    with torch._inductor.config.patch(post_grad_custom_post_pass=replacement):
        yield


#: A backend option: a pipeline stage's first global decoder layer, when its module paths count from 0.
STAGE_KEY = "stage_first_layer"


def _stage_first_layer(options: Mapping[str, Any]) -> int | None:
    value = options.get(STAGE_KEY)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"IndexCache backend: {STAGE_KEY}={value!r} is not allowed; it must be an int >= 0 (the "
                         "stage's first global decoder layer) or None")
    return value


#: Backend options that describe the graph's place in a parallel run, not the IndexCache pattern.
PLACEMENT_KEYS = (STAGE_KEY, SHARD_ROWS_KEY)


def _placement(options: Mapping[str, Any], where: str) -> tuple[int | None, bool]:
    """``stage_first_layer`` and ``shard_indexer_rows`` from backend options, validated."""
    check_shard_rows(options.get(SHARD_ROWS_KEY), where)
    return _stage_first_layer(options), bool(options.get(SHARD_ROWS_KEY, False))


def _inductor_keys() -> list[str]:
    return list(torch._inductor.config.get_config_copy())


def check_backend_options(options: Mapping[str, Any], where: str, *, inductor: bool = True) -> None:
    """Refuse an option that is neither an IndexCache key nor (with ``inductor``) an Inductor config key, naming
    the nearest valid one: a misspelt key must fail when the backend is made, not at the first compile."""
    check_keys(options, where, allowed=(*CONFIG_KEYS, "num_layers", *PLACEMENT_KEYS),
               others=_inductor_keys() if inductor else (), others_name="Inductor config keys" if inductor else "")


def _compiled_model() -> tuple[Any, int | None]:
    """The model being compiled (the outermost module on the stack) and the decoder-layer count the first module
    with a config states (transformers' ``config.num_hidden_layers``), each None when there is none.

    A compiled function (not a module) runs its model from an argument or a closure, on no Python stack at compile
    time: the count then comes from the modules the compiled frame holds, when they state one count (two models
    of different depths, a draft and a target, state none). Only the count: the model object keys per-model state
    and the cross-graph hooks, which a module merely passed to a function must not get."""
    modules = modules_on_stack()
    counts = [count for count in map(model_layer_count, modules) if count is not None]
    if not modules:
        held = {model_layer_count(value) for value in compiled_frame_values() if isinstance(value, torch.nn.Module)}
        held.discard(None)
        counts = list(held) if len(held) == 1 else []
    return (modules[0] if modules else None), (counts[0] if counts else None)


def _frame_owner(frame_modules: Mapping[str, Any]) -> weakref.ref | None:
    """The one module a compiled function's frame reaches that is no list and holds every other module it reaches
    (``run(model, blocks, x)``: the model), held weakly; None where there is not exactly one."""
    modules = [m for m in frame_modules.values() if isinstance(m, torch.nn.Module)]
    roots = [m for m in modules if not isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))
             and {id(other) for other in modules} <= {id(sub) for sub in m.modules()}]
    return weakref.ref(roots[0]) if len(roots) == 1 else None


def _model_config_keys(model: Any) -> dict[str, Any]:
    """The IndexCache pattern keys a model's own config ships (GLM-5.2's ``index_topk_freq`` / offset,
    ``indexer_types``): they are that model's default, as the engines apply them."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    keys = read_config_keys(config)
    return {key: keys[key] for key in PATTERN_KEYS if keys.get(key) is not None}


def _refuse_contradicting(shipped: dict[str, Any], given: Mapping[str, Any], model: Any,
                          model_layers: int | None) -> None:
    """A model whose config marks layers S may share them itself (transformers' GLM-5 builds no indexer there and
    hands the previous layer's indices on): a requested pattern that marks such a layer F asks for an indexer the
    model does not have. Marking more layers S than the model does only adds IndexCache, and is allowed."""
    own = IndexCacheConfig.from_options(shipped)[0]
    asked = IndexCacheConfig.from_options({k: v for k, v in given.items() if k in (*CONFIG_KEYS, "num_layers")})[0]
    known = [n for n in (model_layers, len(own.explicit_pattern or ""), len(asked.explicit_pattern or "")) if n]
    count = min(known) if known else 64
    mine, theirs = own.pattern_for(count), asked.pattern_for(count)
    conflicts = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a == "S" and b == "F"]
    if conflicts:
        raise ValueError(
            f"IndexCache: {type(model).__name__}'s config ships {sorted(shipped)} (pattern {mine}) and the model may "
            f"share those S layers itself; the requested keys give {theirs}, which marks layers "
            f"{', '.join(map(str, conflicts))} F against the model's own S. Give no pattern keys (the model's own "
            "apply), or a pattern that keeps those layers S"
        )


# ---------------------------------------------------------------------------------------------- backends


class IndexCacheBackend:
    """A ``torch.compile`` backend: Inductor (C++ on CPU, Triton on GPU) plus the IndexCache pass.

    ``IndexCacheBackend(index_topk_freq=4, mode=None, **inductor_options)``: the IndexCache keys of
    ``IndexCacheConfig``, any Inductor option, and optionally a ``mode``. Without pattern keys the model's own
    config decides when it ships IndexCache keys (``indexer_types``, ``index_topk_freq``, ...), else freq 4 (the
    paper's 1/4). A ``mode`` or ``options`` given to ``torch.compile`` itself is honoured as well (options there
    override the object's; two different modes are an error). A misspelt option fails here, naming the nearest
    key.

    The backend owns an ``IndexCacheSession``: ``reports`` lists the report of every graph it compiled,
    ``layer_calls(model)`` what a model's cross-graph layer graphs did in its latest forward call; two backend
    objects share nothing, and within one, each model has its own cache-write choices and timelines.

    A backend is a compiler handle, like a function: ``copy.copy`` / ``copy.deepcopy`` return the object
    itself, so the compiles transformers makes from its copies of a ``GenerationConfig`` report here, and
    equal configs compare equal (transformers recompiles when its compile config compares unequal).
    Pickling keeps the configuration and starts a new session.
    """

    #: The name torch.compile, dynamo's logs and error messages show.
    __name__ = "IndexCacheBackend"
    _inductor_options = True

    def __init__(self, mode: str | None = None, **options: Any) -> None:
        from ..tools.pattern_choice import PatternChoice, pattern_file_options

        path = options.get("pattern_file")
        options = pattern_file_options(options)  # pattern_file="p.json" -> its index_topk_pattern and num_layers
        mode_options(mode)  # bad modes and keys fail here, not at the first compile
        check_backend_options(options, type(self).__name__, inductor=self._inductor_options)
        _placement(options, type(self).__name__)
        IndexCacheConfig.from_options({k: v for k, v in options.items() if k not in PLACEMENT_KEYS})
        self.mode = mode
        self.options = dict(options)
        #: the model class a pattern file was chosen for, checked against the model each compile sees
        self.pattern_model_class = None if path is None else PatternChoice.load(path).model_class
        self._init_state()

    def _init_state(self, session: IndexCacheSession | None = None) -> None:
        self.session = IndexCacheSession(repr(self)) if session is None else session
        self._used_cudagraphs = False
        #: the cache-write choices of each compile, for the graphs Inductor's caches serve later
        self.ledger_effects = LedgerEffectsStore()

    @property
    def reports(self) -> list[IndexCacheReport]:
        """The report of every graph this backend compiled, oldest first."""
        return self.session.reports()

    def layer_calls(self, model: torch.nn.Module) -> list[LayerCall]:
        """Per layer, what ``model``'s latest forward call (this thread) did through cross-graph layer graphs."""
        return self.session.layer_calls(model)

    # ------------------------------------------------------------------ the backend call
    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None,
                 mode: str | None = None, config_patches: Mapping[str, Any] | None = None):
        mode = self.resolve_mode(mode)
        given = {**self.options, **(options or {}), **(config_patches or {})}
        if options:
            check_backend_options(options, f"{type(self).__name__} (torch.compile options)",
                                  inductor=self._inductor_options)
        stage, shard_rows = _placement(given, type(self).__name__)
        given = {key: value for key, value in given.items() if key not in PLACEMENT_KEYS}
        model, model_layers = _compiled_model()
        self._check_pattern_model()
        shipped = _model_config_keys(model)
        if not any(key in given for key in PATTERN_KEYS):
            given = {**shipped, **given}
        elif shipped:
            _refuse_contradicting(shipped, given, model, model_layers)
        config, inductor_options = IndexCacheConfig.from_options(given)
        decode_only = self._decode_only_note()
        frame_modules = compiled_frame_modules()
        context = GraphContext(
            starts_at_first_layer=dynamo_graph_starts_at_first_layer(), model_layers=model_layers,
            model=None if model is None else weakref.ref(model), notes=() if decode_only is None else (decode_only,),
            stage_first_layer=stage, shard_indexer_rows=shard_rows,
            eager_calls=None if decode_only is None else "transformers' generate() runs the prefill eagerly",
            frame_modules=tuple((name, weakref.ref(module)) for name, module in frame_modules.items()),
            pinned_blocks=pin_listed_blocks(frame_modules), numbering_digest=numbering_digest(gm.graph),
            cache_owner=None if model is not None else _frame_owner(frame_modules))
        graph_pass = IndexCachePass(config, session=self.session, context=context)
        return self._compile_keeping_ledger(gm, example_inputs, graph_pass, mode, inductor_options)

    def _compile_keeping_ledger(self, gm, example_inputs, graph_pass: IndexCachePass, mode, inductor_options):
        """Compile; a graph Inductor's caches serve (the pass did not run) replays the cache-write choices its
        entry's compile made, or, where they were not kept, is compiled again under a pass with no uuid, which no
        cache serves (``ledger_effects``)."""
        uuid, ledger = graph_pass.uuid(), graph_pass.ledger()
        key = None if uuid is None else effects_key(uuid, gm, example_inputs, f"{mode}|{sorted(inductor_options.items())}")
        before = ledger.entries()
        plans: list = []
        compiled = self._compile(gm, example_inputs, graph_pass, mode, inductor_options, plans)
        if graph_pass.reports:
            if key is not None:
                self.ledger_effects.save(key, new_entries(before, ledger.entries()))
            return compiled
        replayed = None if key is None else self.ledger_effects.load(key)
        if replayed is None:
            ledger.restore(before)  # a pass with no uuid: Inductor's and AOTAutograd's caches both step aside
            compiled = self._compile(gm, example_inputs, graph_pass.with_context(numbering_digest=None), mode,
                                     inductor_options, plans)
            if graph_pass.reports:
                return compiled
            replayed = []
        ledger.replay(replayed)
        _report_cache_hit(graph_pass, plans[-1] if plans else None, replayed)
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

    def _compile(self, gm, example_inputs, graph_pass: IndexCachePass, mode: str | None, inductor_options, plans):
        from torch._inductor.compile_fx import compile_fx

        patches = install_pass(graph_pass, {**mode_options(mode), **inductor_options})
        self._used_cudagraphs |= bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
        variants = variant_pass(graph_pass, patches["post_grad_custom_post_pass"])
        inner = crossgraph_build.inductor_inner_compile(
            graph_pass, variants, lambda new: swapped_pass(graph_pass, new), plans)
        return compile_fx(gm, example_inputs, config_patches=patches, inner_compile=inner)

    def _check_pattern_model(self) -> None:
        """A pattern file chosen for one model class refuses a compile of another (any module being compiled)."""
        wanted = getattr(self, "pattern_model_class", None)
        modules = modules_on_stack()
        if wanted is None or not modules or any(type(module).__name__ == wanted for module in modules):
            return
        raise ValueError(f"{self!r}: the pattern file is for model class {wanted!r}; the model being compiled is "
                         f"{type(modules[0]).__name__!r}")

    def _decode_only_note(self) -> str | None:
        """A note for every report of this compile when it is transformers' decode-step-only compile (said once,
        loudly), else None."""
        from .transformers_compile import decode_only_note

        note = decode_only_note(self)
        if note is not None:
            self.session.warn_once("decode-only", "fx_indexcache: %s", note)
        return note

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
        return {"mode": self.mode, "options": self.options,
                "pattern_model_class": getattr(self, "pattern_model_class", None)}

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
    nothing to tune here; Inductor options are refused. Input mutations (key-cache writes) stay in the graph,
    as under Inductor, so ``drop_shared_indexer_cache_writes`` applies here too.
    """

    __name__ = "IndexCacheEagerBackend"
    _inductor_options = False

    def _compile(self, gm, example_inputs, graph_pass: IndexCachePass, mode: str | None, inductor_options, plans):
        if inductor_options:  # not reached: options are checked at construction and per call
            raise ValueError(f"{type(self).__name__}: unknown options {sorted(inductor_options)}; only IndexCache "
                             "keys apply")
        rewrite = _running(graph_pass)
        variants = _running(FusionOnlyPass(graph_pass.config))  # variants are already shared: our fusion alone
        inference = crossgraph_build.eager_inference_compiler(
            lambda module, plan: rewrite(module, graph_pass.with_plan(plan)), graph_pass,
            lambda module: variants(module), plans)
        training = _running(graph_pass.for_training())
        return aten_graph_backend(lambda module: training(module), inference_compiler=inference,
                                  keep_inference_input_mutations=True)(gm, example_inputs)


def _running(graph_pass) -> Callable:
    """``(module, pass=graph_pass) -> forward`` after the pass edited the module's graph (the eager backend's
    compile step)."""
    def rewrite(module: torch.fx.GraphModule, this_pass=None):
        (this_pass or graph_pass)(module.graph)
        module.recompile()
        return module.forward

    return rewrite


def indexcache_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, *,
                       mode: str | None = None, config_patches: Mapping[str, Any] | None = None):
    """A ``torch.compile`` backend: Inductor (C++ on CPU, Triton on GPU) plus the IndexCache pass, reporting to
    the default session (``fx_indexcache.reports()``)."""
    return _in_default_session(IndexCacheBackend)(gm, example_inputs, options, mode=mode,
                                                  config_patches=config_patches)


def indexcache_eager_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, *,
                             mode: str | None = None):
    """``IndexCacheEagerBackend`` as a plain function (options carry the IndexCache keys), reporting to the default
    session."""
    return _in_default_session(IndexCacheEagerBackend)(gm, example_inputs, options, mode=mode)


def _in_default_session(cls: type[IndexCacheBackend]) -> IndexCacheBackend:
    """A keyless backend of ``cls`` whose state lives in the default session (the function backends' owner)."""
    backend = cls()
    backend._init_state(default_session())
    return backend


def _report_cache_hit(graph_pass: IndexCachePass, plan, replayed: list[tuple[str, str, str]]) -> None:
    """Inductor served the graph from its caches, so the pass did not run: say so, and which cache-write choices
    of the entry's compile were replayed into the model's ledger."""
    choices = ", ".join(f"{layer} {choice}" for _, layer, choice in replayed) or "none"
    note = (
        "served from Inductor's FX graph cache: the pass ran when the entry was made, under this "
        f"same config, code and cache-write ledger (uuid {(graph_pass.uuid() or 'none')[:12]}); no per-layer "
        f"detail this time; its key-cache write choices replayed: {choices}"
    )
    detection = Detection([], [], [], [], LayerSource.FX_GRAPH_CACHE)
    context = dataclasses.replace(graph_pass.context, graph_name="cached graph", cross_graph=plan)
    report = IndexCacheReport.build(graph_pass.config, detection, [], context, notes=(note,))
    graph_pass.reports.append(report)
    graph_pass.session.publish(report)


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
