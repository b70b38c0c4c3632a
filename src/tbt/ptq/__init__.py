"""Post-training ternarization/binarization (``tbt ptq``): RTN, PTQTP, PB-LLM, BiLLM, + EoRA.

One module per method, registered in :data:`tbt.ptq.registry.PTQ_METHODS`; see ``docs/ptq.md``.
Importing this package imports torch only (no transformers).
"""

from tbt.ptq.apply import PTQConfig, PTQReport, merge_adapters, quantize_model_ptq
from tbt.ptq.eora import EoRAConfig, LowRankAdapter
from tbt.ptq.registry import PTQ_METHODS, get_ptq_method, make_method_config

__all__ = ["PTQConfig", "PTQReport", "EoRAConfig", "LowRankAdapter", "PTQ_METHODS",
           "get_ptq_method", "make_method_config", "merge_adapters", "quantize_model_ptq"]
