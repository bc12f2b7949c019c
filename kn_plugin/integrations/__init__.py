"""The glue to the frameworks users hold their models in: Captum and TransformerLens."""
