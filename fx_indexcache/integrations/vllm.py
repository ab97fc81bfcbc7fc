"""IndexCache as a vLLM post-grad pass (the only module of this package that imports vLLM).

Two ways to install it (see ``examples/vllm_serve.md``):

* by name, which is what ``--compilation-config`` JSON can carry::

    CompilationConfig(inductor_passes={"post_grad_custom_post_pass":
                                       "fx_indexcache.vllm_pass.vllm_index_cache_pass"})

* as an object::

    CompilationConfig(inductor_compile_config={"post_grad_custom_post_pass":
                                               VllmIndexCachePass(index_topk_freq=4)})

With no IndexCache keys given, the pass reads them at compile time from the model's
``hf_config`` (so ``--hf-overrides '{"use_index_cache": true, "index_topk_freq": 4}'``
configures it). The name users put in configs is ``fx_indexcache.vllm_pass.<name>``
(``fx_indexcache/vllm_pass.py``), which binds this module's public names in the package namespace,
where vLLM looks them up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

from torch import fx
from vllm.compilation.passes.inductor_pass import InductorPass

from ..config import FULL, SHARED, IndexCacheConfig
from ..context import GraphContext
from ..detection import vllm_op  # the finder for vLLM's indexer op (registered on import) and its op names
from ..detection.registry import Detection, LayerSource
from ..report.graph_report import IndexCacheReport
from ..session import IndexCacheSession
from .graph_pass import IndexCachePass, _source_digest

log = logging.getLogger(__name__)


#: The config the vLLM pass uses: ``IndexCacheConfig`` itself (vLLM's MTP/next-n rule, that layers
#: numbered past the backbone always compute, lives in ``IndexCacheConfig.layer_kind``); the name stays
#: for callers of this module.
VllmIndexCacheConfig = IndexCacheConfig


def _current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def config_from_vllm(vllm_config: Any) -> VllmIndexCacheConfig | None:
    """The IndexCache keys of ``vllm_config``'s model (hf_config after ``--hf-overrides``), or None."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is None:
        return None
    return VllmIndexCacheConfig.from_hf_config(hf_config)


def _with_layer_count(config: VllmIndexCacheConfig, vllm_config: Any) -> VllmIndexCacheConfig:
    """An explicit config completed with the model's layer count, when vLLM knows it.

    The count makes a pattern of the wrong length an error and makes MTP layers (numbered past
    the backbone) compute, as vLLM's own code does.
    """
    if config.num_layers is not None or vllm_config is None:
        return config
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    layers = getattr(hf_config, "num_hidden_layers", None)
    return dataclasses.replace(config, num_layers=layers) if isinstance(layers, int) else config


def _checked(config: VllmIndexCacheConfig | None, vllm_config: Any) -> None:
    """Warn (once) when vLLM will not compile the model ``config`` is for (no-op outside vLLM's config context)."""
    if vllm_config is not None and config is not None:
        check_vllm_compiles(vllm_config, config)


