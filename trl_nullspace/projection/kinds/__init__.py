"""The kinds of constrained parameter, one module each, and the registry `SubspaceProjector.bind`
asks: dense weights (`dense`: Linear, Conv1D, routers), fused experts' slices (`fused_experts`),
LoRA's `A` (`lora`) and the gradient method's flattened parameters (`flat`). `base` says what a
kind declares; `registry` holds them in the order they are tried."""
