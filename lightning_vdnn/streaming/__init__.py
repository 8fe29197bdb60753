"""L2L layer streaming: the streamer, the block autograd function, a block call taken apart, the host state of a block, the host optimizer, microbatches, the multi-rank variant."""
