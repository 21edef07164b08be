"""The `plain` level (the export itself) and the `fused` level (ONNX Runtime's transformer optimizer)."""

from __future__ import annotations

from packager.console import say
from packager.errors import PackagerError, first_line
from packager.optimize.base import LevelGraph, LevelInputs, quiet
from packager.source import LoadedModel

FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")
# Hugging Face model_type -> ONNX Runtime optimizer model_type; others are tried as "bert".
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
}


def build_plain(inputs: LevelInputs) -> LevelGraph:
    return LevelGraph(inputs.exported.path, report=inputs.exported_report)


def build_fused(inputs: LevelInputs) -> LevelGraph:
    """Attention, EmbedLayerNormalization, SkipLayerNormalization and BiasGelu fused (ORT contrib ops)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_config = inputs.loaded.model.config
    model_type = getattr(model_config, "model_type", "")
    try:
        with quiet():
            optimized = optimize_model(
                str(inputs.exported.path), model_type=OPTIMIZER_MODEL_TYPES.get(model_type, "bert"),
                num_heads=getattr(model_config, "num_attention_heads", 0),
                hidden_size=getattr(model_config, "hidden_size", 0),
                opt_level=0,
            )
    except Exception as exc:
        raise PackagerError(f"ONNX Runtime's transformer optimizer failed: {first_line(exc)}") from None
    fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    path = inputs.output("fused")
    optimized.save_model_to_file(str(path))
    notes = ()
    if inputs.settings.expect_fused_attention and not any(fusions.get(op) for op in FUSED_ATTENTION_OPS):
        cause = attention_not_fused_cause(inputs.loaded)
        say(f"    warning: attention did not fuse: {cause}")
        notes = (f"attention did not fuse: {cause}",)
    return LevelGraph(path, fusions, notes)


def attention_not_fused_cause(loaded: LoadedModel) -> str:
    """The likeliest reason the optimizer found no attention pattern, from what is known about the export."""
    config = loaded.model.config
    implementation = getattr(config, "_attn_implementation", "eager")
    if implementation != "eager":
        return (f"the model was exported with attn_implementation='{implementation}', whose graph the optimizer does "
                "not match; load it with attn_implementation='eager'")
    model_type = getattr(config, "model_type", "?")
    if model_type not in OPTIMIZER_MODEL_TYPES:
        return f"model_type '{model_type}' is not a BERT-like encoder the optimizer's 'bert' fusions know"
    return (f"the exported attention subgraph does not match the optimizer's patterns (num_heads="
            f"{getattr(config, 'num_attention_heads', '?')}, hidden_size={getattr(config, 'hidden_size', '?')})")