class VllmIndexCachePass(InductorPass):
    """vLLM ``InductorPass`` running :class:`~fx_indexcache.IndexCachePass` on each post-grad graph.

    ``VllmIndexCachePass()`` takes its config from the current vLLM config's model
    ``hf_config`` each time it runs; outside a vLLM config context it has none and leaves the
    graph untouched, with a warning (it never reuses a config seen earlier, which may belong to
    another model). ``VllmIndexCachePass(config)`` or
    ``VllmIndexCachePass(index_topk_freq=4, ...)`` fixes it; keyword keys switch
    ``use_index_cache`` on unless it is given.

    ``uuid()`` covers the config in force and this package's source, so neither vLLM's
    compile cache nor Inductor's FX graph cache serves a graph rewritten under another pattern.
    """

    def __init__(self, config: IndexCacheConfig | None = None, **keys: Any) -> None:
        if config is not None and keys:
            raise TypeError("VllmIndexCachePass takes a config or keyword keys, not both")
        if keys:
            config = VllmIndexCacheConfig.from_keys(**keys)
        self.explicit_config: VllmIndexCacheConfig | None = config
        self._init_state()

    def _init_state(self) -> None:
        # every graph this pass rewrites belongs to one served model: its reports and cache-write choices
        self.session = IndexCacheSession(repr(self))
        self._warned_split = False

    # ------------------------------------------------------------------ config
    @property
    def from_model(self) -> bool:
        """True when the config comes from vLLM's model config rather than from the constructor."""
        return self.explicit_config is None

    def config(self) -> VllmIndexCacheConfig | None:
        """The config in force now: explicit, else the current vLLM model's, else None."""
        vllm_config = _current_vllm_config()
        if self.explicit_config is not None:
            return _with_layer_count(self.explicit_config, vllm_config)
        if vllm_config is None:
            return None
        return config_from_vllm(vllm_config)

    # ------------------------------------------------------------------ pass
    def __call__(self, graph: fx.Graph) -> None:
        self.run(graph)

    def run(self, graph: fx.Graph) -> IndexCacheReport:
        config = self.config()
        context = GraphContext(graph_name=_graph_name())
        if config is None:
            log.warning(
                "fx_indexcache: no IndexCache config (no explicit keys and no vLLM model config "
                "in context); the graph is left unchanged"
            )
            detection = Detection([], [], [], [], LayerSource.NO_CONFIG)
            report = IndexCacheReport.build(VllmIndexCacheConfig.from_keys(), detection, [], context, notes=(_NO_CONFIG,))
            self.session.publish(report)
            return report
        split = _split_at_indexer(_current_vllm_config())
        if config.use_index_cache and split and not self._warned_split:
            self._warned_split = True
            log.warning("fx_indexcache: %s", split)

        def notes(report: IndexCacheReport) -> list[str]:
            found = list(_native_notes(config, report))
            if any(decision.key_insert_dropped for decision in report.decisions):
                found.append(
                    "the removed indexer calls also inserted their layers' keys into the indexer K-cache "
                    "(skip_k_cache_insert=False): those caches are no longer written and nothing reads "
                    "them, but vLLM still allocates them (its own IndexCache builds no cache for S layers)"
                )
            if config.use_index_cache and split:
                found.append(split)
            return found

        return IndexCachePass(config, session=self.session, context=context, annotate=notes).run(graph)

    def uuid(self) -> str:
        config = self.config()
        _checked(config, _current_vllm_config())  # vLLM asks for the uuid when it hashes its config
        state = config.fingerprint() if config is not None else "config unresolved"
        source = "explicit" if self.explicit_config is not None else "vllm hf_config"
        text = f"{type(self).__qualname__}|{source}|{state}|{_source_digest()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        source = repr(self.explicit_config) if self.explicit_config is not None else "from vLLM hf_config"
        return f"{type(self).__name__}({source})"

    def __getstate__(self) -> dict:
        return {"explicit_config": self.explicit_config}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()


_NO_CONFIG = (
    "no IndexCache config: no explicit keys and no vLLM config in context (the pass reads the model's "
    "hf_config only inside vLLM's compile); graph left unchanged"
)


def _graph_name() -> str:
    """vLLM compiles one graph per compile range; name the graph by it when vLLM says which."""
    try:
        from vllm.compilation.passes.inductor_pass import get_pass_context

        return f"vLLM graph for token range {get_pass_context().compile_range}"
    except (AssertionError, ImportError):
        return "vLLM graph"


def _split_at_indexer(vllm_config: Any) -> str | None:
    """Why no layer can share when vLLM splits the model at the indexer op, or None."""
    compilation = getattr(vllm_config, "compilation_config", None)
    if compilation is None or compilation.use_inductor_graph_partition:
        return None
    from vllm.config import CompilationMode

    if compilation.mode != CompilationMode.VLLM_COMPILE:
        return None
    split = [op for op in vllm_op.INDEXER_OPS if op in (compilation.splitting_ops or ())]
    if not split:
        return None
    return (
        f"splitting_ops contains {', '.join(split)}: vLLM runs each indexer call between "
        "compiled pieces, outside every graph this pass sees, so no layer can reuse another's "
        "indices. Use splitting_ops=[] or use_inductor_graph_partition=True."
    )


