"""DeepSpeed ZeRO-1/2/3: the backend (`backend`), the masters' projectors (`master`: after the step;
`in_step`: inside ZeRO-1/2's step; `step_start`: the gradient at the start of ZeRO-3's), where each
rank's fragment lies (`fragments`) and gathering partitioned weights whole (`gather`)."""
