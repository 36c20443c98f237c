"""Block-by-block pruning: block inputs, Gram collection, layer and block solves, the resumable block chain,
the pruned folder and the run report."""
