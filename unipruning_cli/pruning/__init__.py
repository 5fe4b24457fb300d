"""What pruning is made of: the Method interface, targets, scores to masks, mask files, block-wise pruners, the block loop."""
