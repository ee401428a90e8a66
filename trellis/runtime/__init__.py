"""Floor 3, the torch runtime: the model, kernels, runner, sampler, CUDA graphs, a stage's ranks
and its place in the UCX ring."""
