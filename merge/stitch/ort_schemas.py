"""Schemas the ONNX tooling lacks for ops ONNX Runtime registers in the default domain."""

from __future__ import annotations


def register_ort_default_domain_ops() -> None:
    """ONNX Runtime registers ``SimplifiedLayerNormalization`` in the default domain, where the ONNX checker
    knows no schema; give the checker ORT's schema so it checks those nodes instead of refusing the model."""
    from onnx import defs

    if defs.has("SimplifiedLayerNormalization"):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    schema = defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[defs.OpSchema.FormalParameter("X", "T"), defs.OpSchema.FormalParameter("scale", "V")],
        outputs=[
            defs.OpSchema.FormalParameter("Y", "V"),
            defs.OpSchema.FormalParameter(
                "inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional
            ),
        ],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[
            defs.OpSchema.Attribute("axis", defs.OpSchema.AttrType.INT, "", required=False),
            defs.OpSchema.Attribute("epsilon", defs.OpSchema.AttrType.FLOAT, "", required=False),
            defs.OpSchema.Attribute("stash_type", defs.OpSchema.AttrType.INT, "", required=False),
        ],
    )
    defs.register_schema(schema)
