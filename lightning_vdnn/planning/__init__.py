"""Policy: the activation plan, resident and saving blocks, when to stream, OOM retry, watched steps."""
