"""fq_compile: a torch.compile backend for FlattenQuant per-tensor INT8/INT4 inference.

    plan = fq_compile.calibrate(model, batches, fq_compile.Config(level="O1"))
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    fast.generate(input_ids, max_new_tokens=128, cache_implementation="static")   # CUDA graphs on CUDA
    print(fq_compile.explain(fast))
    fq_compile.save_quantized(model, plan, "model-o1")     # later, without the fp weights: load_quantized("model-o1")
"""

from fq_compile import kernels  # noqa: F401  (registers torch.ops.fq.*)
from fq_compile.backend import BackendOptionsError, flattenquant
from fq_compile.config import Config, ConfigError
from fq_compile.deploy import load_quantized, save_quantized
from fq_compile.explain import explain
from fq_compile.passes.observe import CalibrationError
from fq_compile.plan import ArtefactFormatError, PlanFormatError, PlanMismatchError, QuantPlan
from fq_compile.planning.calibrate import calibrate
from fq_compile.runtime.guards import RecompileLimitError
from fq_compile.runtime.resident import resident_bytes
from fq_compile.runtime.tensor_parallel import shard_plan

__version__ = "0.1.0"


def __getattr__(name):
    """kv_cache / kv_cache_bytes (runtime/kv_cache.py) import transformers' cache classes: on first use."""
    if name in ("kv_cache", "kv_cache_bytes"):
        from fq_compile.runtime import kv_cache as module

        return getattr(module, name)
    raise AttributeError(f"module 'fq_compile' has no attribute {name!r}")


def _register_backend() -> None:
    """The entry point makes backend="flattenquant" resolve after `pip install`; importing the
    package also registers it, for source checkouts on PYTHONPATH.  Never twice."""
    import torch._dynamo

    if "flattenquant" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(flattenquant, name="flattenquant")


_register_backend()

from fq_compile import generation as _generation  # noqa: E402

_generation.install()   # fast = torch.compile(model, backend="flattenquant"); fast.generate(...) (generation.py)

__all__ = ["Config", "ConfigError", "calibrate", "QuantPlan", "explain", "flattenquant", "CalibrationError",
           "PlanFormatError", "PlanMismatchError", "BackendOptionsError", "RecompileLimitError", "resident_bytes",
           "shard_plan", "kv_cache", "kv_cache_bytes", "save_quantized", "load_quantized", "ArtefactFormatError",
           "__version__"]
