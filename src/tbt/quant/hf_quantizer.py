"""transformers integration: ``quantization_config = {"quant_method": "tbt", ...}`` in config.json.

:func:`register_hf_quantizer` registers :class:`TbtQuantizationConfig` and :class:`TbtHfQuantizer`
with transformers' quantizer registry (``register_quantization_config`` / ``register_quantizer``;
``quantize_model`` and :func:`tbt.hf.register` call it), so
``AutoModel*.from_pretrained(dir)`` of a checkpoint saved from a ``quantize_model``-converted model
rebuilds the fake-quantized modules *before* the weights load, and then loads the latent weights,
the learned α values and their ``initialized`` flags from the checkpoint.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from tbt.config import QuantConfig

QUANT_METHOD = "tbt"


class TbtQuantizationConfig(QuantizationConfigMixin):
    """The :class:`tbt.QuantConfig` fields plus ``quant_method="tbt"``, as transformers wants."""

    def __init__(self, quant_method: str = QUANT_METHOD, **fields: Any) -> None:
        self.quant_method = quant_method
        self._quant = QuantConfig.from_dict(fields)  # validates
        self.__dict__.update(self._quant.to_dict())

    @classmethod
    def from_quant_config(cls, cfg: QuantConfig) -> TbtQuantizationConfig:
        return cls(**cfg.to_dict())

    def to_quant_config(self) -> QuantConfig:
        return self._quant

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, **self._quant.to_dict()}

    def __iter__(self):
        yield from self.to_dict().items()


class TbtHfQuantizer(HfQuantizer):
    """Rebuilds tbt's quantized modules on the (meta) model before its weights load."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        from tbt.quant.surgery import quantize_model

        quantize_model(model, self.quantization_config.to_quant_config())
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register_hf_quantizer() -> None:
    """Register ``quant_method="tbt"`` (config and quantizer) with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TbtQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TbtHfQuantizer)
