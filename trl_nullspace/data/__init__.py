"""Data a user names or the package ships: one loader for dataset names and folders (`loading`), the
`prepare` command's sets, the embedded toy model and data (`toy`, `toy_assets`), GGUF conversion (`gguf`)."""