def _native_notes(config: IndexCacheConfig, report: IndexCacheReport) -> list[str]:
    """Say so when layers the config marks S have no indexer op at all: vLLM already skipped them."""
    layers = [d.layer for d in report.decisions if d.layer is not None]
    if not config.use_index_cache or not layers:
        return []
    missing = [
        layer
        for layer in range(min(layers), max(layers) + 1)
        if layer not in layers and config.layer_kind(layer) != FULL
    ]
    if not missing:
        return []
    shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
    return [
        f"layers {shown} (marked S) have no indexer op in this graph: the model already skips "
        "them (vLLM's own IndexCache reads the same hf_config keys); nothing to do there"
    ]


@dataclasses.dataclass(frozen=True)
class UncompiledModel:
    """vLLM will not torch.compile this model, so the pass never runs: what to do instead."""

    architecture: str
    reason: str
    pattern: str  # what the pass is configured to apply
    native_pattern: str  # what vLLM's own model code applies from the hf_config alone

    @property
    def hf_overrides(self) -> dict[str, str]:
        """The vLLM-native keys that apply the same pattern without the pass."""
        return {"index_topk_pattern": self.pattern}

    def message(self) -> str:
        import json

        native = (
            "vLLM's own model code already applies this pattern from the hf_config"
            if self.native_pattern == self.pattern
            else f"vLLM's own model code applies {self.native_pattern} from the hf_config; to run {self.pattern} "
            f"without the pass, start vLLM with --hf-overrides '{json.dumps(self.hf_overrides)}'"
        )
        return (
            f"the IndexCache pass is configured for {self.architecture} but vLLM will not torch.compile it "
            f"({self.reason}), so the pass never runs; {native}"
        )


def _native_pattern(hf_config: Any, num_layers: int) -> str:
    """The pattern vLLM's DSA model code builds: freq/offset/pattern, ``use_index_cache`` and ``indexer_types``
    not read (vLLM 0.32/0.33; only HY-V4 reads ``indexer_types``)."""
    config = VllmIndexCacheConfig.from_hf_config(hf_config)
    return dataclasses.replace(config, use_index_cache=True, indexer_types=None).pattern_for(num_layers)


def _why_not_compiled(vllm_config: Any) -> str | None:
    """Why vLLM will run this model without torch.compile, or None when it compiles it."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    compilation = vllm_config.compilation_config
    if compilation.mode == CompilationMode.NONE:
        return "compilation mode NONE: -O0, enforce_eager, or breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1)"
    try:
        from vllm.config.vllm import default_breakable_cudagraph_architectures
    except ImportError:  # a vLLM without breakable CUDA graphs
        return None
    gpu = current_platform.is_cuda() or current_platform.is_rocm()
    eager = set(vllm_config.model_config.architectures) & default_breakable_cudagraph_architectures()
    if gpu and eager:
        return (f"vLLM's {current_platform.device_name} model class for {', '.join(sorted(eager))} is not "
                "torch.compiled (it runs under breakable CUDA graphs)")
    return None


_warned_uncompiled: set[tuple[str, str]] = set()


def check_vllm_compiles(vllm_config: Any, config: IndexCacheConfig | None = None) -> UncompiledModel | None:
    """Whether vLLM will compile the model the pass is configured for; warns once per model and pattern if not.

    ``config`` is the pass's config (default: the model's hf_config keys). Nothing to say when it marks no layer S.
    ``VllmIndexCachePass.uuid()`` calls this inside vLLM's config context (vLLM hashes its config through it).
    """
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    layers = getattr(hf_config, "num_hidden_layers", None)
    if hf_config is None or not isinstance(layers, int):
        return None
    config = config if config is not None else config_from_vllm(vllm_config)
    pattern = config.pattern_for(layers) if config is not None else FULL * layers
    reason = _why_not_compiled(vllm_config) if SHARED in pattern else None
    if reason is None:
        return None
    found = UncompiledModel(", ".join(model_config.architectures), reason, pattern, _native_pattern(hf_config, layers))
    if (found.architecture, pattern) not in _warned_uncompiled:
        _warned_uncompiled.add((found.architecture, pattern))
        log.warning("fx_indexcache: %s", found.message())
    return found


#: The instance to name in ``CompilationConfig.inductor_passes``: config from the model's hf_config.
vllm_index_cache_pass = VllmIndexCachePass()

__all__ = [
    "UncompiledModel",
    "VllmIndexCacheConfig",
    "VllmIndexCachePass",
    "check_vllm_compiles",
    "config_from_vllm",
    "vllm_index_cache_pass",
]
