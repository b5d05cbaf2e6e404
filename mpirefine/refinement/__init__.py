"""The refinement itself: the EM loop and what it carries between iterations
(job state, checkpoints, minibatches, image preparation, half maps, references)."""
