"""vDNN activation offload: saved-tensor hooks, what moves, the pinned host pool and copy engine, recompute, batch chunks."""
